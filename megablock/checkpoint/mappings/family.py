"""A model family: its parameter mappings plus the HF config <-> ModelConfig translation.

The shared part of the config translation lives here; a family file only says what differs
(e.g. Qwen2's qkv bias, Mistral's sliding window). Entries of the source config.json that
megablock does not model are kept verbatim in `ModelConfig.extra_hf_config` and written back on
export, so an exported config.json reproduces the source one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from megablock.model.config import ModelConfig

from .kinds import Bound, Mapping

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# HF config keys the shared translation consumes (read into ModelConfig fields, written back from them).
COMMON_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
}

# Block-diffusion settings an export adds to config.json; re-read into megablock.json, not kept as extras.
DIFFUSION_KEYS = {"block_size", "mask_token_id", "diffusion_shift", "diffusion_attention"}


class UnsupportedModel(ValueError):
    """The source uses a feature the megablock decoder does not implement."""


def read_rope(hf) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling-without-theta or None) from an HF config object.

    transformers 5 keeps both in `config.rope_parameters` ({"rope_theta", "rope_type", ...}) and
    normalises v4-style config.json files (top-level rope_theta + rope_scaling with "type") into it.
    """
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None)
    if not params and legacy:
        params = dict(legacy)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(hf, "rope_theta", None) or 10000.0
    legacy_type = params.pop("type", None)
    rope_type = params.pop("rope_type", None) or legacy_type or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default" and not params:
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **params}


@dataclass
class Family:
    name: str
    """ModelConfig.arch."""
    model_type: str
    """HF config `model_type`."""
    hf_class: str
    """HF causal-LM class written to `architectures` on export."""
    mappings: list[Mapping]
    """Per-model mappings (no `{i}`) and per-layer ones (with `{i}`), in export order."""
    family_keys: set = field(default_factory=set)
    """HF config keys this family consumes beyond COMMON_KEYS."""
    from_hf: Optional[Callable] = None
    """hf_config -> dict of extra ModelConfig fields (and raises UnsupportedModel for what we lack)."""
    to_hf: Optional[Callable] = None
    """ModelConfig -> dict of family-specific HF config entries."""
    hf_has_head_dim: bool = True
    """Whether the HF config class always carries head_dim (Qwen2's does not)."""

    # --- parameters ----------------------------------------------------------------------------
    def params(self, cfg: ModelConfig, layers=None) -> list[Bound]:
        """All megablock parameters of `cfg` (or of the given global layers plus the non-layer ones
        placed around them), in canonical order: embedding, layers, final norm, output layer."""
        layers = range(cfg.num_layers) if layers is None else layers
        live = [m for m in self.mappings if m.applies(cfg)]
        head = [m.bind(None) for m in live if not m.per_layer and m.megablock.startswith("embedding")]
        tail = [m.bind(None) for m in live if not m.per_layer and not m.megablock.startswith("embedding")]
        body = [m.bind(i) for i in layers for m in live if m.per_layer]
        return head + body + tail

    def find(self, name: str, cfg: ModelConfig) -> Bound:
        """The bound mapping of megablock parameter `name` (any layer index)."""
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "layers" else None
        template = ".".join(["layers", "{i}"] + parts[2:]) if layer is not None else name
        for m in self.mappings:
            if m.megablock == template:
                return m.bind(layer)
        raise KeyError(f"{name!r} is not a parameter of the {self.name} family")

    # --- config --------------------------------------------------------------------------------
    def model_config(self, hf, raw: dict) -> ModelConfig:
        """ModelConfig from an HF config object (values with class defaults filled in) and the raw
        config.json dict (for the verbatim extras)."""
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"hidden_act={act!r} is not supported (megablock's MLP is SwiGLU with silu)")
        if getattr(hf, "mlp_bias", False):
            raise UnsupportedModel("mlp_bias=True is not supported (megablock's MLP has no bias)")
        heads = hf.num_attention_heads
        theta, scaling = read_rope(hf)
        fields = dict(
            arch=self.name,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_attention_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_id=getattr(hf, "eos_token_id", None),
        )
        if self.from_hf:
            fields.update(self.from_hf(hf))
        keys = COMMON_KEYS | DIFFUSION_KEYS | self.family_keys
        extra = {k: v for k, v in raw.items() if k not in keys}
        return ModelConfig(**fields, extra_hf_config=extra)

    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json entries for `cfg`: the verbatim extras, then every modeled field."""
        out = dict(cfg.extra_hf_config)
        rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
        out.update(
            architectures=[self.hf_class],
            model_type=self.model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_kv_heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
        )
        if self.hf_has_head_dim or cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            out["head_dim"] = cfg.head_dim
        if self.to_hf:
            out.update(self.to_hf(cfg))
        return dict(sorted(out.items()))


def no_attention_bias(hf) -> dict:
    """Llama / Qwen3 / Mistral: `attention_bias` would put a bias on o_proj too, which megablock lacks."""
    if getattr(hf, "attention_bias", False):
        raise UnsupportedModel("attention_bias=True is not supported (no bias on the attention projections)")
    return {}


def no_qwen_sliding_window(hf) -> dict:
    """Qwen2/Qwen3 ship `sliding_window` but only use it with use_sliding_window=True."""
    if getattr(hf, "use_sliding_window", False):
        raise UnsupportedModel("use_sliding_window=True is not supported for Qwen models; set it to false")
    return {}
