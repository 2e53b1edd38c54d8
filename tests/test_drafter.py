"""The gated drafter (lora.scope=noised): the clean half is exactly the frozen base, the cached
clean pass gives the joint forward's loss and adapter gradients, the distillation term against a
direct computation, and speculative decoding with a (random, bad) gated adapter equals HF
`generate` on the untouched base model, token for token."""
from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.checkpoint.convert import convert  # noqa: E402
from megablock.config import ConfigError, Config, LoraSection  # noqa: E402
from megablock.diffusion.batch import build_batch, drop_unmasked_blocks  # noqa: E402
from megablock.diffusion.loss import LossWeights, distill_kl, objective, selected_block_diffusion_loss  # noqa: E402
from megablock.testing import (peaked_model, randomize_adapters, run_distributed, save_tiny_hf_model,  # noqa: E402
                               speculative_configs, training_assets)

MASK = 299
EOD = 7
RANK = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafter")
    save_tiny_hf_model(root / "hf", "qwen3")
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    return root / "ckpt"


def _gate(model, scope="noised", seed=3):
    from megablock.model.lora import apply_lora

    apply_lora(model, LoraSection(enabled=True, rank=RANK, alpha=8.0, scope=scope), seed=seed)
    randomize_adapters(model, RANK)
    return model


def _maxdiff(a, b):
    """Largest difference of two logit tensors (both -inf at padding and the mask token)."""
    return float((a - b).nan_to_num(0.0).abs().max())


def _tokens(b=2, L=32, seed=2):
    x = torch.randint(8, MASK, (b, L), generator=torch.Generator().manual_seed(seed))
    x[:, L // 3] = EOD  # a document boundary inside a block
    x[1, L // 2 + 1] = EOD
    return x


def _batch(mask_id, B, docs=True, seed=4, **kw):
    x = _tokens()
    return build_batch(x, torch.arange(x.shape[0]), B, mask_token_id=mask_id, seed=seed,
                       eod_token_id=EOD if docs else None, document_masking=docs, **kw)


# --- the clean half is exactly the base ------------------------------------------------------------
def _clean_half_worker(rank, world, ckpt):
    from megablock.checkpoint.loading import load_model
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(world, 1)
    out = {}
    with torch.no_grad():
        base, meta = load_model(ckpt, info)
        batch = _batch(meta.mask_token_id, 4)
        L = batch.layout.seq_len
        ref = base(batch.input_ids, batch.position_ids, batch.layout)
        for scope in ("noised", "all"):
            model = _gate(load_model(ckpt, info)[0], scope)
            got = model(batch.input_ids, batch.position_ids, batch.layout)
            out[scope] = dict(clean_equal=torch.equal(got[:, L:], ref[:, L:]),
                              noised_diff=_maxdiff(got[:, :L], ref[:, :L]))
        # A decoding forward: the cache's append slots are clean (base), its draft slots gated.
        from megablock.inference.speculative import RowKVCache

        model = _gate(load_model(ckpt, info)[0])
        ids = batch.input_ids[:, L:L + 12]
        draft = torch.full((ids.shape[0], 4), meta.mask_token_id)
        outs = []
        for m in (base, model):
            cache = RowKVCache(ids.shape[0], 32, ids.device)
            cache.begin(12, torch.full((ids.shape[0],), 12), 4, torch.full((ids.shape[0],), 12))
            pos = torch.cat([torch.arange(12), torch.arange(12, 16)]).expand(ids.shape[0], -1)
            outs.append(m.head(m.encode(torch.cat([ids, draft], 1), pos, kv_cache=cache)))
            cache.end()
        out["decode_clean_equal"] = torch.equal(outs[0][:, :12], outs[1][:, :12])
        out["decode_draft_diff"] = _maxdiff(outs[0][:, 12:], outs[1][:, 12:])
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_gated_adapter_leaves_the_clean_half_exactly_the_base(ckpt, world):
    for r in run_distributed(_clean_half_worker, world, ckpt):
        assert r["noised"]["clean_equal"], "scope=noised changed a clean-half output"
        assert r["noised"]["noised_diff"] > 1e-3, "the adapters did nothing on the noised half"
        assert not r["all"]["clean_equal"], "scope=all must change the clean half (else this test cannot fail)"
        assert r["decode_clean_equal"] and r["decode_draft_diff"] > 1e-3


# --- cached clean pass == joint forward ------------------------------------------------------------
def _cached_worker(rank, world, ckpt):
    from megablock.checkpoint.loading import load_model
    from megablock.parallel.state import initialize_parallel
    from megablock.training.engine import DiffusionObjective

    info = initialize_parallel(world, 1)
    model = _gate(load_model(ckpt, info)[0])
    mask_id = model.cfg.mask_token_id
    cases = [dict(B=2), dict(B=4), dict(B=4, docs=False), dict(B=4, recompute="full"),
             dict(B=4, recompute="selective"), dict(B=4, distill=0.7, confidence=0.3)]
    out = []
    for case in cases:
        batch = _batch(mask_id, case["B"], docs=case.get("docs", True))
        model.set_recompute(case.get("recompute", "none"))
        weights = LossWeights(0.0, case.get("confidence", 0.0), case.get("distill", 0.0), 2.0, chunk_tokens=7)
        res = {}
        for clean_pass in ("joint", "cached"):
            for drop in (False, True):
                model.zero_grad(set_to_none=True)
                loss = DiffusionObjective(model, weights, drop_unmasked=drop, clean_pass=clean_pass)(batch)[0]
                loss.backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
                res[clean_pass, drop] = (loss.item(), grads)
        ref_loss, ref_g = res["joint", False]
        dropped = drop_unmasked_blocks(batch).layout.rows is not None
        for key, (loss, grads) in res.items():
            out.append(dict(case=case, key=key, dropped=dropped, loss=(loss, ref_loss),
                            grad_err=max(float((grads[n] - ref_g[n]).abs().max()) for n in ref_g),
                            grad_scale=max(float(g.abs().max()) for g in ref_g.values()),
                            frozen_grads=[n for n, p in model.named_parameters() if not p.requires_grad
                                          and p.grad is not None]))
    model.set_recompute("none")
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_cached_clean_pass_gives_the_joint_loss_and_adapter_gradients(ckpt, world):
    for rank_out in run_distributed(_cached_worker, world, ckpt):
        assert any(r["dropped"] for r in rank_out), "no case dropped a block: drop_unmasked_blocks untested"
        for r in rank_out:
            got, ref = r["loss"]
            assert abs(got - ref) <= 2e-6 * max(1.0, abs(ref)), r
            assert r["grad_err"] <= 2e-5 * r["grad_scale"], r
            assert r["grad_scale"] > 0 and not r["frozen_grads"], r


# --- the distillation term ---------------------------------------------------------------------------
def _direct_kl(student, teacher, T):
    p = torch.softmax(teacher / T, -1)
    log_q = torch.log_softmax(student / T, -1)
    log_p = torch.log_softmax(teacher / T, -1)
    return (torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))).sum(-1) * T**2


