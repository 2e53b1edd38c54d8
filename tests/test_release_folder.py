"""The release folder decodes on its own: an export with remote code, loaded with transformers in a
subprocess where `import megablock` fails, against megablock's samplers on the same folder.

Folders: a tiny Llama trained 6 steps at B = 4 (held-out NELBO recorded, so the model card has a
number), and tiny random Qwen2 / Qwen3 with a scaled-up head (peaked, varied distributions) that
are converted and exported without training. One subprocess decodes every case of every folder.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megablock.checkpoint import release
from megablock.checkpoint.convert import convert
from megablock.checkpoint.export import export
from megablock.diffusion import block_rules
from megablock.diffusion.block_rules import GenerateConfig, SamplingParams, SpeculativeConfig
from megablock.inference.loading import load
from megablock.inference.speculative import speculative_sampler
from megablock.parallel.state import initialize_parallel
from megablock.testing import MASK_TOKEN, peaked_model, run_distributed, tiny_tokenizer, training_assets

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [list(range(5, 13)), [20, 21, 22], list(range(40, 51)), [101]]  # lengths 8, 3, 11, 1
N_NEW = 14
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9)

# The subprocess: megablock cannot be imported; reads the cases, writes what the folder decodes.
REMOTE = r'''
import builtins, contextlib, json, sys
_import = builtins.__import__
def _no_megablock(name, *args, **kwargs):
    if name == "megablock" or name.startswith("megablock."):
        raise ImportError("megablock is not importable in this test")
    return _import(name, *args, **kwargs)
builtins.__import__ = _no_megablock
import torch
from transformers import AutoModelForCausalLM

def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

cases, results = json.load(open(sys.argv[1])), {}
for folder, case in cases.items():
    jobs = case["jobs"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa")
    out = results[folder] = {"class": type(model).__name__, "jobs": []}
    plain = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code: the family's own class
    ids, mask = left_padded(jobs[0]["prompts"][:1])
    out["plain_class"] = type(plain).__name__
    out["plain_generate"] = plain.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0).tolist()
    out["remote_generate"] = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0).tolist()
    other = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="flex_attention")
    try:
        other.block_generate(ids, block_size=4, max_new_tokens=4)
        out["flex_attention"] = "no error"
    except ValueError as e:
        out["flex_attention"] = str(e)
    base = model
    if case["drafter"]:  # PEFT loads the adapters; use_drafter gates them to the draft slots
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, case["drafter"])
        model.use_drafter(case["drafter"])
    for job in jobs:
        ids, mask = left_padded(job["prompts"])
        if job["kind"] == "hf":  # AR greedy generate() of the base (a drafter's adapters off)
            with (model.disable_adapter() if case["drafter"] else contextlib.nullcontext()):
                g = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=job["n"],
                                   eos_token_id=job["eos"], pad_token_id=0, suppress_tokens=[base.config.mask_token_id])
            out["jobs"].append({"sequences": g[:, ids.shape[1]:].tolist()})
            continue
        o = model.block_generate(ids, mask, **job["kwargs"])
        out["jobs"].append({"sequences": o.sequences.tolist(), "forwards": o.forwards,
                            "tokens_per_forward": o.tokens_per_forward, "drafts_kept": o.drafts_kept})
json.dump(results, open(sys.argv[2], "w"))
'''


def _train(rank, world, root):
    from megablock.config import load_config
    from megablock.training.trainer import Trainer

    Trainer(load_config(str(ROOT / "examples" / "configs" / "tiny.yaml"), [
        f"model.init_from={root / 'ckpt'}", f"data.prefix={root / 'data'}", f"checkpoint.save_dir={root / 'run'}",
        f"data.cache_dir={root / 'cache'}", 'diffusion.stages=[{"block_size": 4}]', "train.lr=3e-2"])).run()


def _train_drafter(rank, world, root):
    from megablock.config import load_config
    from megablock.training.trainer import Trainer

    Trainer(load_config(str(ROOT / "examples" / "configs" / "tiny.yaml"), [
        f"model.init_from={root / 'ckpt'}", f"data.prefix={root / 'data'}", f"checkpoint.save_dir={root / 'run'}",
        f"data.cache_dir={root / 'cache'}", 'diffusion.stages=[{"block_size": 4}]', "train.lr=3e-2",
        "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.scope=noised", "diffusion.ar_loss_weight=0",
        "train.steps=3", "train.eval_interval=0", "checkpoint.interval=3"])).run()


def _untrained(root: Path, family: str, seed: int) -> Path:
    hf = peaked_model(family, seed=seed)
    hf.save_pretrained(str(root / "hf"))
    tiny_tokenizer(root / "hf", vocab_size=hf.config.vocab_size)
    convert(root / "ckpt", hf_dir=root / "hf", mask_token=MASK_TOKEN, progress=False, log=lambda *a: None)
    return root / "ckpt"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = training_assets(tmp_path_factory.mktemp("llama"), "llama")
    run_distributed(_train, 1, root)
    out = {"llama": tmp_path_factory.mktemp("llama_out") / "out"}
    export(root / "run", out["llama"], progress=False, log=lambda *a: None)  # B = 4: remote code by default
    drafter = training_assets(tmp_path_factory.mktemp("drafter"), "qwen2")
    run_distributed(_train_drafter, 1, drafter)
    out["drafter"] = drafter / "out"
    export(drafter / "run", out["drafter"], progress=False, log=lambda *a: None)
    for seed, family in enumerate(("qwen2", "qwen3"), start=3):
        ckpt = _untrained(tmp_path_factory.mktemp(family), family, seed)
        out[family] = ckpt.parent / "out"
        export(ckpt, out[family], progress=False, log=lambda *a: None, remote_code=True)
    return out


def _eos_inside_a_block(tokens: list, B: int, shift: bool = True) -> int:
    """A token the reference decodes at a slot that is neither a block's first nor its last, so an
    EOS there ends a row inside a block."""
    for i, t in enumerate(tokens[1:], start=1):
        if i % B not in (0, B - 1) and t not in tokens[:i]:
            return t
    return tokens[1]


def _megablock_cases(folder: Path) -> list:
    """(job for the subprocess, megablock's output) pairs on `folder` (with its drafter, if any)."""
    drafter = folder / "drafter"
    im = load(hf_dir=str(folder), drafter=str(drafter) if drafter.is_dir() else None)
    cases = []
    for B in (2, 4, 8):
        im.eos_token_ids = []
        free = im.sampler().generate(PROMPTS, GenerateConfig(block_size=B, max_new_tokens=N_NEW, threshold=0.5))
        eos = _eos_inside_a_block(free.tokens[0], B)
        im.eos_token_ids = [eos]
        for sampling, seed in ((SamplingParams(), 0), (SAMPLED, 5)):
            cfg = GenerateConfig(block_size=B, max_new_tokens=N_NEW, threshold=0.5, sampling=sampling, seed=seed)
            kwargs = dict(block_size=B, mode="threshold", threshold=0.5, max_new_tokens=N_NEW, eos_token_id=eos,
                          temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
            cases.append(({"kind": "block", "prompts": PROMPTS, "kwargs": kwargs}, im.sampler().generate(PROMPTS, cfg)))
        for layout in (dict(two_pass=False), dict(two_pass=True),
                       dict(branches=2, reuse_drafts=True, candidates=2, candidate_split="likeliest")):
            for sampling, seed in ((SamplingParams(), 0), (SAMPLED, 5)):
                cfg = SpeculativeConfig(block_size=B, max_new_tokens=N_NEW, sampling=sampling, seed=seed, **layout)
                kwargs = dict(block_size=B, mode="speculative", max_new_tokens=N_NEW, eos_token_id=eos, **layout,
                              temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
                cases.append(({"kind": "block", "prompts": PROMPTS, "kwargs": kwargs},
                              speculative_sampler(im).generate(PROMPTS, cfg)))
        cases.append(({"kind": "hf", "prompts": PROMPTS, "n": N_NEW, "eos": eos}, None))
    return cases


@pytest.fixture(scope="module")
def decoded(folders, tmp_path_factory):
    initialize_parallel(1, 1)
    work = tmp_path_factory.mktemp("remote")
    cases = {str(f): _megablock_cases(f) for f in folders.values()}
    (work / "cases.json").write_text(json.dumps({f: {
        "jobs": [job for job, _ in c], "drafter": str(Path(f) / "drafter") if (Path(f) / "drafter").is_dir() else None,
    } for f, c in cases.items()}))
    (work / "remote.py").write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", str(work / "remote.py"), str(work / "cases.json"),
                    str(work / "out.json")], cwd=str(work), env=env, check=True, timeout=600)
    return cases, json.loads((work / "out.json").read_text())


def _trim(row: list, eos: int, n: int) -> list:
    """An HF generate() row cut after its first EOS (it pads after EOS with the pad id too)."""
    return row[: row.index(eos) + 1] if eos in row else row[:n]


def test_block_generate_equals_megablocks_samplers(decoded):
    """Threshold and speculative modes, greedy and sampled with a fixed seed (the loop is the same
    code, so the generator is drawn in the same order), B in {2, 4, 8}, prompts of 1 to 11 tokens
    (left-padded for transformers), EOS inside a block: the same tokens, forwards and drafts kept."""
    cases, remote = decoded
    checked = 0
    for folder, pairs in cases.items():
        for (job, ref), got in zip(pairs, remote[folder]["jobs"]):
            if ref is None:
                continue
            label = (Path(folder).parent.name, job["kwargs"])
            width = max(len(t) for t in ref.tokens)
            assert got["sequences"] == [t + [0] * (width - len(t)) for t in ref.tokens], label
            assert got["forwards"] == ref.forwards, label
            assert got["tokens_per_forward"] == pytest.approx(ref.tokens_per_forward), label
            assert got["drafts_kept"] == getattr(ref, "accepted", None), label
            checked += 1
        eos_cut = [t for (job, ref) in pairs if ref is not None for t in ref.tokens if len(t) < N_NEW]
        assert eos_cut, "some row must end at its EOS"
    assert checked == len(cases) * 3 * 8


def test_speculative_mode_equals_transformers_greedy_generate(decoded):
    cases, remote = decoded
    compared = 0
    for folder, pairs in cases.items():
        jobs = remote[folder]["jobs"]
        for k, (job, _) in enumerate(pairs):
            if job["kind"] != "hf":
                continue
            hf = [_trim(r, job["eos"], N_NEW) for r in jobs[k]["sequences"]]
            B = pairs[k - 1][0]["kwargs"]["block_size"]
            for j, (spec_job, _) in enumerate(pairs):
                kw = spec_job.get("kwargs", {})
                if kw.get("mode") == "speculative" and kw["block_size"] == B and kw["temperature"] == 0:
                    spec = [_trim(r, job["eos"], N_NEW) for r in jobs[j]["sequences"]]
                    assert spec == hf, (folder, kw)
                    compared += 1
    assert compared == len(cases) * 3 * 3  # folders x block sizes x (one pass, two passes, branches + reuse + candidates)


def test_the_folder_is_the_plain_model_without_remote_code_and_refuses_other_attention(decoded, folders):
    _, remote = decoded
    for family, folder in folders.items():
        got = remote[str(folder)]
        hf_class = json.loads((folder / "config.json").read_text())["architectures"][0]
        assert got["plain_class"] == hf_class and got["class"] == f"Megablock{hf_class}"
        assert got["remote_generate"] == got["plain_generate"]  # generate() as AR, unchanged
        assert "flex_attention" in got["flex_attention"] and 'attn_implementation="sdpa"' in got["flex_attention"]


def test_the_export_copies_the_rules_verbatim_and_documents_itself(folders):
    for folder in folders.values():
        assert (folder / release.RULES).read_bytes() == release.rules_source().read_bytes()
        config = json.loads((folder / "config.json").read_text())
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        assert (folder / "tokenizer.json").is_file()
    card = (folders["llama"] / release.MODEL_CARD).read_text()
    assert "Block size: 4" in card and "B=4" in card and "nelbo:" in card and "block_generate(" in card
    assert "Trained 6 steps" in card


def test_the_rules_import_torch_and_the_remote_code_torch_and_transformers_only():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path, extra in ((release.rules_source(), set()), (release.REMOTE_SOURCE / release.MODELING, {"transformers"}),
                        (release.REMOTE_SOURCE / release.CONFIGURATION, {"transformers"})):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the files the export puts beside it
                    assert node.module in ("block_rules", "configuration_megablock"), (path, node.module)
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed | extra, (path.name, name)


def test_round_trip_through_convert_hf(folders, tmp_path):
    """tools/convert_hf.py reads a release folder as any HF folder (the .py files are ignored) and a
    re-export writes the same tensors, config and remote code."""
    folder = folders["qwen3"]
    convert(tmp_path / "ckpt", hf_dir=folder, progress=False, log=lambda *a: None)
    export(tmp_path / "ckpt", tmp_path / "again", progress=False, log=lambda *a: None, remote_code=True)
    from safetensors.torch import load_file

    a, b = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    for name in release.REMOTE_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes()
    # Without remote code no auto_map is carried over from the source.
    export(tmp_path / "ckpt", tmp_path / "bare", progress=False, log=lambda *a: None, remote_code=False)
    assert "auto_map" not in json.loads((tmp_path / "bare" / "config.json").read_text())
    assert not any((tmp_path / "bare" / n).exists() for n in release.REMOTE_FILES)


def test_remote_code_needs_a_mask_token(tmp_path):
    hf = peaked_model("llama")
    hf.save_pretrained(str(tmp_path / "hf"))
    convert(tmp_path / "ckpt", hf_dir=tmp_path / "hf", mask_token=None, progress=False, log=lambda *a: None)
    with pytest.raises(Exception, match="no mask token.*--no-remote-code"):
        export(tmp_path / "ckpt", tmp_path / "out", progress=False, log=lambda *a: None, remote_code=True)
    assert not (tmp_path / "out").exists()


def test_export_hf_cli_writes_remote_code_by_default_for_block_sizes_above_1(folders, tmp_path):
    from megablock.commands.export_hf import main

    run = json.loads((folders["llama"] / "megablock_export.json").read_text())["ckpt"]  # the B = 4 step folder
    assert main(["--ckpt", run, "--out", str(tmp_path / "on"), "--quiet"]) == 0
    assert main(["--ckpt", run, "--out", str(tmp_path / "off"), "--quiet", "--no-remote-code"]) == 0
    assert "auto_map" in json.loads((tmp_path / "on" / "config.json").read_text())
    assert all((tmp_path / "on" / n).is_file() for n in release.REMOTE_FILES)
    off = json.loads((tmp_path / "off" / "config.json").read_text())
    assert "auto_map" not in off and off["block_size"] == 4
    assert not any((tmp_path / "off" / n).exists() for n in release.REMOTE_FILES)
    assert "tools/generate.py --hf-dir" in (tmp_path / "off" / release.MODEL_CARD).read_text()
