"""Context parallelism (parallel.context, megablock.diffusion.context) against one sequence per rank.

The reference of every case is the same model on the whole sequence without context parallelism
(at TP = 1 that is one process; at TP = 2 the TP = 2 model, which tests/test_training.py holds to
one process). At CP = 2 (2 processes) and TP 2 x CP 2 (4 processes), for `allgather` and `ring`,
block sizes 4 and 16, context-causal and block-causal attention, with and without document
masking and token shift, and recompute none / selective / full: the loss, this rank's final
hidden states and every gradient (summed over the context group, as DeepSpeed does) equal the
reference's (the 4-process spawn runs one of the variants per attention and block size, in
turn). The 2-process spawn also checks the ring's pieces one by one against the all-gathered
keys, counts the kernel calls the mask lets it skip, and the matmul kernel (the non-CPU path).
"""
from __future__ import annotations

import pytest
import torch

from megablock.config import ConfigError, load_config
from megablock.testing import run_distributed, save_tiny_hf_model

L = 64
# (document masking, token shift, recompute): each block size and attention runs all three.
VARIANTS = [(False, True, "none"), (True, True, "selective"), (True, False, "full")]
IMPLS = ("allgather", "ring")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megablock.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("cp")
    save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    return root / "ckpt"


def _batch(meta, attention, B, docs, shift):
    from megablock.diffusion.batch import build_batch

    tokens = torch.randint(5, 300, (2, L), generator=torch.Generator().manual_seed(3))
    tokens[0, 21] = tokens[1, 40] = 0  # an EOS inside each sample: two documents each
    return build_batch(tokens, torch.arange(2), B, mask_token_id=meta.mask_token_id, seed=7,
                       attention=attention, shift=shift, document_masking=docs, eod_token_id=0)


def _step(objective, batch):
    """(loss, final hidden states, gradients) of one forward and backward."""
    captured = {}
    plain = type(objective).hidden_states

    def hidden_states(b):
        captured["hidden"] = plain(objective, b)
        return captured["hidden"]

    objective.hidden_states = hidden_states
    objective.model.zero_grad(set_to_none=True)
    loss, diff, ar = objective(batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in objective.model.named_parameters()}
    return torch.stack([loss.detach(), diff, ar]), captured["hidden"].detach(), grads


def _model_cases(ckpt, info, every_variant: bool):
    import torch.distributed as dist

    from megablock.checkpoint.loading import load_model
    from megablock.diffusion.layout import AttentionLayout, ContextShard, shard_positions
    from megablock.diffusion.loss import LossWeights
    from megablock.training.engine import DiffusionObjective

    model, meta = load_model(ckpt, info)
    weights = LossWeights(ar=0.5, chunk_tokens=40)
    worst = {}
    combos = [(attention, B) for attention in ("context_causal", "block_causal") for B in (4, 16)]
    for i, (attention, B) in enumerate(combos):
        # Every variant of each combination, or (the 4-process spawn) one each, in turn.
        for docs, shift, recompute in (VARIANTS if every_variant else [VARIANTS[i % len(VARIANTS)]]):
            model.set_recompute(recompute)
            batch = _batch(meta, attention, B, docs, shift)
            ref_parts, ref_hidden, ref_grads = _step(DiffusionObjective(model, weights, drop_unmasked=False), batch)
            for impl in IMPLS:
                shard = ContextShard(info.cp, info.cp_rank, info.cp_group, impl)
                parts, hidden, grads = _step(DiffusionObjective(model, weights, False, context=shard), batch)
                for g in grads.values():
                    dist.all_reduce(g, group=info.cp_group)
                rows = shard_positions(AttentionLayout(attention, L, B, context=shard))
                key = (attention, B, docs, shift, recompute, impl)
                worst[key] = (
                    float(((parts - ref_parts).abs() / ref_parts.abs().clamp_min(1e-6)).max()),
                    float((hidden - ref_hidden.index_select(1, rows)).abs().max() / ref_hidden.abs().max()),
                    max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-3))
                        for n in grads),
                    float(parts[0]),
                )
    return worst


