"""The megablock model against Hugging Face (same weights), and TP = 2 against TP = 1."""
import pytest
import torch

from megablock.checkpoint.convert import convert
from megablock.checkpoint.format import read_metadata
from megablock.diffusion.batch import build_batch
from megablock.diffusion.layout import AttentionLayout
from megablock.diffusion.loss import block_diffusion_loss
from megablock.testing import FAMILIES, run_distributed, save_tiny_hf_model

L = 16


def _convert(tmp_path, family, **overrides):
    hf = save_tiny_hf_model(tmp_path / f"hf_{family}", family, **overrides)
    convert(tmp_path / f"mb_{family}", hf_dir=tmp_path / f"hf_{family}", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    return hf, tmp_path / f"mb_{family}"


def _batch(tokens, block_size, mask_id, attention="context_causal"):
    return build_batch(tokens, torch.arange(tokens.shape[0]), block_size, mask_token_id=mask_id, attention=attention, seed=3)


def _loss(model, batch, ar_weight=0.0):
    logits = model(batch.input_ids, batch.position_ids, batch.layout)
    return block_diffusion_loss(logits, batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, ar_weight)


@pytest.fixture(scope="module")
def single_process():
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_size_one_equals_hf_ar_loss(tmp_path, family, single_process):
    from megablock.checkpoint.loading import load_model

    hf, ckpt = _convert(tmp_path, family)
    model, meta = load_model(ckpt)
    tokens = torch.randint(0, 300, (2, L), generator=torch.Generator().manual_seed(0))
    ref = hf(tokens, labels=tokens)

    # The AR forward reproduces HF's logits over the original vocabulary.
    logits = model(tokens, torch.arange(L).expand(2, L), AttentionLayout("ar", L, 1))
    assert torch.allclose(logits[..., : hf.config.vocab_size], ref.logits, atol=1e-5)

    # With shift and B = 1 the block-diffusion loss is exactly the AR loss (fp32 rounding only).
    parts = _loss(model, _batch(tokens, 1, meta.mask_token_id), ar_weight=0.5)
    assert abs(parts.diffusion_loss.item() - ref.loss.item()) < 1e-5
    assert abs(parts.ar_loss.item() - ref.loss.item()) < 1e-5

    # With context-causal attention the clean half of a two-half input is an AR pass.
    batch = _batch(tokens, 4, meta.mask_token_id)
    two_half = model(batch.input_ids, batch.position_ids, batch.layout)
    assert torch.allclose(two_half[:, L:, : hf.config.vocab_size], ref.logits, atol=1e-5)


def _tp_worker(rank, world, ckpt_dirs, block_size):
    from megablock.checkpoint.mappings import get_family
    from megablock.checkpoint.loading import load_model
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(world, 1)
    out = {}
    for ckpt in ckpt_dirs:
        model, meta = load_model(ckpt, info)
        tokens = torch.randint(0, 300, (2, L), generator=torch.Generator().manual_seed(1))
        parts = _loss(model, _batch(tokens, block_size, meta.mask_token_id), ar_weight=0.5)
        parts.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        # Gather every rank's shards and merge them with the conversion mappings.
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, grads)
        family = get_family(model.cfg.arch)
        full = {n: family.find(n, model.cfg).merge([g[n] for g in gathered], model.cfg) for n in grads}
        out[str(ckpt)] = (parts.loss.item(), parts.diffusion_loss.item(), full, model.cfg.vocab_size)
    return out


