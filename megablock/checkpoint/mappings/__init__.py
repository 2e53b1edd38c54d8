"""Declarative HF <-> megablock parameter mappings, one small file per model family.

Adding a family: write `<name>.py` defining `FAMILY = Family(...)` (usually `decoder_mappings()`
plus what differs) and list it in `_FAMILIES` below: every list of families (FAMILY_NAMES,
SUPPORTED_HF_CLASSES, the tests' parametrisations) derives from that one registry.
"""
from __future__ import annotations

from . import llama, mistral, qwen2, qwen3
from .family import Family, UnsupportedModel, read_rope
from .kinds import Bound, ColumnParallel, Direct, GatedMLP, Mapping, QKVFused, RowParallel, VocabParallel

_FAMILIES = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY)}
FAMILY_NAMES = tuple(_FAMILIES)
SUPPORTED_HF_CLASSES = tuple(f.hf_class for f in _FAMILIES.values())


def get_family(arch: str) -> Family:
    """Family by ModelConfig.arch."""
    if arch not in _FAMILIES:
        raise UnsupportedModel(f"unknown architecture {arch!r}; supported: {', '.join(_FAMILIES)}")
    return _FAMILIES[arch]


def family_for_hf_config(raw: dict) -> Family:
    """Family of an HF config.json dict, from `model_type` (or `architectures`)."""
    model_type = raw.get("model_type")
    for f in _FAMILIES.values():
        if model_type == f.model_type:
            return f
    for f in _FAMILIES.values():
        if f.hf_class in (raw.get("architectures") or []):
            return f
    found = model_type or raw.get("architectures")
    raise UnsupportedModel(
        f"unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_HF_CLASSES)}"
    )


__all__ = [
    "Bound", "ColumnParallel", "Direct", "Family", "GatedMLP", "Mapping", "QKVFused", "RowParallel",
    "UnsupportedModel", "VocabParallel", "family_for_hf_config", "get_family", "read_rope",
    "FAMILY_NAMES", "SUPPORTED_HF_CLASSES",
]