def _logits(n=6, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = 3 * torch.randn(n, V, generator=g, dtype=torch.float64), 3 * torch.randn(n, V, generator=g, dtype=torch.float64)
    for x in (s, t):  # padding and the mask token are -inf in every logit row
        x[:, -3:] = float("-inf")
        x[:, 5] = float("-inf")
    return s, t


def _kl_worker(rank, world):
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(world, 1)
    s, t = _logits()
    V = s.shape[1] // world
    local = s[:, rank * V:(rank + 1) * V].clone().requires_grad_(True)
    kl = distill_kl(local, t[:, rank * V:(rank + 1) * V], 1.7)
    kl.sum().backward()
    return kl.detach(), local.grad


@pytest.mark.parametrize("world", [1, 2])
def test_distillation_kl_equals_a_direct_computation(world):
    s, t = _logits()
    ref_s = s.clone().requires_grad_(True)
    ref = _direct_kl(ref_s, t, 1.7)
    ref.sum().backward()
    V = s.shape[1] // world
    for rank, (kl, grad) in enumerate(run_distributed(_kl_worker, world)):
        torch.testing.assert_close(kl, ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_s.grad[:, rank * V:(rank + 1) * V], rtol=1e-12, atol=1e-12)
    assert float(ref.min()) > 0


def test_distill_weight_zero_is_exactly_todays_loss_and_nonzero_adds_the_mean_kl():
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    torch.manual_seed(0)
    batch = _batch(MASK, 4)
    hidden = torch.randn(*batch.input_ids.shape, 16, dtype=torch.float64)
    W = torch.randn(40, 16, dtype=torch.float64)

    def head(h):
        return h @ W.T

    labels = batch.loss_labels()
    args = (batch.targets.clamp(max=39), batch.diff_weights, batch.ar_weights, batch.diff_normalizer)
    ref = selected_block_diffusion_loss(hidden, head, *args, 0.5, 7)
    labels = labels._replace(targets=args[0])
    got = objective(hidden, head, labels, LossWeights(0.5, chunk_tokens=7))
    assert torch.equal(got.loss, ref.loss) and got.distill_loss is None
    with_kl = objective(hidden, head, labels, LossWeights(0.5, distill=0.25, distill_temperature=2.0, chunk_tokens=7))
    # Direct: each noised target slot i against the clean position i (token shift) of its row.
    L = batch.layout.seq_len
    rows, cols = batch.noised_targets.nonzero(as_tuple=True)
    direct = _direct_kl(head(hidden[rows, cols]), head(hidden[rows, L + cols]), 2.0).mean()
    torch.testing.assert_close(with_kl.distill_loss, direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_kl.loss, ref.loss + 0.25 * direct, rtol=1e-12, atol=1e-12)


# --- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, needle", [
    (dict(lora=dict(enabled=True, scope="noised")), "diffusion.ar_loss_weight=0.5"),
    (dict(lora=dict(enabled=True, scope="noised", train_norms=True)), "lora.train_norms"),
    (dict(lora=dict(scope="noised"), diffusion=dict(ar_loss_weight=0)), "lora.enabled"),
    (dict(lora=dict(enabled=True, scope="noised"), diffusion=dict(ar_loss_weight=0, stages=[{"block_size": 1, "tokens": 8}, {"block_size": 4}])), "block-size-1"),
    (dict(lora=dict(enabled=True, scope="noised"), diffusion=dict(ar_loss_weight=0, attention="block_causal", stages=[{"block_size": 4}])), "lora.clean_pass=cached"),
    (dict(diffusion=dict(distill_weight=0.5, attention="block_causal", ar_loss_weight=0)), "distill_weight"),
    (dict(diffusion=dict(distill_weight=-1)), "distill_weight"),
    (dict(diffusion=dict(distill_temperature=0)), "distill_temperature"),
])
def test_gated_and_distillation_settings_are_checked(bad, needle):
    base = {"diffusion": {"stages": [{"block_size": 4}]}}
    for k, v in bad.items():
        base[k] = {**base.get(k, {}), **v}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        Config.from_dict(base)
    ok = Config.from_dict({"lora": {"enabled": True, "scope": "noised"},
                           "diffusion": {"ar_loss_weight": 0, "stages": [{"block_size": 4}], "distill_weight": 1.0}})
    assert ok.lora.clean_pass == "cached"


