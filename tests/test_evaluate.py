"""Evaluation: B = 1 is the HF model's NLL, the NELBO is training's L_diff with a reproducible
noise average, --hf-dir and --ckpt agree, and the CLI's output and errors.

Fixtures: one tiny random Llama (HF folder), its megablock conversion (mask token added), its
export back to HF, and a small dataset of real text from examples/data tokenized with the
converted tokenizer. The CLI runs in-process (its `main`) except for one real subprocess.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.data.datasets import eval_windows  # noqa: E402
from megablock.inference.evaluation import ar_nll_sums, nelbo_sums  # noqa: E402
from megablock.inference.loading import load  # noqa: E402
from megablock.parallel.state import initialize_parallel  # noqa: E402
from megablock.testing import save_tiny_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
L = 32
MAX_TOKENS = 40 * L  # 40 windows


@pytest.fixture(autouse=True)
def _parallel():
    initialize_parallel(1, 1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megablock.checkpoint.convert import convert
    from megablock.checkpoint.export import export
    from megablock.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("evaluate")
    hf = save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", progress=False, log=lambda *a: None)
    export(root / "ckpt", root / "export", progress=False, log=lambda *a: None)
    preprocess([str(ROOT / "examples" / "data" / "kjv_sample.txt.gz")], str(root / "ckpt" / "tokenizer"),
               str(root / "data"), workers=1, text_split="line", progress=False)
    return {"root": root, "hf_model": hf}


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "tools" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(cli, capsys, *args) -> dict:
    assert cli.main([*map(str, args), "--json", "--quiet"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def windows(assets):
    return eval_windows(str(assets["root"] / "data"), L, MAX_TOKENS)


def test_block_size_1_is_the_hf_nll(assets, cli, capsys):
    x = windows(assets)
    with torch.no_grad():
        # HF's loss is the mean over the L-1 next-token predictions of each window; windows have equal
        # counts, so the mean over windows is the per-token NLL evaluate.py reports.
        hf_nll = torch.stack([assets["hf_model"](row[None], labels=row[None]).loss for row in x]).mean().item()
    r = run_cli(cli, capsys, "--ckpt", assets["root"] / "ckpt", "--data", assets["root"] / "data",
                "--seq-len", L, "--block-size", 1, "--max-tokens", MAX_TOKENS, "--samples", 3)
    assert r["windows"] == 40 and r["tokens"] == 40 * L and r["targets"] == 40 * (L - 1)
    # Same fp32 weights, different kernels (megablock's SDPA path vs HF's): ~1e-7 relative.
    assert r["nelbo"] == pytest.approx(hf_nll, rel=1e-5)
    assert r["ar_nll"] == r["nelbo"] and r["ppl_bound"] == pytest.approx(math.exp(hf_nll), rel=1e-5)
    # The plain HF folder (no mask token) evaluates at B = 1 through the in-memory mapping too.
    plain = run_cli(cli, capsys, "--hf-dir", assets["root"] / "hf", "--data", assets["root"] / "data",
                    "--seq-len", L, "--block-size", 1, "--max-tokens", MAX_TOKENS)
    assert plain["nelbo"] == pytest.approx(hf_nll, rel=1e-5)


def test_nelbo_is_training_diffusion_loss_and_reproducible(assets):
    from megablock.diffusion.batch import build_batch
    from megablock.diffusion.loss import block_diffusion_loss

    em = load(ckpt=assets["root"] / "ckpt")
    x = windows(assets)
    kw = dict(mask_token_id=em.mask_token_id, samples=1, seed=7)
    total, count = nelbo_sums(em.model, x, 4, batch_size=64, **kw)
    # The objective training logs as diffusion_loss, on the same windows with the same noise keys.
    batch = build_batch(x, torch.arange(len(x)), 4, mask_token_id=em.mask_token_id, seed=7)
    with torch.no_grad():
        logits = em.model(batch.input_ids, batch.position_ids, batch.layout)
        parts = block_diffusion_loss(logits, batch.targets, batch.diff_weights, batch.ar_weights,
                                     batch.diff_normalizer, 0.0)
    assert count == len(x) * (L - 1)
    assert total / count == pytest.approx(float(parts.diffusion_loss), rel=1e-5)
    assert math.isfinite(total / count) and total / count > 0

    # K samples: sample k is keyed by (seed + k, window index), so the K-sample sum is the sum of
    # K one-sample runs, independent of the batch size, and a repeat is bit-identical.
    three = nelbo_sums(em.model, x, 4, mask_token_id=em.mask_token_id, samples=3, seed=7, batch_size=5)
    again = nelbo_sums(em.model, x, 4, mask_token_id=em.mask_token_id, samples=3, seed=7, batch_size=5)
    assert three == again
    singles = [nelbo_sums(em.model, x, 4, mask_token_id=em.mask_token_id, samples=1, seed=7 + k, batch_size=16)
               for k in range(3)]
    assert three[1] == 3 * count == sum(c for _, c in singles)
    assert three[0] == pytest.approx(sum(t for t, _ in singles), rel=1e-6)
    assert singles[0][0] == pytest.approx(total, rel=1e-6)
    assert singles[1][0] != pytest.approx(total, rel=1e-3)  # another seed, other noise
    # The causal pass is the B = 1 bound.
    ar = ar_nll_sums(em.model, x)
    assert ar == nelbo_sums(em.model, x, 1, mask_token_id=em.mask_token_id)


def test_hf_dir_export_matches_ckpt(assets, cli, capsys):
    common = ["--data", assets["root"] / "data", "--seq-len", L, "--block-size", 4, "--samples", 2,
              "--max-tokens", MAX_TOKENS]
    a = run_cli(cli, capsys, "--ckpt", assets["root"] / "ckpt", *common)
    b = run_cli(cli, capsys, "--hf-dir", assets["root"] / "export", *common)
    for key in ("nelbo", "ar_nll", "tokens", "windows", "samples", "block_size"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert a["nelbo"] != a["ar_nll"]


def test_cli_subprocess_json_with_generation(assets):
    r = assets["root"]
    # This process's world of one exported RANK/MASTER_PORT...; the CLI must start its own.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--ckpt", str(r / "ckpt"), "--data", str(r / "data"),
         "--seq-len", str(L), "--block-size", "4", "--max-tokens", str(8 * L), "--json", "--generate",
         "--gen-prompts", "2", "--gen-prompt-len", "8", "--gen-tokens", "8", "--ref-hf-dir", str(r / "hf")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("nelbo", "ppl_bound", "ar_nll", "ar_ppl", "tokens", "windows", "block_size", "samples",
                "gen_tokens_per_forward", "gen_tokens_per_s", "gen_ppl"):
        assert key in out, key
    assert out["windows"] == 8 and out["block_size"] == 4 and out["gen_prompts"] == 2
    assert out["gen_new_tokens"] == 16 and out["gen_forwards"] > 0 and math.isfinite(out["gen_ppl"])
    assert "evaluate B=4" in proc.stderr  # the progress bar


@pytest.mark.parametrize("case,args,message", [
    ("no mask token", ["--hf-dir", "{hf}", "--block-size", "4"], "no mask token"),
    ("not a divisor", ["--block-size", "5"], "does not divide"),
    ("max below one window", ["--block-size", "4", "--max-tokens", "8"], "less than one window"),
    ("missing data", ["--block-size", "4", "--data", "{root}/nope"], "not found"),
    ("missing ckpt", ["--ckpt", "{root}/nope", "--block-size", "4"], "does not exist"),
    ("zero samples", ["--block-size", "4", "--samples", "0"], "--samples"),
    ("bad ref", ["--block-size", "4", "--generate", "--ref-hf-dir", "{root}"], "not a Hugging Face model"),
    ("long prompt", ["--block-size", "4", "--generate", "--gen-prompt-len", "64"], "--gen-prompt-len"),
])
def test_bad_inputs_exit_nonzero(assets, cli, capsys, case, args, message):
    r = assets["root"]
    fill = lambda a: a.format(hf=r / "hf", root=r)  # noqa: E731
    args = [fill(a) for a in args]
    base = {"--ckpt": str(r / "ckpt"), "--data": str(r / "data"), "--seq-len": str(L), "--max-tokens": str(4 * L)}
    if "--hf-dir" in args:
        base.pop("--ckpt")
    for flag in list(base):
        if flag in args:
            base.pop(flag)
    argv = [x for kv in base.items() for x in kv] + args
    assert cli.main(argv) != 0, case
    assert message in capsys.readouterr().err, case


def test_ref_without_generate_is_a_usage_error(assets, cli):
    with pytest.raises(SystemExit) as e:
        cli.main(["--ckpt", "x", "--data", "y", "--seq-len", "8", "--block-size", "1", "--ref-hf-dir", "z"])
    assert e.value.code != 0
