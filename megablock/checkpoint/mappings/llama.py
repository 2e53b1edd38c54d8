"""Llama (1/2/3, incl. llama3 rope scaling; tied or untied embeddings): HF <-> megablock names.

The other families reuse `decoder_mappings` and add what they differ in.
"""
from .family import Family, no_attention_bias
from .kinds import Direct, GatedMLP, QKVFused, RowParallel, VocabParallel

L = "model.layers.{i}."


def untied(cfg):
    return not cfg.tie_word_embeddings


def decoder_mappings(extra_layer=()):
    """The Llama-style decoder: embedding, per-layer attention and SwiGLU MLP, final norm, head."""
    return [
        VocabParallel("embedding.weight", "model.embed_tokens.weight"),
        Direct("layers.{i}.input_layernorm.weight", L + "input_layernorm.weight"),
        QKVFused(
            "layers.{i}.self_attention.linear_qkv.weight",
            q=L + "self_attn.q_proj.weight", k=L + "self_attn.k_proj.weight", v=L + "self_attn.v_proj.weight",
        ),
        *extra_layer,
        RowParallel("layers.{i}.self_attention.linear_proj.weight", L + "self_attn.o_proj.weight"),
        Direct("layers.{i}.pre_mlp_layernorm.weight", L + "post_attention_layernorm.weight"),
        GatedMLP("layers.{i}.mlp.linear_fc1.weight", gate=L + "mlp.gate_proj.weight", up=L + "mlp.up_proj.weight"),
        RowParallel("layers.{i}.mlp.linear_fc2.weight", L + "mlp.down_proj.weight"),
        Direct("final_layernorm.weight", "model.norm.weight"),
        VocabParallel("output_layer.weight", "lm_head.weight", when=untied),
    ]


FAMILY = Family(
    name="llama",
    model_type="llama",
    hf_class="LlamaForCausalLM",
    mappings=decoder_mappings(),
    from_hf=no_attention_bias,
)