# --- lossless decoding with a gated drafter ----------------------------------------------------------
PROMPTS = [list(range(20, 28)), [5, 6, 7], list(range(40, 53)), [101]]


def _hf_greedy(hf, prompt, n, eos):
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                      eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _gated_inference_model(hf, scope="noised"):
    from megablock.inference.loading import from_hf_model

    im = from_hf_model(hf, mask_token_id=319)
    _gate(im.model, scope)
    return im


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_speculative_with_a_gated_drafter_equals_hf_generate_on_the_base(family):
    from megablock.inference.speculative import SpeculativeConfig, speculative_sampler
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    hf = peaked_model(family, seed=1)
    n = 17
    im = _gated_inference_model(hf)
    expected = [_hf_greedy(hf, p, n, im.eos_token_ids) for p in PROMPTS]
    sampler = speculative_sampler(im)
    for cfg in speculative_configs(n):
        assert sampler.generate(PROMPTS, cfg).tokens == expected, cfg
    # The same adapters over every position change the verifier: the output is no longer the base's.
    ungated = speculative_sampler(_gated_inference_model(hf, "all"))
    assert ungated.generate(PROMPTS, SpeculativeConfig(block_size=4, max_new_tokens=n)).tokens != expected


def test_gated_drafter_eos_inside_a_block_equals_hf_generate():
    from megablock.inference.speculative import SpeculativeConfig, speculative_sampler
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    hf = peaked_model("llama", seed=3)
    n, B = 24, 8
    im = _gated_inference_model(hf)
    free = [_hf_greedy(hf, p, n, []) for p in PROMPTS[:2]]
    eos = next(t for t in free[0][3:] if free[0].index(t) >= 3 and t not in free[1])
    im.eos_token_ids = [eos]
    expected = [_hf_greedy(hf, p, n, eos) for p in PROMPTS[:2]]
    assert expected[0] == free[0][: free[0].index(eos) + 1] and expected[1] == free[1]
    for cfg in speculative_configs(n, (B,)):
        assert speculative_sampler(im).generate(PROMPTS[:2], cfg).tokens == expected


# --- a trained gated run: export (base unchanged + drafter folder), reload, decode -------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    root = training_assets(tmp_path_factory.mktemp("gated_run"), ckpt_name="base")
    run_distributed(_train_gated, 1, root)
    return root


