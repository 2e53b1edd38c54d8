"""Mistral: the Llama decoder with an optional sliding attention window (modeled)."""
from .family import Family, no_attention_bias
from .llama import decoder_mappings

FAMILY = Family(
    name="mistral",
    model_type="mistral",
    hf_class="MistralForCausalLM",
    mappings=decoder_mappings(),
    family_keys={"sliding_window"},
    from_hf=lambda hf: {**no_attention_bias(hf), "sliding_window": getattr(hf, "sliding_window", None)},
    to_hf=lambda cfg: {"sliding_window": cfg.sliding_window},
)