@pytest.mark.parametrize("block_size", [4])
def test_tensor_parallel_matches_single_process(tmp_path, block_size):
    # qwen3 covers q/k norms on head shards (their grads are summed over TP), qwen2 the qkv bias,
    # llama tied embeddings through the vocab-parallel head.
    ckpts = [_convert(tmp_path, "qwen3")[1], _convert(tmp_path, "qwen2")[1],
             _convert(tmp_path, "llama", tie_word_embeddings=True)[1]]
    one = run_distributed(_tp_worker, 1, ckpts, block_size)[0]
    two = run_distributed(_tp_worker, 2, ckpts, block_size)[0]
    for key in one:
        loss1, diff1, grads1, vocab = one[key]
        loss2, diff2, grads2, _ = two[key]
        # Row-parallel layers sum partial products in a different order: fp32 rounding only.
        assert abs(loss1 - loss2) < 1e-5 and abs(diff1 - diff2) < 1e-5, key
        for name, g1 in grads1.items():
            g2 = grads2[name]
            if name in ("embedding.weight", "output_layer.weight"):  # vocab padding differs by TP
                g1, g2 = g1[:vocab], g2[:vocab]
            assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4), f"{key}: {name}"


def test_model_builds_without_a_process_group():
    """The layout is passed in, not read from megatron's globals: a pipeline stage of the model
    builds in a process that never started torch.distributed, with exactly its checkpoint names."""
    import subprocess
    import sys

    code = """
import torch.distributed as dist
from megablock.checkpoint.format import shard_shapes
from megablock.model.config import ModelConfig
from megablock.model.transformer import BlockDiffusionLM
from megablock.parallel.state import ParallelInfo

cfg = ModelConfig(num_layers=3, tie_word_embeddings=True, mask_token_id=5)
model = BlockDiffusionLM(cfg, ParallelInfo(world_size=2, rank=1, pp=2, pp_rank=1))
want = shard_shapes(cfg, 1, 2, 1)
got = {k: tuple(v.shape) for k, v in model.weights().items()}
assert got == want, (sorted(got), sorted(want))
assert not dist.is_initialized()
print("ok", sorted(got)[0], len(got))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok embedding.weight")  # the last stage holds the tied embedding's copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_hf_rotate_half(dtype):
    """apply_rope's hand-written forward and backward against HF's formula through autograd,
    on the transposed view of a [b, S, h, d] projection the attention passes it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from megablock.model.config import ModelConfig
    from megablock.model.rope import apply_rope, rope_cos_sin

    cfg = ModelConfig(hidden_size=48, num_attention_heads=3, num_kv_heads=1, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 3, 1, 7, 2, 40, 5, 6], [9, 8, 7, 6, 5, 4, 3, 2]])
    cos, sin = rope_cos_sin(cfg, pos, dtype)
    x = torch.randn(2, 8, 3, 16, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    grad = torch.randn(2, 3, 8, 16, generator=g).to(dtype)
    out = apply_rope(x, cos, sin)
    (dx,) = torch.autograd.grad(out, x, grad)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    (ref_dx,) = torch.autograd.grad(ref, x, grad)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)
    assert out.dtype == dx.dtype == dtype


def test_tied_embedding_gradient_is_the_dense_one(single_process):
    """A tied one-stage model at TP = 1 takes the lookup's gradient sparse on CPU (layers.VocabEmbedding);
    the weight's accumulated .grad is dense and equals megatron's dense path."""
    from megablock.model.config import ModelConfig
    from megablock.model.transformer import BlockDiffusionLM

    torch.manual_seed(0)
    model = BlockDiffusionLM(ModelConfig(tie_word_embeddings=True, mask_token_id=319))
    assert model.embedding.sparse_grad
    assert not BlockDiffusionLM(ModelConfig()).embedding.sparse_grad  # untied: nothing to add into
    tokens = torch.randint(0, 300, (2, L), generator=torch.Generator().manual_seed(1))
    tokens[0, :4] = 7  # repeated ids: their rows' contributions must sum
    batch = _batch(tokens, 4, 319)
    (lookup_grad,) = torch.autograd.grad(model.embed(tokens).sum(), model.embedding.weight)
    assert lookup_grad.is_sparse
    grads = []
    for sparse in (True, False):
        model.embedding.sparse_grad = sparse
        model.zero_grad(set_to_none=True)
        _loss(model, batch, ar_weight=1.0).loss.backward()
        assert not model.embedding.weight.grad.is_sparse
        grads.append(model.embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