def _gated_overrides(root, save_dir):
    return [f"model.init_from={root / 'base'}", f"data.prefix={root / 'data'}", f"checkpoint.save_dir={save_dir}",
            f"data.cache_dir={root / 'cache'}", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
            "lora.scope=noised", "diffusion.ar_loss_weight=0", "diffusion.distill_weight=0.5",
            "diffusion.confidence_loss_weight=0.2",
            'diffusion.stages=[{"block_size": 2, "tokens": 256}, {"block_size": 4}]', "train.lr=3e-2"]


def _train_gated(rank, world, root):
    from megablock.config import load_config
    from megablock.training.trainer import Trainer

    Trainer(load_config(str(ROOT / "examples" / "configs" / "tiny.yaml"), _gated_overrides(root, root / "run"))).run()


def _metrics(save_dir):
    import json

    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def test_pipeline_parallel_gated_run_matches_the_single_process_cached_run(gated_run, tmp_path):
    """PP = 2 runs the joint forward (gates rebuilt on each stage, distillation and confidence on
    the last); one process ran the cached clean pass: the same losses and gradient norms."""
    import os
    import subprocess
    import sys

    from megablock.testing import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port",
           str(free_port()), str(ROOT / "examples" / "pretrain_nbdiff.py"), "--config",
           str(ROOT / "examples" / "configs" / "tiny.yaml"), "--set", *_gated_overrides(gated_run, tmp_path / "pp"),
           "parallel.pipeline=2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ref, got = _metrics(gated_run / "run"), _metrics(tmp_path / "pp")
    assert [m["step"] for m in got] == [m["step"] for m in ref] and len(ref) == 6
    for a, b in zip(ref, got):
        for key in ("loss", "diffusion_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert ref[-1]["loss"] != ref[0]["loss"]


def _spec(im, prompts, B=4, two_pass=False):
    from megablock.inference.speculative import SpeculativeConfig, speculative_sampler

    o = speculative_sampler(im).generate(prompts, SpeculativeConfig(block_size=B, max_new_tokens=12, two_pass=two_pass))
    return o.tokens, o.accepted


def test_export_writes_the_base_unchanged_and_a_drafter_that_decodes_as_the_checkpoint(gated_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from megablock.checkpoint.export import export
    from megablock.inference.loading import load
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    export(gated_run / "run", tmp_path / "out", progress=False, log=lambda *a: None)
    export(gated_run / "base", tmp_path / "base_out", progress=False, log=lambda *a: None)
    out = tmp_path / "out"
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "base_out" / "model.safetensors").read_bytes()
    original = AutoModelForCausalLM.from_pretrained(str(gated_run / "hf")).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for name, t in original.items():  # the base, bit for bit (the export adds the mask token's row)
        assert torch.equal(exported[name][: t.shape[0]], t), name
    drafter = out / "drafter"
    assert {p.name for p in drafter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                   "megablock_drafter.json", "megablock_drafter.safetensors"}
    prompts = [[5, 6, 7, 8, 9], [40, 41], list(range(60, 71))]
    from_ckpt = load(ckpt=str(gated_run / "run"))
    assert from_ckpt.model.lora.scope == "noised"
    from_folder = load(hf_dir=str(out), drafter=str(drafter))
    for two_pass in (False, True):
        got, want = _spec(from_folder, prompts, two_pass=two_pass), _spec(from_ckpt, prompts, two_pass=two_pass)
        assert got == want
        assert got[0] == _spec(load(hf_dir=str(out)), prompts, two_pass=two_pass)[0]  # lossless against the base
    # The adapters trained: the drafts differ from the untrained noised half's.
    assert _spec(from_folder, prompts)[1] != _spec(load(hf_dir=str(out)), prompts)[1]
    # PEFT reads the adapter layout (applied everywhere, as PEFT does: not the gated drafter).
    from peft import PeftModel

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out)), str(drafter))


def test_a_gated_checkpoint_is_never_merged(gated_run, tmp_path):
    from megablock.checkpoint import format as fmt
    from megablock.checkpoint.export import export
    from megablock.checkpoint.loading import stage_shard
    from megablock.inference.loading import load
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(1, 1)
    ckpt = fmt.Checkpoint.open(gated_run / "run")
    with pytest.raises(fmt.CheckpointError, match="gated drafter"):
        stage_shard(ckpt, info)  # what training's model.init_from reads
    with pytest.raises(ValueError, match="--drafter goes with --hf-dir"):
        load(ckpt=str(ckpt), drafter=str(tmp_path))
    export(gated_run / "base", tmp_path / "plain", progress=False, log=lambda *a: None)
    with pytest.raises(fmt.CheckpointError, match="not a drafter folder"):
        load(hf_dir=str(tmp_path / "plain"), drafter=str(tmp_path / "plain"))
