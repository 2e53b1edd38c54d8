"""Mapping kinds: how one megablock parameter relates to Hugging Face tensors and how it shards.

Each family file lists its parameters as instances of these kinds (Megatron-Bridge style). One list
serves both directions:

- import: `to_megablock(get)` builds the full (unsharded) megablock tensor from HF tensors
  (`get(hf_name)` returns one HF tensor), `split(full, tp, rank, cfg)` cuts a TP rank's shard;
- export: `merge(shards, cfg)` rebuilds the full tensor, `to_hf(full, cfg)` gives the HF tensors.

`split` and `merge` are also what `format.load_full_state_dict` / `format.shard_state_dict` use to
reshard a checkpoint, so the sharding rules live here and nowhere else. Every method is plain
torch (cat / reshape / chunk) and works on meta tensors, which is how shapes are planned before
any data is read.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Getter = Callable[[str], torch.Tensor]


class Mapping:
    """Base kind: one megablock tensor <-> one HF tensor, replicated over TP.

    `megablock` and the HF names may contain `{i}`: the global layer index. `when` decides from the
    ModelConfig whether the parameter exists at all (e.g. only Qwen2 has a qkv bias).
    """

    def __init__(self, megablock: str, hf: str, when: Optional[Callable] = None):
        self.megablock = megablock
        self.hf = hf
        self.when = when

    # --- naming -------------------------------------------------------------------------------
    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megablock

    def hf_names(self) -> list[str]:
        """HF name templates this mapping reads/writes, in export order."""
        return [self.hf]

    def applies(self, cfg) -> bool:
        return self.when is None or bool(self.when(cfg))

    def bind(self, layer: Optional[int]) -> "Bound":
        return Bound(self, layer)

    # --- HF <-> full megablock tensor ------------------------------------------------------------
    def to_megablock(self, get: Getter, cfg, mean_rows=()) -> torch.Tensor:
        """`mean_rows`: vocabulary rows to initialise to the mean row (new tokens); vocab kinds only."""
        return get(self.hf)

    def to_hf(self, full: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
        return {self.hf: full}

    # --- full <-> TP shards ----------------------------------------------------------------------
    def split(self, full: torch.Tensor, tp: int, rank: int, cfg) -> torch.Tensor:
        return full

    def merge(self, shards: list[torch.Tensor], cfg) -> torch.Tensor:
        return shards[0]


class Direct(Mapping):
    """Replicated on every TP rank (norm weights): each rank holds the whole tensor."""


class ColumnParallel(Mapping):
    """Column-parallel linear: the output dimension (dim 0 of the weight, and the bias) is split in
    `tp` equal contiguous pieces; rank r holds rows [r*n/tp, (r+1)*n/tp)."""

    dim = 0

    def split(self, full, tp, rank, cfg):
        return full.chunk(tp, dim=self.dim)[rank].contiguous()

    def merge(self, shards, cfg):
        return torch.cat(shards, dim=self.dim)


class RowParallel(ColumnParallel):
    """Row-parallel linear (linear_proj, linear_fc2): the input dimension (dim 1) is split in `tp`
    equal contiguous pieces; the ranks' partial outputs are summed by an all-reduce."""

    dim = 1


class VocabParallel(ColumnParallel):
    """Vocabulary-parallel embedding / output layer: rows split over TP (dim 0).

    The megablock tensor has `cfg.padded_vocab_size(tp)` rows: the real vocabulary (`cfg.vocab_size`,
    which includes an added mask token) then zero padding so that every rank gets the same count.
    Import adds rows for tokens added to the tokenizer, sets `mean_rows` (the new mask token) to the
    mean of the source rows and pads; export strips the padding and keeps the mask row. A "full"
    tensor is padded for whichever TP it came from; `split` pads for the target TP.
    """

    def to_megablock(self, get, cfg, mean_rows=()):
        w = get(self.hf)
        full = w.new_zeros(cfg.padded_vocab_size(1), *w.shape[1:])  # one allocation: rows, new rows, padding
        full[: w.shape[0]] = w
        if mean_rows:
            mean = w.float().mean(dim=0).to(w.dtype)
            for r in mean_rows:
                full[r] = mean
        return full

    def to_hf(self, full, cfg):
        return {self.hf: full[: cfg.vocab_size]}

    def split(self, full, tp, rank, cfg):
        """Rank's rows of the vocabulary padded for `tp`, cut without re-padding the whole tensor."""
        n = cfg.padded_vocab_size(tp) // tp
        lo = min(rank * n, cfg.vocab_size)
        piece = full[lo: min((rank + 1) * n, cfg.vocab_size)]
        if piece.shape[0] == n:
            return piece.contiguous()
        return torch.cat([piece, piece.new_zeros(n - piece.shape[0], *piece.shape[1:])])


