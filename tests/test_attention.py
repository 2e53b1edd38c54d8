"""Block-diffusion attention: the dense mask against the rules written out by hand, and every
implementation against the dense reference (outputs and gradients)."""

import pytest
import torch

from megablock.diffusion.attention import attend, flex_attend
from megablock.diffusion.layout import ATTENTION_MODES, AttentionLayout
from megablock.diffusion.masks import dense_mask, flex_block_mask, flex_mask_mod

SHAPES = [(4, 1), (4, 4), (6, 2), (8, 4), (12, 3)]  # (L, B), B = 1 and B = L included


def _docs(kind, batch, L, gen):
    """None, packed contiguous documents (the real case), or arbitrary ids per position
    (documents interleaved; harsher: rows whose doc first appears late in a block)."""
    if kind is None:
        return None
    if kind == "packed":
        return torch.sort(torch.randint(0, 3, (batch, L), generator=gen), dim=1).values
    return torch.randint(0, 3, (batch, L), generator=gen)


def _brute_force(layout: AttentionLayout, b: int) -> torch.Tensor:
    L, B, S = layout.seq_len, layout.block_size, layout.total_len
    out = torch.zeros(S, S, dtype=torch.bool)
    for qi in range(S):
        for ki in range(S):
            qp, kp = qi % L, ki % L
            qb, kb = qp // B, kp // B
            if layout.mode == "ar":
                ok = kp <= qp
            elif layout.mode == "full":
                ok = True
            else:
                q_xt, k_xt = qi < L, ki < L
                if q_xt and k_xt:
                    ok = qb == kb
                elif q_xt:
                    ok = kb < qb
                elif k_xt:
                    ok = False
                elif layout.mode == "context_causal":
                    ok = kp <= qp
                else:
                    ok = kb <= qb
            if layout.doc_ids is not None:
                ok = ok and bool(layout.doc_ids[b, qp] == layout.doc_ids[b, kp])
            out[qi, ki] = ok
    return out


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("docs", [None, "packed", "random"])
def test_dense_mask_matches_rules(mode, docs):
    gen = torch.Generator().manual_seed(0)
    for L, B in SHAPES:
        layout = AttentionLayout(mode, L, B, _docs(docs, 2, L, gen))
        mask = dense_mask(layout)
        assert mask.dtype == torch.bool
        assert mask.shape == (1 if docs is None else 2, layout.total_len, layout.total_len)
        for b in range(mask.shape[0]):
            assert torch.equal(mask[b], _brute_force(layout, b)), (mode, L, B, docs, b)
        # every query keeps at least one key (itself), so softmax never sees an empty row
        assert mask.any(dim=-1).all()
        assert mask.diagonal(dim1=1, dim2=2).all()


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("docs", [None, "random"])
def test_flex_mask_mod_matches_dense(mode, docs):
    from torch.nn.attention.flex_attention import create_mask

    gen = torch.Generator().manual_seed(1)
    for L, B in SHAPES:
        layout = AttentionLayout(mode, L, B, _docs(docs, 2, L, gen))
        S = layout.total_len
        batch = None if docs is None else 2
        flex = create_mask(flex_mask_mod(layout), batch, None, S, S, device="cpu")[:, 0]
        assert torch.equal(flex, dense_mask(layout)), (mode, L, B, docs)


def test_flex_block_mask_is_cached_without_docs():
    layout = AttentionLayout("context_causal", 64, 8)
    assert flex_block_mask(layout, "cpu") is flex_block_mask(AttentionLayout("context_causal", 64, 8), "cpu")
    assert flex_block_mask(layout, "cpu") is not flex_block_mask(AttentionLayout("block_causal", 64, 8), "cpu")


def _inputs(layout, batch, hq, hkv, d, dtype=torch.float32, seed=0):
    """q, k, v laid out the way the model makes them: strided views of one packed qkv
    projection [b, S, hkv, g + 2, d], transposed to [b, h, S, d]."""
    gen = torch.Generator().manual_seed(seed)
    S, groups = layout.total_len, hq // hkv
    packed = torch.randn(batch, S, hkv, groups + 2, d, generator=gen).to(dtype).requires_grad_()
    q = packed[:, :, :, :groups].reshape(batch, S, hq, d).transpose(1, 2)
    k = packed[:, :, :, groups].transpose(1, 2)
    v = packed[:, :, :, groups + 1].transpose(1, 2)
    g = torch.randn(batch, hq, S, d, generator=gen).to(dtype)
    return q, k, v, g


def _run(impl, q, k, v, g, layout, scale=None):
    out = attend(q, k, v, layout, impl=impl, scale=scale)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("docs", [None, "packed", "random"])
