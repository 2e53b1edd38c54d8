"""Architecture of the one decoder family megablock trains (Llama, Qwen2, Qwen3, Mistral)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

    arch: str = "llama"
    """Source family (megablock.checkpoint.mappings.FAMILY_NAMES), used by conversion and export;
    the decoder itself is the same for every family."""
    vocab_size: int = 320
    """Real vocabulary size (including an added mask token); padding is never exported."""
    hidden_size: int = 64
    intermediate_size: int = 96
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    """Key/value heads (GQA); divides num_attention_heads and is divided by the TP size."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads (Qwen3 sets it explicitly)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    """HF `rope_parameters` / `rope_scaling` minus rope_theta: {"rope_type": "llama3" | "linear" |
    "dynamic" | "default", "factor": ..., ...}; None is plain RoPE."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE (Qwen3)."""
    sliding_window: Optional[int] = None
    """Mistral's sliding window; training requires seq_len <= window (checked at load)."""
    mask_token_id: Optional[int] = None
    """Id of the diffusion mask token; None until a mask token is added or chosen."""
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    init_std: float = 0.02
    """Std of the normal init for training from scratch."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the TP size (Megatron's convention)."""
    extra_hf_config: dict = field(default_factory=dict)
    """Source config.json entries megablock does not model, written back verbatim on export."""

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_kv_heads={self.num_kv_heads}"
            )

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise a ValueError naming the setting and the fix when TP/PP cannot split this model."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.num_kv_heads % tp:
            problems.append(f"num_kv_heads={self.num_kv_heads}")
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            raise ValueError(
                f"tensor parallel size {tp} does not divide {', '.join(problems)}; "
                f"choose a TP size that divides them"
            )
        if pp > self.num_layers:
            raise ValueError(
                f"pipeline parallel size {pp} exceeds num_layers={self.num_layers}; use pp <= {self.num_layers}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


def stage_layer_ranges(num_layers: int, pp: int, layers_per_stage: Optional[list] = None) -> list[range]:
    """Contiguous global layer ranges owned by each pipeline stage.

    Even by default (earlier stages take the remainder, one layer each); `layers_per_stage`
    gives them explicitly, e.g. [7, 9] to lighten the first stage, which also holds the embedding.
    """
    if layers_per_stage is None:
        base, extra = divmod(num_layers, pp)
        layers_per_stage = [base + (1 if s < extra else 0) for s in range(pp)]
    if len(layers_per_stage) != pp or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
        raise ValueError(
            f"layers_per_stage={layers_per_stage} must list {pp} positive counts summing to "
            f"num_layers={num_layers}"
        )
    ranges, start = [], 0
    for n in layers_per_stage:
        ranges.append(range(start, start + n))
        start += n
    return ranges