class QKVFused(ColumnParallel):
    """Fused q/k/v projection in Megatron's grouped layout, column-parallel.

    For each KV head g the rows are [q heads of group g (hq/hkv heads x d rows); k head g; v head g],
    concatenated over groups: a dim-0 split over TP then hands every rank whole groups (needs
    hkv % tp == 0). Used for the weight [(hq+2hkv)*d, H] and, in Qwen2, the bias [(hq+2hkv)*d].
    """

    def __init__(self, megablock: str, q: str, k: str, v: str, when=None):
        super().__init__(megablock, q, when)
        self.q, self.k, self.v = q, k, v

    def hf_names(self):
        return [self.q, self.k, self.v]

    def to_megablock(self, get, cfg, mean_rows=()):
        hkv, d = cfg.num_kv_heads, cfg.head_dim
        q, k, v = get(self.q), get(self.k), get(self.v)
        rest = q.shape[1:]
        grouped = torch.cat(
            [q.reshape(hkv, cfg.heads_per_group * d, *rest), k.reshape(hkv, d, *rest), v.reshape(hkv, d, *rest)],
            dim=1,
        )
        return grouped.reshape(-1, *rest)

    def to_hf(self, full, cfg):
        hkv, d, hpg = cfg.num_kv_heads, cfg.head_dim, cfg.heads_per_group
        rest = full.shape[1:]
        q, k, v = full.reshape(hkv, (hpg + 2) * d, *rest).split([hpg * d, d, d], dim=1)
        return {
            self.q: q.reshape(-1, *rest).contiguous(),
            self.k: k.reshape(-1, *rest).contiguous(),
            self.v: v.reshape(-1, *rest).contiguous(),
        }


class GatedMLP(Mapping):
    """SwiGLU gate/up projections fused into linear_fc1, column-parallel per half.

    Full tensor (TP=1) is [gate; up] ([2I, H]). TP rank r holds [gate rows r*I/tp..(r+1)*I/tp;
    up rows of the same range], so each rank computes silu(gate) * up for its own slice and
    linear_fc2 (row-parallel) consumes it without communication.
    """

    def __init__(self, megablock: str, gate: str, up: str, when=None):
        super().__init__(megablock, gate, when)
        self.gate, self.up = gate, up

    def hf_names(self):
        return [self.gate, self.up]

    def to_megablock(self, get, cfg, mean_rows=()):
        return torch.cat([get(self.gate), get(self.up)])

    def to_hf(self, full, cfg):
        gate, up = full.chunk(2)
        return {self.gate: gate.contiguous(), self.up: up.contiguous()}

    def split(self, full, tp, rank, cfg):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])

    def merge(self, shards, cfg):
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


class Bound:
    """A mapping bound to one layer index: concrete megablock and HF names."""

    def __init__(self, mapping: Mapping, layer: Optional[int]):
        self.mapping, self.layer = mapping, layer
        self.name = self._fmt(mapping.megablock)

    def _fmt(self, template: str) -> str:
        return template.replace("{i}", str(self.layer)) if self.layer is not None else template

    def hf_names(self) -> list[str]:
        return [self._fmt(t) for t in self.mapping.hf_names()]

    def to_megablock(self, get: Getter, cfg, mean_rows=()) -> torch.Tensor:
        return self.mapping.to_megablock(lambda t: get(self._fmt(t)), cfg, mean_rows)

    def to_hf(self, full: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
        return {self._fmt(k): v for k, v in self.mapping.to_hf(full, cfg).items()}

    def split(self, full, tp, rank, cfg):
        return self.mapping.split(full, tp, rank, cfg)

    def merge(self, shards, cfg):
        return self.mapping.merge(shards, cfg)
