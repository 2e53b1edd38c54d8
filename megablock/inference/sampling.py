"""Token choice and the commit rule of parallel decoding, as pure functions.

Kept apart from the sampler loop so the KV-cached sampler and the slow reference sampler in the
tests make their decisions with the same code: a test comparing them then checks the cache and
the attention, not two copies of the policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """How a token is drawn from a logit row.

    temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature), restricted to the
    `top_k` most likely tokens and then to the smallest set whose probability reaches `top_p`,
    renormalised, and sampled with the sampler's seeded generator.
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to [n, V] float logits (removed entries -inf)."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of [n, V] logits; returns (tokens [n], confidence [n]).

    The confidence is the probability of the chosen token under the distribution it was drawn
    from: the max probability when greedy; when sampling, a token drawn from the tail has low
    confidence and is not committed early just because another token was likely.
    """
    logits = logits.float()
    if params.temperature == 0:
        probs = logits.softmax(-1)
        conf, tokens = probs.max(-1)
        return tokens, conf
    probs = filter_logits(logits, params).softmax(-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def select_commits(
    confidence: torch.Tensor,
    todo: torch.Tensor,
    threshold: Optional[float] = None,
    tokens_per_step: Optional[int] = None,
) -> torch.Tensor:
    """Which still-masked positions of each row's block to commit this step.

    confidence [b, B] float, todo [b, B] bool (masked positions that still need a token).
    With `tokens_per_step` K: the K most confident todo positions (all if fewer remain).
    Otherwise every todo position whose confidence is strictly above `threshold`, and always the
    most confident one, so a step never commits nothing (threshold 1.0 therefore means exactly one
    token per step, even when a probability rounds to 1.0). Ties go to the leftmost position.
    """
    conf = confidence.masked_fill(~todo, float("-inf"))
    if tokens_per_step is not None:
        order = conf.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
        return (rank < tokens_per_step) & todo
    best = torch.zeros_like(todo).scatter_(-1, conf.argmax(-1, keepdim=True), True)
    return ((conf > threshold) | best) & todo