def test_sdpa_matches_dense(mode, heads, docs):
    gen = torch.Generator().manual_seed(2)
    for (L, B), scale in zip([(8, 1), (8, 2), (8, 8), (12, 4), (32, 4), (48, 16)], [None, 0.3] * 3):
        layout = AttentionLayout(mode, L, B, _docs(docs, 2, L, gen))
        q, k, v, g = _inputs(layout, 2, *heads, d=8)
        ref = _run("dense", q, k, v, g, layout, scale)
        fast = _run("sdpa", q, k, v, g, layout, scale)
        for name, a, b in zip(("out", "dq", "dk", "dv"), ref, fast):
            assert torch.isfinite(b).all()
            # fp32, O(1) values: the fast path sums the same softmax in another order (pieces
            # merged by log-sum-exp), which moves results by a few float32 ulps (~1e-6).
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5, msg=f"{name} {mode} {L} {B} {docs}")


@pytest.mark.parametrize("mode", ["context_causal", "block_causal"])
def test_sdpa_bf16_as_accurate_as_dense_bf16(mode):
    """bf16 has no exact answer to compare with; the fast path must be as close to the fp32
    result as the dense bf16 path is (within 2x, plus a few bf16 ulps)."""
    layout = AttentionLayout(mode, 64, 8, _docs("packed", 2, 64, torch.Generator().manual_seed(3)))
    q, k, v, g = _inputs(layout, 2, 4, 2, 16, dtype=torch.bfloat16)
    exact = _run("dense", *(t.detach().float().requires_grad_() for t in (q, k, v)), g.float(), layout)
    dense = _run("dense", q, k, v, g, layout)
    fast = _run("sdpa", q, k, v, g, layout)
    for e, a, b in zip(exact, dense, fast):
        assert b.dtype == torch.bfloat16
        assert (b.float() - e).abs().max() <= 2 * (a.float() - e).abs().max() + 3e-2


def test_cached_masks_follow_new_doc_ids():
    """Masks are cached across layers; a new batch's documents must never reuse old ones,
    even when the batch arrives in the same buffer, written behind torch's back (numpy)."""
    from torch.nn.attention.flex_attention import create_mask

    L, B = 16, 4
    docs = _docs("packed", 2, L, torch.Generator().manual_seed(4))
    for step in range(4):
        layout = AttentionLayout("context_causal", L, B, docs)
        q, k, v, g = _inputs(layout, 2, 2, 2, 8, seed=step)
        torch.testing.assert_close(attend(q, k, v, layout, "sdpa"), attend(q, k, v, layout, "dense"),
                                   atol=2e-5, rtol=1e-5)
        cached = flex_block_mask(layout, "cpu").mask_mod
        assert torch.equal(create_mask(cached, 2, None, 2 * L, 2 * L, "cpu")[:, 0], dense_mask(layout))
        if step % 2:
            docs[:, L // 2:] += 1  # in place through torch
        else:
            docs.numpy()[:, : L // 2] += 1  # in place, version unchanged


def test_auto_is_sdpa_on_cpu_and_bad_impl_fails():
    layout = AttentionLayout("context_causal", 8, 2)
    q, k, v, _ = _inputs(layout, 1, 2, 1, 4)
    assert torch.equal(attend(q, k, v, layout), attend(q, k, v, layout, "sdpa"))
    with pytest.raises(ValueError):
        attend(q, k, v, layout, "nope")
    with pytest.raises(ValueError):
        attend(q, k, v, AttentionLayout("ar", 8, 2))  # 16 positions, layout says 8


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_flex_forward_on_cpu_matches_dense(mode):
    """Eager FlexAttention runs forward on CPU: this checks the mask_mod and BlockMask wiring
    (the compiled kernel with backward is checked on CUDA below)."""
    gen = torch.Generator().manual_seed(5)
    for docs in (None, "random"):
        layout = AttentionLayout(mode, 8, 2, _docs(docs, 2, 8, gen))
        q, k, v = (t.detach() for t in _inputs(layout, 2, 4, 2, 8)[:3])  # no CPU backward
        out = flex_attend(q, k, v, layout, compile=False)
        ref = attend(q, k, v, layout, "dense")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,docs", [(m, None) for m in ATTENTION_MODES] + [("context_causal", "packed")])
def test_flex_compiled_cuda_matches_dense(mode, docs, dtype):
    L, B = 256, 16
    layout = AttentionLayout(mode, L, B, _docs(docs, 2, L, torch.Generator().manual_seed(6)))
    if layout.doc_ids is not None:
        layout.doc_ids = layout.doc_ids.cuda()
    q, k, v, g = (t.detach().cuda().requires_grad_(t.requires_grad) for t in _inputs(layout, 2, 8, 2, 64, dtype))
    flex = _run("flex", q, k, v, g, layout)
    exact = _run("dense", *(t.detach().float().requires_grad_() for t in (q, k, v)), g.float(), layout)
    # fp32: flash-style kernels on GPU (TF32 off by default for flex) agree to ~1e-5;
    # bf16: inputs/outputs carry 8 mantissa bits, so compare with the fp32 result at ~bf16 ulps.
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), exact, flex):
        torch.testing.assert_close(b.float(), a, **tol, msg=f"{name} {mode} {dtype}")
