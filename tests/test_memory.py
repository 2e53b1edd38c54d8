"""Memory features against their references: logits only where a loss is (== the full-logits
loss), activation recompute (== no recompute), at TP = 1 and TP = 2 under gloo."""
import pytest
import torch

from megablock.checkpoint.convert import convert
from megablock.diffusion.batch import build_batch
from megablock.diffusion.loss import block_diffusion_loss, selected_block_diffusion_loss
from megablock.testing import run_distributed, save_tiny_hf_model

L = 16


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    out = []
    # untied head (ColumnParallelLinear) and tied head (vocab-parallel embedding weight)
    for name, extra in (("untied", {}), ("tied", {"tie_word_embeddings": True})):
        save_tiny_hf_model(root / f"hf_{name}", "llama", **extra)
        convert(root / name, hf_dir=root / f"hf_{name}", mask_token="<|mask|>", progress=False, log=lambda *a: None)
        out.append(root / name)
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _selection_worker(rank, world, ckpts):
    from megablock.checkpoint.loading import load_model
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(world, 1)
    tokens = torch.randint(0, 300, (2, L), generator=torch.Generator().manual_seed(1))
    out = {}
    for ckpt in ckpts:
        model, meta = load_model(ckpt, info)
        for shift in (True, False):
            batch = build_batch(tokens, torch.arange(2), 4, mask_token_id=meta.mask_token_id, shift=shift, seed=3)
            args = (batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer)
            for lam in (0.0, 0.5):
                model.zero_grad(set_to_none=True)
                ref = block_diffusion_loss(model(batch.input_ids, batch.position_ids, batch.layout), *args, lam)
                ref.loss.backward()
                ref_grads = _grads(model)
                # chunk_tokens=5: several checkpointed chunks and a ragged last one
                for chunk in (5, 0):
                    model.zero_grad(set_to_none=True)
                    hidden = model.run_layers(model.embed(batch.input_ids), batch.position_ids, batch.layout)
                    got = selected_block_diffusion_loss(hidden, model.head, *args, lam, chunk_tokens=chunk)
                    got.loss.backward()
                    out[(ckpt.name, shift, lam, chunk)] = dict(
                        loss=(got.loss.item(), ref.loss.item()),
                        diff=(got.diffusion_loss.item(), ref.diffusion_loss.item()),
                        ar=(got.ar_loss.item(), ref.ar_loss.item()),
                        grad_err=_max_diff(_grads(model), ref_grads),
                        grad_scale=max(float(g.abs().max()) for g in ref_grads.values()),
                    )
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_loss_on_selected_positions_equals_full_logits_loss(ckpts, world):
    results = run_distributed(_selection_worker, world, ckpts)
    for rank_result in results:
        for key, r in rank_result.items():
            _, _, lam, _ = key
            # Same per-position CE, summed over fewer zero-weight terms and in chunks: fp32
            # rounding of the sums only.
            assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-6, abs=1e-6), key
            assert r["diff"][0] == pytest.approx(r["diff"][1], rel=1e-6, abs=1e-6), key
            if lam > 0:
                assert r["ar"][0] == pytest.approx(r["ar"][1], rel=1e-6, abs=1e-6), key
            else:
                assert r["ar"][0] == 0.0  # not computed: the AR positions were not gathered
            assert r["grad_err"] <= 1e-6 * max(r["grad_scale"], 1.0), key
    if world == 2:
        single = run_distributed(_selection_worker, 1, ckpts)[0]
        for key, r in results[0].items():
            # TP = 2 against TP = 1: row-parallel partial sums in another order.
            assert r["loss"][0] == pytest.approx(single[key]["loss"][0], rel=1e-5), key


def _recompute_worker(rank, world, ckpt):
    from megablock.checkpoint.loading import load_model
    from megablock.config import LoraSection
    from megablock.model.lora import apply_lora
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(world, 1)
    tokens = torch.randint(0, 300, (2, L), generator=torch.Generator().manual_seed(2))
    out = {}
    for lora in (False, True):
        model, meta = load_model(ckpt, info)
        if lora:
            # dropout on: full recompute must draw the same masks again in backward
            apply_lora(model, LoraSection(enabled=True, rank=4, alpha=8.0, dropout=0.2), seed=7)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        model.train()
        batch = build_batch(tokens, torch.arange(2), 4, mask_token_id=meta.mask_token_id, seed=3)
        args = (batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, 0.5)
        per_mode = {}
        for mode in ("none", "selective", "full"):
            model.set_recompute(mode)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(11)  # the same dropout draws in every mode
            hidden = model.run_layers(model.embed(batch.input_ids), batch.position_ids, batch.layout)
            parts = selected_block_diffusion_loss(hidden, model.head, *args, chunk_tokens=7)
            parts.loss.backward()
            per_mode[mode] = (parts.loss.item(), _grads(model))
        base_loss, base_grads = per_mode["none"]
        for mode in ("selective", "full"):
            loss, grads = per_mode[mode]
            out[(lora, mode)] = (loss - base_loss, _max_diff(grads, base_grads), len(grads))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_recompute_equals_no_recompute(ckpts, world):
    for rank_result in run_distributed(_recompute_worker, world, ckpts[0]):
        for key, (loss_err, grad_err, n) in rank_result.items():
            # Recompute reruns the same ops on the same inputs (and RNG state): equal up to
            # kernel-level fp32 nondeterminism, which these CPU kernels do not show.
            assert abs(loss_err) <= 1e-7 and grad_err <= 1e-7, (key, loss_err, grad_err)
            assert n > 0


