"""Leaving the noised blocks without a masked token out of the forward (train.drop_unmasked_blocks):
which positions are carried, attention on the carried rows against the full sequence, and the
training objective's loss and gradients against the full batch at TP = 1, TP = 2 and TP = 2 with
sequence parallelism."""
import pytest
import torch

from megablock.checkpoint.convert import convert
from megablock.diffusion.attention import attend
from megablock.diffusion.batch import build_batch, drop_unmasked_blocks
from megablock.diffusion.layout import AttentionLayout
from megablock.testing import run_distributed, save_tiny_hf_model

MASK = 299


def _batch(b=3, L=32, B=4, seed=5, **overrides):
    x0 = torch.randint(0, MASK, (b, L), generator=torch.Generator().manual_seed(seed))
    return build_batch(x0, torch.arange(b), B, mask_token_id=MASK, seed=seed, **overrides)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("B", [2, 4, 8])
def test_carries_every_scored_position_and_drops_only_empty_noised_blocks(shift, B):
    full = _batch(b=2, L=128, B=B, shift=shift)
    got = drop_unmasked_blocks(full)
    assert got is not full, "this draw has empty noised blocks; the test must see some dropped"
    b, L = full.input_ids.shape[0], full.layout.seq_len
    rows = got.layout.rows
    assert rows.shape[0] == b and rows.shape[1] < 2 * L
    for r in range(b):
        kept = set(rows[r].tolist())
        assert rows[r].tolist() == sorted(kept)
        assert set(range(L, 2 * L)) <= kept  # all of x0
        scored = ((full.diff_weights[r] > 0) | (full.ar_weights[r] > 0)).nonzero().flatten().tolist()
        assert set(scored) <= kept
        for blk in range(L // B):  # whole blocks only; a dropped block has no weight at all
            span = set(range(blk * B, (blk + 1) * B))
            assert span <= kept or not (span & kept)
            if not span & kept:
                assert float(full.diff_weights[r, blk * B:(blk + 1) * B].abs().sum()) == 0
    for name in ("input_ids", "position_ids", "targets", "diff_weights", "ar_weights"):
        assert torch.equal(getattr(got, name), getattr(full, name).gather(1, rows))
    assert got.diff_normalizer == full.diff_normalizer
    assert torch.equal(got.noised_targets, full.noised_targets.gather(1, rows))
    assert int(got.noised_targets.sum()) == int(full.noised_targets.sum())


def test_rows_of_a_micro_batch_and_the_sequence_parallel_multiple():
    full = _batch(b=4, L=64, B=4, seed=11)
    live = (full.diff_weights[:, :64] > 0).reshape(4, 16, 4).any(-1).sum(1)
    assert len(set(live.tolist())) > 1, "rows with different numbers of scored blocks"
    got = drop_unmasked_blocks(full)
    assert got.layout.rows.shape[1] == 64 + 4 * int(live.max())
    for multiple in (8, 16):
        carried = drop_unmasked_blocks(full, multiple).layout.carried_len
        assert carried % multiple == 0 and carried >= got.layout.carried_len


def test_nothing_to_drop_returns_the_batch_itself():
    every_block_masked = _batch(B=8, schedule="clipped", clip_min=0.99, clip_max=1.0)
    for batch in (every_block_masked, _batch(B=1), _batch(attention="full")):
        assert drop_unmasked_blocks(batch) is batch


@pytest.mark.parametrize("impl", ["sdpa", "dense"])
@pytest.mark.parametrize("mode,docs", [("context_causal", False), ("block_causal", False), ("context_causal", True)])
def test_attention_on_carried_rows_equals_the_full_sequence(impl, mode, docs):
    batch = _batch(b=2, L=32, B=4, attention=mode, document_masking=docs, eod_token_id=7 if docs else None)
    dropped = drop_unmasked_blocks(batch)
    rows = dropped.layout.rows
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 64, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 64, 8, generator=g, requires_grad=True)
    weight = torch.randn(2, 4, rows.shape[1], 8, generator=g)

    def pick(t):
        return t.gather(2, rows[:, None, :, None].expand(t.shape[0], t.shape[1], rows.shape[1], t.shape[3]))

    ref = pick(attend(q, k, v, batch.layout, impl=impl))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    qc, kc, vc = (pick(t.detach()).requires_grad_() for t in (q, k, v))
    got = attend(qc, kc, vc, dropped.layout, impl=impl)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad((got * weight).sum(), (qc, kc, vc))
    for g_got, g_ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(g_got, pick(g_ref), rtol=1e-4, atol=1e-5)
        # The dropped rows' q, k, v reach no carried output: their gradient is exactly 0.
    dropped_rows = torch.ones(2, 64, dtype=torch.bool)
    dropped_rows.scatter_(1, rows, False)
    for g_ref in ref_grads:
        assert float(g_ref.permute(0, 2, 1, 3)[dropped_rows].abs().max()) == 0.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop")
    save_tiny_hf_model(root / "hf", "qwen3")
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    return root / "ckpt"


def _objective_worker(rank, world, ckpt, sequence_parallel):
    from megablock.checkpoint.loading import load_model
    from megablock.parallel.state import initialize_parallel
    from megablock.diffusion.loss import LossWeights
    from megablock.training.engine import DiffusionObjective

    info = initialize_parallel(world, 1)
    model, meta = load_model(ckpt, info)
    model.set_sequence_parallel(sequence_parallel)
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(2))
    out = {}
    cases = [dict(), dict(shift=False), dict(attention="block_causal"), dict(complementary=True),
             dict(first_slot_mask_prob=0.5)]
    for i, overrides in enumerate(cases):
        batch = build_batch(tokens, torch.arange(2), 4, mask_token_id=meta.mask_token_id, seed=3, **overrides)
        carried = drop_unmasked_blocks(batch, world if sequence_parallel else 1).layout.carried_len
        for lam, gamma in ((0.0, 0.0), (0.5, 0.3)):
            res = {}
            for drop in (False, True):
                model.zero_grad(set_to_none=True)
                loss = DiffusionObjective(model, LossWeights(lam, gamma, chunk_tokens=5), drop_unmasked=drop)(batch)[0]
                loss.backward()
                res[drop] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
            (ref, ref_g), (got, got_g) = res[False], res[True]
            out[(i, lam)] = dict(loss=(got, ref), carried=carried, full=batch.layout.total_len,
                                 grad_err=max(float((got_g[n] - ref_g[n]).abs().max()) for n in ref_g),
                                 grad_scale=max(float(g.abs().max()) for g in ref_g.values()))
    return out


@pytest.mark.parametrize("world,sp", [(1, False), (2, True)])
def test_objective_loss_and_gradients_equal_the_full_batch(ckpt, world, sp):
    results = run_distributed(_objective_worker, world, ckpt, sp)
    for rank_out in results:
        for key, r in rank_out.items():
            assert r["carried"] < r["full"], f"{key}: nothing was dropped, so nothing was tested"
            got, ref = r["loss"]
            assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref)), (key, got, ref)
            assert r["grad_err"] <= 1e-4 * r["grad_scale"], (key, r)
