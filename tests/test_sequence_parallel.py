"""Sequence parallelism (parallel.sequence_parallel) against plain tensor parallelism.

gloo runs the same collectives the NCCL path uses (all_gather_into_tensor / reduce_scatter_tensor,
megablock.parallel.sequence), so these 2-process tests check the numerics of the code that runs
on GPUs. What a user relies on: at TP = 2 the loss and every gradient are those of TP = 2
without it (and of TP = 1), for every family's layer variant (Llama; Qwen2's qkv bias; Qwen3's
q/k norms; a tied head), at block size 1 (the AR layout, S = L) and 4 (S = 2L), with document
masking, and with full and selective recompute; training runs end to end (tests/test_training.py
covers the DeepSpeed launch with a pipeline).
"""
from __future__ import annotations

import pytest
import torch

from megablock.checkpoint.convert import convert
from megablock.config import ConfigError, load_config
from megablock.diffusion.batch import build_batch
from megablock.diffusion.loss import selected_block_diffusion_loss
from megablock.testing import run_distributed, save_tiny_hf_model

L = 16
FAMILIES = [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"tie_word_embeddings": True})]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    out = []
    for i, (family, extra) in enumerate(FAMILIES):
        save_tiny_hf_model(root / f"hf{i}", family, **extra)
        convert(root / f"ckpt{i}", hf_dir=root / f"hf{i}", mask_token="<|mask|>", progress=False, log=lambda *a: None)
        out.append(root / f"ckpt{i}")
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _replicated(model):
    return [n for n, p in model.named_parameters() if not getattr(p, "tensor_model_parallel", False)]


def _worker(rank, world, ckpts):
    from megablock.checkpoint.loading import load_model
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(world, 1)
    tokens = torch.randint(5, 300, (2, L), generator=torch.Generator().manual_seed(4))
    tokens[:, 7] = 0  # an EOS inside each sample: document masking has two documents
    out, replicated = {}, {}
    for ckpt in ckpts:
        model, meta = load_model(ckpt, info)
        replicated[ckpt.name] = _replicated(model)
        for B, docs in ((1, False), (4, False), (4, True)):
            batch = build_batch(tokens, torch.arange(2), B, mask_token_id=meta.mask_token_id, seed=5,
                                document_masking=docs, eod_token_id=0)
            args = (batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, 0.5)
            modes = [(False, "none"), (True, "none"), (True, "full"), (True, "selective")] if world > 1 else [(False, "none")]
            for sp, recompute in modes:
                model.set_sequence_parallel(sp)
                model.set_recompute(recompute)
                model.zero_grad(set_to_none=True)
                hidden = model.run_layers(model.embed(batch.input_ids), batch.position_ids, batch.layout)
                parts = selected_block_diffusion_loss(hidden, model.head, *args, chunk_tokens=7)
                parts.loss.backward()
                out[(ckpt.name, B, docs, sp, recompute)] = (parts.loss.item(), _grads(model), hidden.detach())
            model.set_sequence_parallel(False)
            model.set_recompute("none")
    return out, replicated


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for n in a:
        scale = max(float(b[n].abs().max()), 1e-3)
        worst = max(worst, float((a[n] - b[n]).abs().max()) / scale)
    return worst


def test_sequence_parallel_equals_tensor_parallel_and_one_process(ckpts):
    (rank0, replicated), (rank1, _) = run_distributed(_worker, 2, ckpts)
    one = run_distributed(_worker, 1, ckpts)[0][0]
    for key, (loss, grads, hidden) in rank0.items():
        name, B, docs, sp, recompute = key
        plain_loss, plain_grads, plain_hidden = rank0[(name, B, docs, False, "none")]
        # The same sums as plain TP = 2, in another grouping (reduce-scatter vs all-reduce).
        assert loss == pytest.approx(plain_loss, rel=1e-6), key
        torch.testing.assert_close(hidden, plain_hidden, rtol=1e-5, atol=1e-5)
        assert _close(grads, plain_grads) < 1e-5, key
        # And the one-process loss (tests/test_training.py: TP = 2 gradients equal TP = 1's).
        ref_loss, _, ref_hidden = one[(name, B, docs, False, "none")]
        assert loss == pytest.approx(ref_loss, rel=1e-5), key
        torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
        # Both ranks end with the same loss and the same replicated gradients (the norms' partial
        # gradients were summed over the group).
        assert loss == rank1[key][0]
        assert any("layernorm" in n for n in replicated[name])
        for n in replicated[name]:
            torch.testing.assert_close(grads[n], rank1[key][1][n], rtol=0, atol=0)


def _collective_worker(rank, world):
    from megablock.parallel import sequence as seq
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(world, 1)
    g = torch.Generator().manual_seed(0)
    S, b, H, O = 6, 2, 6, 8
    x_full = torch.randn(S, b, H, generator=g, dtype=torch.float64)
    errs = []
    for kind in ("column", "row"):
        w_full = torch.randn(O, H, generator=g, dtype=torch.float64)
        probe = torch.randn(S, b, O, generator=g, dtype=torch.float64)
        x_ref, w_ref = x_full.clone().requires_grad_(), w_full.clone().requires_grad_()
        y_ref = torch.matmul(x_ref, w_ref.t())  # the unsharded product and its gradients
        (y_ref * probe).sum().backward()
        if kind == "column":  # sequence shard in, this rank's output columns (whole sequence) out
            x, w = x_full.chunk(world)[rank], w_full.chunk(world)[rank]
            want_y, want_dx, want_dw = (y_ref.detach().chunk(world, -1)[rank], x_ref.grad.chunk(world)[rank],
                                        w_ref.grad.chunk(world)[rank])
            sel = probe.chunk(world, -1)[rank]
        else:  # this rank's input columns in, the summed output's sequence shard out
            x, w = x_full.chunk(world, -1)[rank], w_full.chunk(world, -1)[rank]
            want_y, want_dx, want_dw = (y_ref.detach().chunk(world)[rank], x_ref.grad.chunk(world, -1)[rank],
                                        w_ref.grad.chunk(world, -1)[rank])
            sel = probe.chunk(world)[rank]
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = (seq.column_parallel_linear(x, w, None, info.tp_group) if kind == "column"
             else seq.row_parallel_linear(x, w, info.tp_group))
        (y * sel).sum().backward()
        errs += [float((y - want_y).abs().max()), float((x.grad - want_dx).abs().max()),
                 float((w.grad - want_dw).abs().max())]
    return errs


def test_fused_linears_equal_the_unsharded_products():
    for errs in run_distributed(_collective_worker, 2):
        assert max(errs) < 1e-12, errs


@pytest.mark.parametrize("sets, match", [
    (["parallel.sequence_parallel=true"], "needs parallel.tensor > 1"),
    (["parallel.sequence_parallel=true", "parallel.tensor=2", "data.seq_len=33"], "multiple of"),
    (["parallel.sequence_parallel=true", "parallel.tensor=2", "lora.enabled=true"], "LoRA"),
])
def test_bad_layouts_are_clear_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["diffusion.stages=[{block_size: 1}]", *sets])