def test_memory_estimate_within_15_percent_of_measured_peak():
    """benchmarks/memory_estimate.py --quick: a real step's peak (torch's CPU allocator) against
    the estimator, no recompute and full recompute (the full table is in docs/benchmarks.md)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "memory_estimate.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])["cases"]
    assert len(cases) == 2
    for case in cases:
        assert 0.85 <= case["ratio"] <= 1.15, case


def test_estimate_memory_cli_on_the_7b_cluster_config():
    from megablock.commands.estimate_memory import main
    from megablock.model.params import parameter_count
    from megablock.commands.estimate_memory import architecture_from_hf
    import io
    import json
    from contextlib import redirect_stdout
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["--config", str(root / "examples/configs/qwen2.5_7b_cluster.yaml"),
            "--hf-config", str(root / "examples/configs/hf/qwen2.5-7b.json"), "--data-parallel", "8",
            "--device-memory-gb", "80", "--json"]
    out = {}
    for mode in ("none", "full"):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(args + ["--set", f"train.recompute={mode}"]) == 0
        out[mode] = json.loads(buf.getvalue().strip().splitlines()[-1])
    # bf16 weights of the 8 (TP 4 x PP 2) shards add up to the model (+ vocabulary padding).
    _, total = parameter_count(architecture_from_hf(str(root / "examples/configs/hf/qwen2.5-7b.json")))
    weights = 4 * sum(s["weights"] for s in out["none"]["stages"])
    assert total * 2 <= weights <= total * 2 * 1.01
    # Full recompute keeps a fraction of the activations and fits a larger micro-batch.
    assert out["full"]["peak_bytes"] < out["none"]["peak_bytes"]
    assert out["full"]["largest_micro_batch"] > out["none"]["largest_micro_batch"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA peak memory and bf16 kernels need a GPU")
def test_cuda_bf16_selected_loss_and_recompute_lower_the_peak():
    """On a GPU in bf16 with compiled FlexAttention: the selected-position loss equals the full
    one (bf16 rounding of the head's matmul in other shapes only), and full recompute gives the
    same loss with a lower peak than none."""
    from megablock.model.config import ModelConfig
    from megablock.model.transformer import BlockDiffusionLM
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4,
                      num_attention_heads=8, num_kv_heads=2, mask_token_id=8191, max_position_embeddings=1024)
    model = BlockDiffusionLM(cfg, dtype=torch.bfloat16).cuda()
    x0 = torch.randint(0, 8191, (4, 512), generator=torch.Generator().manual_seed(1))
    batch = build_batch(x0, torch.arange(4), 16, mask_token_id=8191, seed=2).to("cuda")
    args = (batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, 0.5)
    ref = block_diffusion_loss(model(batch.input_ids, batch.position_ids, batch.layout), *args).loss.item()
    out = {}
    for mode in ("none", "full"):
        model.set_recompute(mode)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        hidden = model.run_layers(model.embed(batch.input_ids), batch.position_ids, batch.layout)
        loss = selected_block_diffusion_loss(hidden, model.head, *args, chunk_tokens=1024).loss
        loss.backward()
        torch.cuda.synchronize()
        out[mode] = (loss.item(), torch.cuda.max_memory_allocated() - before)
    assert out["none"][0] == pytest.approx(ref, rel=1e-2)
    assert out["full"][0] == pytest.approx(out["none"][0], rel=1e-3)
    assert out["full"][1] < 0.7 * out["none"][1], out


@pytest.mark.parametrize("extra,message", [
    (["--device-memory-gb", "nan"], "--device-memory-gb nan must be a positive number"),
    (["--device-memory-gb", "-5"], "--device-memory-gb -5.0 must be a positive number"),
    (["--data-parallel", "0"], "--data-parallel 0 must be >= 1"),
    (["--data-parallel", "-1"], "--data-parallel -1 must be >= 1"),
    (["--data-parallel", "3"], "must be a multiple of micro_batch_size x data-parallel size"),
    (["--set", "parallel.tensor=3"], "parallel.tensor/pipeline:"),
    (["--block-size", "5"], "--block-size 5 must be >= 1 and divide data.seq_len"),
])
def test_estimate_memory_refuses_impossible_inputs(capsys, extra, message):
    """Issue 25.9: nan memory answered "largest micro-batch 1024"; -5, DP 0 / -1 and a TP that
    does not divide the heads returned rc 0."""
    from pathlib import Path

    from megablock.commands.estimate_memory import main

    root = Path(__file__).resolve().parents[1]
    args = ["--config", str(root / "examples/configs/qwen2.5_7b_cluster.yaml"),
            "--hf-config", str(root / "examples/configs/hf/qwen2.5-7b.json"), "--data-parallel", "8", "--json"]
    assert main(args + extra) == 1
    out, err = capsys.readouterr()
    assert message in err and "largest micro-batch" not in out and "unexpected" not in err, err
