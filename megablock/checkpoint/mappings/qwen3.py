"""Qwen3 (dense): the Llama decoder plus per-head RMSNorm on queries and keys; explicit head_dim."""
from .family import Family, no_attention_bias, no_qwen_sliding_window
from .kinds import Direct
from .llama import L, decoder_mappings

FAMILY = Family(
    name="qwen3",
    model_type="qwen3",
    hf_class="Qwen3ForCausalLM",
    mappings=decoder_mappings(extra_layer=[
        Direct("layers.{i}.self_attention.q_layernorm.weight", L + "self_attn.q_norm.weight"),
        Direct("layers.{i}.self_attention.k_layernorm.weight", L + "self_attn.k_norm.weight"),
    ]),
    from_hf=lambda hf: {**no_attention_bias(hf), **no_qwen_sliding_window(hf), "qk_norm": True},
)