def _ring_pieces(info):
    """Each ring step's (out, lse) against the all-gathered shard it stands for; the call count."""
    import torch.distributed as dist

    from megablock.diffusion import context as cp
    from megablock.diffusion.attention import context_attend
    from megablock.diffusion.layout import AttentionLayout, ContextShard, shard_positions
    from megablock.diffusion.masks import dense_mask

    c, rank = info.cp, info.cp_rank
    errors, counts = [], []
    doc = torch.zeros(2, L, dtype=torch.long)
    doc[0, 30:] = 1
    for mode, B, docs in (("context_causal", 4, False), ("block_causal", 8, True)):
        layout = AttentionLayout(mode, L, B, doc if docs else None, context=ContextShard(c, rank, info.cp_group))
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(2, h, 2 * L // c, 8, generator=g) for h in (4, 2, 2))
        shards = [torch.empty_like(k) for _ in range(c)], [torch.empty_like(v) for _ in range(c)]
        dist.all_gather(shards[0], k, group=info.cp_group)
        dist.all_gather(shards[1], v, group=info.cp_group)
        mask = dense_mask(layout, None)[:, shard_positions(layout)]  # [b, local rows, S]
        plan = cp.ring_plan(layout, q.device, q.dtype)
        for t in range(c):
            src = (rank - t) % c
            o, lse = cp.ring_step(q, shards[0][src], shards[1][src], plan.steps[t], None)
            allowed = mask[:, None][..., shard_positions(layout, rank=src)]
            s = torch.matmul(q, shards[0][src].repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
            s = s.masked_fill(~allowed, float("-inf"))
            want_lse = torch.logsumexp(s, -1)
            want = torch.matmul(torch.softmax(s, -1).nan_to_num(0.0), shards[1][src].repeat_interleave(2, 1))
            seen = torch.isfinite(want_lse)  # rows that see a key of this shard
            assert torch.equal(torch.isfinite(lse), seen)
            errors += [float((o - want).abs().max()), float((lse - want_lse)[seen].abs().max())]
        # Pairs of (local query chunk, key chunk) that the rules leave anything visible in.
        n = L // (2 * c)
        rules = dense_mask(AttentionLayout(mode, L, B), None)[0]
        visible = sum(bool(rules[qc * n:(qc + 1) * n, kc * n:(kc + 1) * n].any())
                      for qc in cp.context_chunks(layout, rank) for kc in range(4 * c))
        cp.PIECE_CALLS.clear()
        q.requires_grad_()
        context_attend(q, k, v, layout).sum().backward()
        counts.append((dict(cp.PIECE_CALLS), visible, plan.skipped, 16 * c))
        # The matmul kernel (the non-CPU path) gives the same result and gradients.
        flash_grad = q.grad.clone()
        q.grad = None
        cp.KERNEL["name"] = "math"
        try:
            out = context_attend(q, k, v, layout)
            out.sum().backward()
        finally:
            cp.KERNEL["name"] = "auto"
        errors.append(float((q.grad - flash_grad).abs().max()))
    return errors, counts


def _worker(rank, world, ckpt, tp):
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(tp, 1, cp=world // tp)
    pieces = _ring_pieces(info) if tp == 1 else None
    return _model_cases(ckpt, info, every_variant=tp == 1), pieces


def _check(results, variants: int):
    for worst, _ in results:
        assert len(worst) == 2 * 2 * variants * len(IMPLS)
        for key, (loss, hidden, grads, _) in worst.items():
            assert loss < 1e-5 and hidden < 1e-5 and grads < 1e-5, (key, loss, hidden, grads)


def test_context_parallel_equals_whole_sequence(ckpt):
    two = run_distributed(_worker, 2, ckpt, 1)
    _check(two, len(VARIANTS))
    for errors, counts in (pieces for _, pieces in two):
        assert max(errors) < 1e-5, errors
        for calls, visible, skipped, pairs in counts:
            # Every visible pair is one kernel call each way; every hidden pair is skipped.
            assert calls == {"forward": visible, "backward": visible}, (calls, visible)
            assert skipped == pairs - visible and skipped > 0
    four = run_distributed(_worker, 4, ckpt, 2)
    _check(four, 1)
    # TP 2 x CP 2 and CP 2 alone report the same losses (TP = 2 equals one process).
    for key, value in four[0][0].items():
        assert value[3] == pytest.approx(two[0][0][key][3], rel=1e-5), key


@pytest.mark.parametrize("sets, match", [
    (["parallel.context=2", "data.seq_len=48"], "multiple of 2 x parallel.context x block size"),
    (["parallel.context=2", "parallel.pipeline=2"], "not implemented for pipelines"),
    (["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true"], "sequence_parallel=false"),
    (["parallel.context=2", "lora.enabled=true"], "lora.enabled"),
    (["parallel.context=2", "diffusion.attention=full"], "diffusion.attention=full"),
    (["parallel.context=2", "diffusion.confidence_loss_weight=0.1"], "confidence_loss_weight"),
    (["parallel.context=2", "parallel.context_impl=ulysses"], "parallel.context_impl"),
])
def test_bad_context_layouts_are_clear_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.seq_len=64", "diffusion.stages=[{block_size: 16}]", *sets])


def test_world_must_hold_the_context_group():
    from megablock.config import validate_parallel_layout

    cfg = load_config(None, ["data.seq_len=64", "parallel.context=2", "parallel.tensor=2"])
    with pytest.raises(ConfigError, match="parallel.context=2"):
        validate_parallel_layout(cfg, 6)
    assert validate_parallel_layout(cfg, 8) == cfg.train.global_batch_size // (cfg.train.micro_batch_size * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ring_kernel_on_cuda_equals_dense():
    """The ring's non-CPU kernel (plain matmuls) on a GPU, in a group of one: output and gradients
    of the dense reference, with documents, fp32."""
    from megablock.diffusion.attention import attend, dense_attend
    from megablock.diffusion.layout import AttentionLayout, ContextShard

    doc = torch.zeros(2, L, dtype=torch.long, device="cuda")
    doc[1, 19:] = 1
    layout = AttentionLayout("context_causal", L, 8, doc)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 2 * L, 16, device="cuda", generator=g, requires_grad=True) for h in (4, 2, 2))
    ring = attend(q, k, v, AttentionLayout("context_causal", L, 8, doc, context=ContextShard(1, 0)))
    ring_grads = torch.autograd.grad(ring.square().sum(), (q, k, v))
    ref = dense_attend(q, k, v, layout)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(ring, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(ring_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_estimate_splits_tokens_and_zero_over_the_context_ranks():
    from megablock.model.config import ModelConfig
    from megablock.training.memory import estimate

    arch = ModelConfig(arch="llama", vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4,
                       num_attention_heads=4, num_kv_heads=2, mask_token_id=4095, max_position_embeddings=8192)
    sets = ["data.seq_len=4096", "train.loss_chunk_tokens=512", "parallel.zero_stage=1"]
    one = estimate(load_config(None, sets), arch)[0]
    ring = estimate(load_config(None, [*sets, "parallel.context=2"]), arch)[0]
    gather = estimate(load_config(None, [*sets, "parallel.context=2", "parallel.context_impl=allgather"]), arch)[0]
    assert ring.activations == pytest.approx(one.activations / 2, rel=1e-9)
    assert ring.optimizer == pytest.approx(one.optimizer / 2, rel=1e-9)  # ZeRO over data x context
    assert ring.weights == one.weights and ring.gradients == one.gradients
    # allgather keeps the whole sequence's keys, spread queries and outputs for backward.
    assert gather.activations > ring.activations
