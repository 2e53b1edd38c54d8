"""Block-diffusion sampling: AR parity with Hugging Face, KV cache vs recomputation, parallel
decoding accounting, batching, tensor parallelism and the CLI.

Models are tiny random HF models. Their logits are nearly uniform (init std 0.02), so for the
block tests the output layer is scaled up: the distributions get peaked and varied, and a
threshold actually commits several tokens in some steps and one in others.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.diffusion.layout import AttentionLayout  # noqa: E402
from megablock.inference.loading import from_hf_model  # noqa: E402
from megablock.inference.sampler import GenerateConfig  # noqa: E402
from megablock.inference.sampling import SamplingParams, choose_tokens, select_commits  # noqa: E402
from megablock.parallel.state import initialize_parallel  # noqa: E402
from megablock.testing import peaked_model, run_distributed, save_tiny_hf_model, tiny_hf_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = 319  # an ordinary token of the tiny vocabulary, used as the mask for untrained models


@pytest.fixture(autouse=True)
def _parallel():
    initialize_parallel(1, 1)


def sampler_for(hf, mask=MASK, eos=None, parallel=None):
    im = from_hf_model(hf, mask_token_id=mask, **({"parallel": parallel} if parallel else {}))
    if eos is not None:
        im.eos_token_ids = eos
    return im.sampler()


# --- slow reference: recompute everything, no cache --------------------------------------------
def reference_generate(model, prompt, cfg: GenerateConfig, mask, eos=()):
    """One prompt, no KV cache: every step runs the training layout [xt ; x0] over the whole
    sequence so far (context-causal, dense attention), with the current block in the xt half.
    Same decisions as the sampler (shared `choose_tokens` / `select_commits`), so any difference
    comes from the cache path."""
    B, L0, V = cfg.block_size, len(prompt), model.cfg.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    seq, out, start = list(prompt), [], (len(prompt) // B) * B

    def run(block):
        L = start + B
        clean = torch.tensor(seq[:start] + block)
        ids = torch.cat([clean, clean])[None]
        pos = torch.arange(L).repeat(2)[None]
        logits = model(ids, pos, AttentionLayout("context_causal", L, B))[0, :, :V].float()
        logits[:, mask] = float("-inf")
        return logits[:L], logits[L:]  # xt half, x0 half

    while True:
        block = [seq[start + j] if start + j < L0 else mask for j in range(B)]
        committed = [start + j < L0 for j in range(B)]
        needed = [0 <= start + j - L0 < cfg.max_new_tokens for j in range(B)]
        if cfg.shift and needed[0]:
            _, clean = run(block)
            tok, _ = choose_tokens(clean[start - 1][None], cfg.sampling, gen)
            block[0], committed[0] = int(tok), True

        def todo():
            first_eos = next((j for j in range(B) if committed[j] and needed[j] and block[j] in eos), B)
            return [needed[j] and not committed[j] and j <= first_eos for j in range(B)]

        while any(todo()):
            t = todo()
            xt, _ = run(block)
            js = [j for j in range(B) if t[j]]
            rows = torch.stack([xt[start + j - (1 if cfg.shift else 0)] for j in js])
            toks, conf = choose_tokens(rows, cfg.sampling, gen)
            conf_full, tok_full = torch.zeros(1, B), torch.zeros(1, B, dtype=torch.long)
            conf_full[0, js], tok_full[0, js] = conf, toks
            commit = select_commits(conf_full, torch.tensor([t]), cfg.threshold, cfg.tokens_per_step)[0]
            for j in range(B):
                if commit[j]:
                    block[j], committed[j] = int(tok_full[0, j]), True
        for j in range(B):
            if needed[j] and committed[j]:
                out.append(block[j])
                if block[j] in eos:
                    return out
        if len(out) >= cfg.max_new_tokens:
            return out
        seq = seq[:start] + block
        start += B


# --- AR parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_size_1_greedy_equals_hf_generate(family):
    hf = tiny_hf_model(family, seed=1)
    sampler = from_hf_model(hf).sampler()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    res = sampler.generate(prompts, GenerateConfig(block_size=1, max_new_tokens=24))
    for p, got in zip(prompts, res.tokens):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          do_sample=False, max_new_tokens=24)[0, len(p):].tolist()
        assert got == ref
    # AR with a cache: one forward per step of the longest row (the prefill yields the first token).
    assert res.forwards == max(len(t) for t in res.tokens)


# --- KV cache vs recomputation -----------------------------------------------------------------
CASES = [  # family, prompt length, B, threshold, tokens_per_step, shift, sampling
    ("llama", 8, 4, 0.6, None, True, SamplingParams()),
    ("qwen3", 6, 4, 0.5, None, True, SamplingParams()),           # partial first block
    ("qwen2", 9, 4, None, 2, True, SamplingParams()),             # fixed tokens per step
    ("llama", 7, 3, 0.5, None, False, SamplingParams()),          # no shift (BD3-LM style)
    ("mistral", 5, 8, 0.7, None, True, SamplingParams(0.8, 40, 0.9)),  # sampled, seeded
    ("llama", 3, 1, 0.9, None, True, SamplingParams()),           # B = 1
]


@pytest.mark.parametrize("family,plen,B,thr,k,shift,sp", CASES)
def test_cached_equals_recomputed(family, plen, B, thr, k, shift, sp):
    hf = peaked_model(family)
    im = from_hf_model(hf, mask_token_id=MASK)
    im.model.set_attention_impl("dense")
    cfg = GenerateConfig(block_size=B, max_new_tokens=13, threshold=thr or 0.9, tokens_per_step=k,
                         shift=shift, sampling=sp, seed=3)
    prompt = list(range(20, 20 + plen))
    got = im.sampler().generate([prompt], cfg)
    ref = reference_generate(im.model, prompt, cfg, MASK, eos=im.eos_token_ids)
    assert got.tokens[0] == ref
    if thr is not None and B > 2:  # the peaked model really decodes several tokens in some step
        assert got.forwards < len(ref) or family == "mistral"


# --- accounting and batching --------------------------------------------------------------------
def test_threshold_one_commits_one_token_per_forward():
    sampler = sampler_for(peaked_model(), eos=[])
    for B in (2, 4):
        res = sampler.generate([list(range(30, 38))], GenerateConfig(block_size=B, max_new_tokens=12, threshold=1.0))
        assert len(res.tokens[0]) == 12 and res.forwards == 12
    # A prompt ending inside a block: the prefill's last logit is not used (the block's first
    # token is a prompt token), so one extra forward.
    res = sampler.generate([list(range(30, 37))], GenerateConfig(block_size=4, max_new_tokens=12, threshold=1.0))
    assert len(res.tokens[0]) == 12 and res.forwards == 13
    res = sampler.generate([list(range(30, 38))], GenerateConfig(block_size=4, max_new_tokens=12, threshold=0.3))
    assert res.tokens_per_forward > 1


def test_batch_of_different_lengths_equals_single_prompts():
    hf = peaked_model("qwen2", seed=2)
    prompts = [list(range(40, 40 + n)) for n in (3, 6, 9, 12, 1)]
    cfg = GenerateConfig(block_size=4, max_new_tokens=14, threshold=0.5)
    # Make a token that row 0 produces (but some other row never does) the EOS, so rows finish
    # at different times.
    free = [sampler_for(hf, eos=[]).generate([p], cfg).tokens[0] for p in prompts]
    eos = [next(t for t in free[0][2:] if any(t not in f for f in free[1:]))]
    sampler = sampler_for(hf, eos=eos)
    batched = sampler.generate(prompts, cfg)
    single = [sampler.generate([p], cfg).tokens[0] for p in prompts]
    assert batched.tokens == single
    assert batched.tokens[0][-1] == eos[0] and len(batched.tokens[0]) < 14
    assert any(len(t) == 14 for t in batched.tokens)
    padded = batched.padded()  # finished rows padded with the pad token
    assert padded.shape == (5, 14) and padded[0, len(batched.tokens[0]):].eq(sampler.pad_token_id).all()


def test_generation_past_training_length():
    hf = peaked_model("llama", max_position_embeddings=16,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    res = sampler_for(hf, eos=[]).generate([[1, 2, 3]], GenerateConfig(block_size=4, max_new_tokens=40, threshold=0.6))
    assert len(res.tokens[0]) == 40


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(threshold=0.0), dict(threshold=1.5),
                                 dict(tokens_per_step=0), dict(max_new_tokens=0)])
def test_bad_settings_raise(bad):
    sampler = sampler_for(tiny_hf_model("llama"))
    with pytest.raises(ValueError):
        sampler.generate([[1, 2]], GenerateConfig(**{"block_size": 2, **bad}))


def test_plain_ar_model_refuses_block_size_above_1():
    sampler = from_hf_model(tiny_hf_model("llama")).sampler()
    with pytest.raises(ValueError, match="--block-size 1"):
        sampler.generate([[1, 2]], GenerateConfig(block_size=4))


def test_select_commits():
    conf = torch.tensor([[0.0, 0.95, 0.2, 0.97], [0.0, 0.1, 0.3, 0.2]])
    todo = torch.tensor([[False, True, True, True], [False, True, True, True]])
    got = select_commits(conf, todo, threshold=0.9)
    assert got.tolist() == [[False, True, False, True], [False, False, True, False]]
    got = select_commits(conf, todo, tokens_per_step=2)
    assert got.tolist() == [[False, True, False, True], [False, False, True, True]]


# --- tensor parallelism -------------------------------------------------------------------------
def _tp_worker(rank, world, cfgs):
    info = initialize_parallel(tp=world, pp=1)
    sampler = sampler_for(peaked_model("llama"), eos=[], parallel=info)
    prompts = [list(range(50, 57)), list(range(60, 64))]
    return [sampler.generate(prompts, c).tokens for c in cfgs]


def test_tp2_equals_tp1():
    cfgs = [GenerateConfig(block_size=4, max_new_tokens=10, threshold=0.5),
            GenerateConfig(block_size=1, max_new_tokens=6),
            GenerateConfig(block_size=4, max_new_tokens=10, threshold=0.7, sampling=SamplingParams(1.0, 20), seed=5)]
    ranks = run_distributed(_tp_worker, 2, cfgs)
    assert ranks[0] == ranks[1]  # every TP rank made the same choices
    tp1 = _tp_worker(0, 1, cfgs[:2])
    assert ranks[0][:2] == tp1  # greedy: the same tokens as one process


# --- loading: megablock checkpoint and exported HF folder -----------------------------------------
def test_checkpoint_and_exported_folder(tmp_path):
    from megablock.checkpoint import format as fmt
    from megablock.checkpoint.convert import convert
    from megablock.checkpoint.export import export
    from megablock.inference.loading import load

    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2", seed=4)
    convert(tmp_path / "ckpt", hf_dir=tmp_path / "hf", tp=2, progress=False, log=lambda *a: None)
    meta = fmt.read_metadata(tmp_path / "ckpt")
    fmt.write_metadata(tmp_path / "ckpt", replace(meta, block_size=4))  # as if trained to B = 4
    export(tmp_path / "ckpt", tmp_path / "out", progress=False, log=lambda *a: None)

    prompt = [7, 8, 9, 10, 11]
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                      do_sample=False, max_new_tokens=10)[0, 5:].tolist()
    cfg4 = GenerateConfig(block_size=4, max_new_tokens=10, threshold=0.5)
    results = []
    for kind in ("ckpt", "hf_dir"):
        im = load(**{kind: tmp_path / ("ckpt" if kind == "ckpt" else "out")})  # saved at TP 2, run at TP 1
        assert im.mask_token_id == meta.mask_token_id and im.trained_block_size == 4 and im.shift
        assert im.tokenizer is not None
        sampler = im.sampler()
        assert sampler.generate([prompt], GenerateConfig(block_size=1, max_new_tokens=10)).tokens[0] == ref
        results.append(sampler.generate([prompt], cfg4).tokens)
    assert results[0] == results[1]


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_json(tmp_path):
    save_tiny_hf_model(tmp_path / "hf", "llama")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--hf-dir", str(tmp_path / "hf"),
           "--prompt", "To be, or not", "--max-new-tokens", "6", "--block-size", "1", "--json"]
    # This process's world of one exported RANK/MASTER_PORT...; the CLI must start its own.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(obj) >= {"text", "new_tokens", "forwards", "tokens_per_forward", "seconds"}
    assert obj["new_tokens"] == obj["forwards"] <= 6


def test_cli_errors(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "tools", "generate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    save_tiny_hf_model(tmp_path / "hf", "llama")
    base = ["--prompt", "x", "--max-new-tokens", "4"]
    cases = [
        (["--hf-dir", str(tmp_path / "missing"), "--block-size", "1"], "does not exist"),
        (["--hf-dir", str(tmp_path / "hf"), "--block-size", "0"], "block size"),
        (["--hf-dir", str(tmp_path / "hf"), "--block-size", "2", "--threshold", "1.5"], "threshold"),
        (["--hf-dir", str(tmp_path / "hf"), "--block-size", "4"], "--block-size 1"),
    ]
    for args, msg in cases:
        assert cli.main(base + args) != 0
        assert msg in capsys.readouterr().err
