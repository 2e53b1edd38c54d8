"""One decoding measurement: AR, threshold and speculative decoding, and Hugging Face `generate`,
on the same prompts, each giving a `DecodeRecord`.

tools/evaluate.py (`--generate`), benchmarks/generate.py and the studies all measure through
`decode` / `hf_generate` / `measure`, so "tokens per forward", "kept drafts per block" and
"identical to AR" mean the same everywhere:
  - `decode(em, prompts, cfg)` runs megablock's sampler with `cfg` (a GenerateConfig: AR at
    block size 1, threshold decoding above; a SpeculativeConfig: lossless draft-and-verify).
    By default each prompt is decoded on its own (prompt i with seed cfg.seed + i): the samplers
    count the forwards of a whole batch, so a batch at B = 1 would report (batch) tokens per
    forward. `batched=True` decodes all prompts in one call (tokens per forward then per row).
  - `hf_generate` runs HF `generate` greedily on the same prompts for exactly max_new_tokens.
  - `measure` runs the model's own AR decoding first, then each config (and HF when given), and
    counts for each how many prompts decoded to exactly the AR tokens (lossless means all).
`clock` is the timer (time.perf_counter; time.process_time on a shared machine).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

import torch

from .loading import InferenceModel
from .sampler import GenerateConfig
from .speculative import AcceptanceStats, SpeculativeConfig, speculative_sampler

DecodeConfig = Union[GenerateConfig, SpeculativeConfig]


@dataclass
class DecodeRecord(AcceptanceStats):
    """What one decoder did on a list of prompts."""

    mode: str
    """ar | threshold | speculative | hf"""
    block_size: int
    tokens: list
    """New tokens per prompt (an EOS that ended a row included)."""
    forwards: Optional[int]
    """Model calls, summed over the decode calls (None for HF, which does not report them)."""
    seconds: float
    row_forwards: list = field(default_factory=list)
    """Forwards each prompt's row took part in (per-row tokens per forward)."""
    drafted: list = field(default_factory=list)
    """speculative: drafts checked in each verified block."""
    accepted: list = field(default_factory=list)
    """speculative: drafts kept in each verified block."""
    identical_to_ar: Optional[int] = None
    """Prompts whose tokens equal the model's AR decoding (`measure` sets it)."""

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_forward(self) -> Optional[float]:
        return None if self.forwards is None else self.new_tokens / max(self.forwards, 1)

    @property
    def row_tokens_per_forward(self) -> float:
        """Mean over prompts of new tokens / the row's forwards (tokens per forward at batch 1)."""
        return sum(len(t) / max(f, 1) for t, f in zip(self.tokens, self.row_forwards)) / max(len(self.tokens), 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)



def mode_of(cfg: DecodeConfig) -> str:
    if isinstance(cfg, SpeculativeConfig):
        return "speculative"
    return "ar" if cfg.block_size == 1 and cfg.shift else "threshold"


def decode(em: InferenceModel, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, *, batched: bool = False,
           clock: Callable[[], float] = time.perf_counter) -> DecodeRecord:
    """Decode `prompts` with megablock's sampler under `cfg` (module docstring)."""
    speculative = isinstance(cfg, SpeculativeConfig)
    sampler = speculative_sampler(em) if speculative else em.sampler()
    calls = [(list(prompts), cfg)] if batched else [([p], replace(cfg, seed=cfg.seed + i)) for i, p in enumerate(prompts)]
    record = DecodeRecord(mode_of(cfg), cfg.block_size, [], 0, 0.0)
    for batch, c in calls:
        start = clock()
        out = sampler.generate(batch, c)
        record.seconds += clock() - start
        record.tokens += out.tokens
        record.forwards += out.forwards
        record.row_forwards += out.row_forwards or [out.forwards] * len(out.tokens)
        if speculative:
            record.drafted += out.drafted
            record.accepted += out.accepted
    return record


@torch.inference_mode()
def hf_generate(hf_model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int = 0, *,
                clock: Callable[[], float] = time.perf_counter) -> DecodeRecord:
    """Greedy HF `generate` (its KV cache), each prompt alone, exactly `max_new_tokens` new tokens."""
    record = DecodeRecord("hf", 1, [], None, 0.0)
    for p in prompts:
        x = torch.tensor([list(p)])
        start = clock()
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
        record.seconds += clock() - start
        record.tokens.append(out[0, x.shape[1]:].tolist())
    return record


def measure(em: InferenceModel, prompts: Sequence[Sequence[int]], configs: dict, *, max_new_tokens: int,
            hf_model=None, batched: bool = False, clock: Callable[[], float] = time.perf_counter) -> dict:
    """{"ar": record, **{name: record for each config}, "hf": record if `hf_model`}: the model's
    own AR decoding first, then each decoder on the same prompts, each with `identical_to_ar`."""
    ar = decode(em, prompts, GenerateConfig(block_size=1, max_new_tokens=max_new_tokens, shift=em.shift),
                batched=batched, clock=clock)
    records = {"ar": ar, **{name: decode(em, prompts, cfg, batched=batched, clock=clock) for name, cfg in configs.items()}}
    if hf_model is not None:
        records["hf"] = hf_generate(hf_model, prompts, max_new_tokens, em.pad_token_id, clock=clock)
    for record in records.values():
        record.identical_to_ar = sum(a == b for a, b in zip(record.tokens, ar.tokens))
    return records
