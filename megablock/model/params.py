"""The one parameter and FLOP count of a model, from its architecture alone.

Counting from the config (not from the live tensors of a rank) makes the number the same for
every TP x PP layout by construction: nothing is counted once per TP rank, a tied embedding is
counted once although the first and last pipeline stages both hold it, and the vocabulary is the
real one (the padding rows that make it split over TP are never trained or exported).
"""
from __future__ import annotations

from typing import Optional

from megablock.config import LoraSection, options, LoraTarget
from megablock.model.config import ModelConfig


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder-layer linear, by LoRA target name."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {
        "linear_qkv": (h, (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * d),
        "linear_proj": (cfg.num_attention_heads * d, h),
        "linear_fc1": (h, 2 * cfg.intermediate_size),
        "linear_fc2": (cfg.intermediate_size, h),
    }


def _norm_parameters(cfg: ModelConfig) -> int:
    per_layer = 2 * cfg.hidden_size + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return cfg.num_layers * per_layer + cfg.hidden_size


def parameter_count(cfg: ModelConfig, lora: Optional[LoraSection] = None) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model; with `lora` enabled the adapters are
    added to the total and only they (and what the section also trains) are trainable."""
    shapes = _linear_shapes(cfg)
    linears = sum(i * o for i, o in shapes.values())
    if cfg.qkv_bias:
        linears += shapes["linear_qkv"][1]
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    base = embeddings + cfg.num_layers * linears + _norm_parameters(cfg)
    if lora is None or not lora.enabled:
        return base, base
    assert set(lora.target_modules) <= set(options(LoraTarget))
    trainable = cfg.num_layers * sum(lora.rank * sum(shapes[t]) for t in lora.target_modules)
    if lora.train_mask_token_row and cfg.mask_token_id is not None:
        trainable += cfg.hidden_size
    adapters_only = trainable
    if lora.train_norms:
        trainable += _norm_parameters(cfg)
    return trainable, base + adapters_only


def training_flops(cfg: ModelConfig, tokens_in_model: int, seq_len: int, two_halves: bool) -> float:
    """FLOPs of one training step over `tokens_in_model` input tokens (2L per sample for the
    two-half layouts): 6 per parameter per token, plus the attention scores, which the
    structured mask keeps at ~2x an AR pass over L for a two-half step (half a dense 2L x 2L)."""
    _, total = parameter_count(cfg)
    attention = 12 * cfg.num_layers * cfg.hidden_size * seq_len * tokens_in_model / (1 if two_halves else 2)
    return 6.0 * total * tokens_in_model + attention
