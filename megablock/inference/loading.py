"""Load a model for sampling and evaluation: a megablock checkpoint, an HF folder, or an HF model
object.

Every path ends in a `BlockDiffusionLM` holding this process's TP shard (pp = 1) plus what the
sampler and the evaluation need to know about the model: its mask token, the block size and
attention it was trained with, whether it uses token shift, its EOS ids and its tokenizer.

HF folders are read through the same declarative mappings `tools/convert_hf.py` uses
(megablock.checkpoint.loading.model_from_hf_tensors), in memory: no checkpoint is written. An
exported folder carries `block_size`, `mask_token_id`, `diffusion_shift` and
`diffusion_attention` in its config.json; a plain AR model has no mask token and can only be
sampled at block size 1 (the sampler says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megablock.checkpoint import adapters
from megablock.checkpoint import format as fmt
from megablock.checkpoint.convert import FolderSource
from megablock.checkpoint.loading import model_from_hf_tensors, stage_shard
from megablock.checkpoint.mappings import family_for_hf_config
from megablock.model.transformer import BlockDiffusionLM
from megablock.parallel.state import ParallelInfo, current_parallel

from .sampler import BlockDiffusionSampler


@dataclass
class InferenceModel:
    model: BlockDiffusionLM
    tokenizer: object = None
    mask_token_id: Optional[int] = None
    trained_block_size: Optional[int] = None
    """Block size recorded with the weights (None: unknown, e.g. a plain HF model)."""
    shift: bool = True
    eos_token_ids: list = field(default_factory=list)
    pad_token_id: int = 0
    attention: str = "context_causal"
    """The attention the model was trained with (context_causal when not recorded, e.g. plain HF)."""

    def sampler(self) -> BlockDiffusionSampler:
        return BlockDiffusionSampler(self.model, self.mask_token_id, self.eos_token_ids, self.pad_token_id)


def _ids(*values) -> list:
    out = []
    for v in values:
        if v is None:
            continue
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return sorted({int(v) for v in out})


def _pad(tokenizer, eos: list) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return eos[0] if eos else 0


def from_hf_model(hf_model, mask_token_id: Optional[int] = None, dtype=torch.float32,
                  parallel: Optional[ParallelInfo] = None) -> InferenceModel:
    """From an in-memory HF causal LM (tests, benchmarks). `mask_token_id` picks an existing token
    as the mask (e.g. to exercise block decoding on an untrained model)."""
    parallel = parallel or current_parallel()
    raw = hf_model.config.to_dict()
    cfg = family_for_hf_config(raw).model_config(hf_model.config, raw)
    cfg.mask_token_id = mask_token_id
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = model_from_hf_tensors(cfg, state.__getitem__, parallel, dtype)
    gen = getattr(hf_model, "generation_config", None)
    eos = _ids(cfg.eos_token_id, getattr(gen, "eos_token_id", None))
    return InferenceModel(model, None, mask_token_id, None, True, eos, _pad(None, eos))


def load_hf_folder(path, dtype=torch.float32, parallel: Optional[ParallelInfo] = None) -> InferenceModel:
    """An HF folder of a supported family (plain, or exported by tools/export_hf.py)."""
    parallel = parallel or current_parallel()
    src = FolderSource.open(path)
    raw = src.raw_config
    cfg = family_for_hf_config(raw).model_config(src.hf_config, raw)
    cfg.mask_token_id = raw.get("mask_token_id")
    model = model_from_hf_tensors(cfg, src.get, parallel, dtype)
    tokenizer = src.load_tokenizer() if src.load_tokenizer else None
    gen = src.generation_config or {}
    eos = _ids(cfg.eos_token_id, gen.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None))
    return InferenceModel(
        model, tokenizer, cfg.mask_token_id, raw.get("block_size"), bool(raw.get("diffusion_shift", True)),
        eos, _pad(tokenizer, eos), raw.get("diffusion_attention") or "context_causal",
    )


def load_checkpoint(path, dtype=torch.float32, parallel: Optional[ParallelInfo] = None) -> InferenceModel:
    """A megablock checkpoint (converted or from training; LoRA adapters merged, a gated drafter's
    attached, gated) saved at any TP x PP; resharded in memory when the saved layout differs from
    `parallel`'s TP (pp = 1)."""
    parallel = parallel or current_parallel()
    ckpt = fmt.Checkpoint.open(path)
    meta, cfg = ckpt.meta, ckpt.meta.model
    model = BlockDiffusionLM(cfg, parallel, dtype=dtype, initialize=False)
    # The same reader as training's init_from: resharded when the layout differs, and a LoRA
    # checkpoint's adapters merged into the weights; a gated drafter's stay apart, gated.
    model.load_weights({k: v.to(dtype) for k, v in stage_shard(ckpt, parallel, merge_lora=not meta.gated).items()})
    if meta.gated:
        adapters.attach_adapters(model, ckpt)
    tokenizer = None
    if (ckpt.path / fmt.TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path / fmt.TOKENIZER_DIR))
    gen = meta.generation_config or {}
    eos = _ids(cfg.eos_token_id, gen.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None))
    return InferenceModel(model.eval(), tokenizer, meta.mask_token_id, meta.block_size, meta.shift, eos,
                          _pad(tokenizer, eos), meta.attention)


def load(ckpt=None, hf_dir=None, dtype: str = "fp32", parallel: Optional[ParallelInfo] = None,
         drafter=None) -> InferenceModel:
    """Exactly one of `ckpt` / `hf_dir`; clear errors for a missing folder or a bad dtype. The
    model is moved to `parallel.device` (default: the current layout's) and put in eval mode.
    `drafter`: a drafter folder (tools/export_hf.py of a lora.scope=noised run) attached, gated,
    to the `hf_dir` base."""
    parallel = parallel or current_parallel()
    if (ckpt is None) == (hf_dir is None):
        raise ValueError("pass exactly one of ckpt or hf_dir")
    if dtype not in fmt.DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(fmt.DTYPES)}")
    folder = Path(ckpt if ckpt is not None else hf_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{'checkpoint' if ckpt is not None else 'HF model'} folder {folder} does not exist")
    if drafter is not None and hf_dir is None:
        raise ValueError("--drafter goes with --hf-dir (the base folder it was exported with); a checkpoint "
                         "given with --ckpt carries its own adapters")
    loader = load_checkpoint if ckpt is not None else load_hf_folder
    im = loader(folder, fmt.DTYPES[dtype], parallel)
    if drafter is not None:
        if not Path(drafter).is_dir():
            raise FileNotFoundError(f"drafter folder {drafter} does not exist")
        settings, full = adapters.read_drafter(drafter, im.model.cfg)
        adapters.attach_full_adapters(im.model, settings, full, drafter)
    im.model.to(parallel.device).eval()
    return im
