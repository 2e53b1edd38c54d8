"""Qwen2 / Qwen2.5: the Llama decoder plus a bias on q/k/v (fused like the weight)."""
from .family import Family, no_qwen_sliding_window
from .kinds import QKVFused
from .llama import L, decoder_mappings

FAMILY = Family(
    name="qwen2",
    model_type="qwen2",
    hf_class="Qwen2ForCausalLM",
    mappings=decoder_mappings(extra_layer=[
        QKVFused(
            "layers.{i}.self_attention.linear_qkv.bias",
            q=L + "self_attn.q_proj.bias", k=L + "self_attn.k_proj.bias", v=L + "self_attn.v_proj.bias",
        ),
    ]),
    from_hf=lambda hf: {**no_qwen_sliding_window(hf), "qkv_bias": True},
    hf_has_head_dim=False,
)
