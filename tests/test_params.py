"""The one parameter / FLOP counter (megablock.model.params) against references: HF's own count,
a hand count, and the tensors the ranks of TP = 2 and PP = 2 layouts actually hold; MFU from it."""
import pytest
import torch

from megablock.checkpoint.mappings import family_for_hf_config
from megablock.config import LoraSection
from megablock.model.params import parameter_count, training_flops
from megablock.testing import FAMILIES, run_distributed, tiny_hf_model
from megablock.training.trainer import mfu


def _cfg(family, **overrides):
    hf = tiny_hf_model(family, **overrides)
    raw = hf.config.to_dict()
    return hf, family_for_hf_config(raw).model_config(hf.config, raw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_count_equals_hf_num_parameters(family, tied):
    hf, cfg = _cfg(family, tie_word_embeddings=tied)
    assert parameter_count(cfg) == (hf.num_parameters(), hf.num_parameters())


def test_hand_count_tiny_llama_tied():
    _, cfg = _cfg("llama", tie_word_embeddings=True)
    h, v, i, d = 64, 320, 96, 16
    per_layer = 2 * h + (4 + 2 * 2) * d * h + 4 * d * h + 2 * i * h + i * h
    assert parameter_count(cfg)[1] == v * h + 2 * per_layer + h == 82240


def _live_count(rank, world, tp, pp):
    """What the ranks hold, counted the way a user would by hand: TP-sharded tensors summed over
    the TP ranks, replicated ones once, the last stage's copy of a tied embedding not at all, and
    the vocabulary padding rows left out."""
    import torch.distributed as dist

    from megablock.model.transformer import BlockDiffusionLM
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(tp, pp)
    _, cfg = _cfg("llama", tie_word_embeddings=True)
    model = BlockDiffusionLM(cfg, info)
    local = 0
    for name, p in model.named_parameters():
        if name == "embedding.weight" and not model.pre_process:
            continue
        if getattr(p, "tensor_model_parallel", False) or info.tp_rank == 0:
            local += p.numel()
    count = torch.tensor([float(local)])
    dist.all_reduce(count)
    padding = (model.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size
    return int(count.item()) - padding, parameter_count(cfg)[1]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_count_matches_what_tp2_and_pp2_ranks_hold_with_tied_embeddings(tp, pp):
    for live, counted in run_distributed(_live_count, 2, tp, pp):
        assert live == counted == 82240


def test_lora_trainable_count_equals_the_adapters_built():
    from megablock.model.lora import apply_lora
    from megablock.model.transformer import BlockDiffusionLM
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    _, cfg = _cfg("qwen3")
    cfg.mask_token_id = 5
    lora = LoraSection(enabled=True, rank=4, target_modules=["linear_qkv", "linear_fc2"], train_norms=True)
    model = BlockDiffusionLM(cfg)
    apply_lora(model, lora)
    padding = (model.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size * 2  # untied: embedding and head
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) - padding
    assert parameter_count(cfg, lora) == (trainable, total)


def test_mfu_from_the_count():
    _, cfg = _cfg("llama")
    n = parameter_count(cfg)[1]
    tokens, L, h, layers = 2 * 64, 64, 64, 2
    # 6 N per token, plus attention scores: ~2x an AR pass over L for the two-half layout.
    assert training_flops(cfg, tokens, L, two_halves=True) == 6 * n * tokens + 12 * layers * h * L * tokens
    assert training_flops(cfg, tokens, L, two_halves=False) == 6 * n * tokens + 6 * layers * h * L * tokens
    assert mfu(4e12, seconds=2.0, peak_flops=1e12, world_size=4) == 0.5
    assert mfu(4e12, seconds=2.0, peak_flops=None, world_size=4) is None  # unknown device: not logged
