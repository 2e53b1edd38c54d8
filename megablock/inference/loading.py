"""Load a model for sampling: a megablock checkpoint, an HF folder, or an HF model object.

Every path ends in a `BlockDiffusionLM` holding this process's TP shard (pp = 1) plus what the
sampler needs to know about the model: its mask token, the block size it was trained at, whether
it uses token shift, its EOS ids and its tokenizer.

HF folders are read through the same declarative mappings `tools/convert_hf.py` uses
(megablock.checkpoint.mappings), in memory: no checkpoint is written. An exported folder carries
`block_size`, `mask_token_id` and `diffusion_shift` in its config.json; a plain AR model has no mask
token and can only be sampled at block size 1 (the sampler says so).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megablock.checkpoint import format as fmt
from megablock.checkpoint.mappings import family_for_hf_config, get_family
from megablock.model.config import ModelConfig
from megablock.model.transformer import BlockDiffusionLM
from megablock.parallel.state import initialize_parallel

from .sampler import BlockDiffusionSampler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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

    def sampler(self) -> BlockDiffusionSampler:
        return BlockDiffusionSampler(self.model, self.mask_token_id, self.eos_token_ids, self.pad_token_id)


def init_inference_parallel() -> None:
    """One process (TP = 1), or every launched process a TP rank (torchrun / deepspeed)."""
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    initialize_parallel(tp=tp, pp=1)


def run_inference_tool(run: Callable, args) -> int:
    """Runs a command-line tool's `run(args)` (tools/generate.py, tools/evaluate.py): a user error
    (EvaluationError, CheckpointError, a missing file, ...) becomes `error: ...` and exit code 2
    instead of a traceback. A process group the tool created is torn down; one that already
    existed (the tool called in-process, as the tests do) is kept."""
    import warnings

    import torch.distributed as dist

    from megablock.parallel.state import destroy_parallel

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    owns_world = not dist.is_initialized()
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_world:
            destroy_parallel()


def _ids(*values) -> list:
    out = []
    for v in values:
        if v is None:
            continue
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return sorted({int(v) for v in out})


def build_from_hf_tensors(cfg: ModelConfig, get: Callable[[str], torch.Tensor], dtype=torch.float32) -> BlockDiffusionLM:
    """A model holding this TP rank's shard, each tensor mapped from HF tensors (`get(name)`)."""
    family = get_family(cfg.arch)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    model = BlockDiffusionLM(cfg, dtype=dtype, initialize=False)
    shard = {}
    for name in model.weights():
        b = family.find(name, cfg)
        shard[name] = b.split(b.to_megablock(get, cfg), tp, rank, cfg).to(dtype)
    model.load_weights(shard)
    return model.eval()


def from_hf_model(hf_model, mask_token_id: Optional[int] = None, dtype=torch.float32) -> InferenceModel:
    """From an in-memory HF causal LM (tests, benchmarks). `mask_token_id` picks an existing token
    as the mask (e.g. to exercise block decoding on an untrained model)."""
    raw = hf_model.config.to_dict()
    cfg = family_for_hf_config(raw).model_config(hf_model.config, raw)
    cfg.mask_token_id = mask_token_id
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = build_from_hf_tensors(cfg, state.__getitem__, dtype)
    gen = getattr(hf_model, "generation_config", None)
    eos = _ids(cfg.eos_token_id, getattr(gen, "eos_token_id", None))
    return InferenceModel(model, None, mask_token_id, None, True, eos, _pad(None, eos))


def load_hf_folder(path, dtype=torch.float32) -> InferenceModel:
    """An HF folder of a supported family (plain, or exported by tools/export_hf.py)."""
    from megablock.checkpoint.convert import FolderSource

    src = FolderSource.open(path)
    raw = src.raw_config
    cfg = family_for_hf_config(raw).model_config(src.hf_config, raw)
    cfg.mask_token_id = raw.get("mask_token_id")
    model = build_from_hf_tensors(cfg, src.get, dtype)
    tokenizer = src.load_tokenizer() if src.load_tokenizer else None
    gen = src.generation_config or {}
    eos = _ids(cfg.eos_token_id, gen.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None))
    return InferenceModel(
        model, tokenizer, cfg.mask_token_id, raw.get("block_size"), bool(raw.get("diffusion_shift", True)),
        eos, _pad(tokenizer, eos),
    )


def load_checkpoint(path, dtype=torch.float32) -> InferenceModel:
    """A megablock checkpoint (converted or from training, LoRA adapters merged) saved at any
    TP x PP; resharded in memory when the saved layout differs from this run's TP (pp = 1)."""
    from megablock.model.loading import stage_shard

    ckpt = fmt.resolve_checkpoint(path)
    meta = fmt.read_metadata(ckpt)
    cfg = fmt.model_config(meta)
    model = BlockDiffusionLM(cfg, dtype=dtype, initialize=False)
    # The same reader as training's init_from: resharded when the layout differs, and a LoRA
    # checkpoint's adapters merged into the weights.
    model.load_weights({k: v.to(dtype) for k, v in stage_shard(ckpt, meta).items()})
    tokenizer = None
    if (ckpt / fmt.TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt / fmt.TOKENIZER_DIR))
    gen = meta.get("generation_config") or {}
    eos = _ids(cfg.eos_token_id, gen.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None))
    return InferenceModel(
        model.eval(), tokenizer, meta.get("mask_token_id", cfg.mask_token_id), meta.get("block_size"),
        bool(meta.get("shift", True)), eos, _pad(tokenizer, eos),
    )


def _pad(tokenizer, eos: list) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return eos[0] if eos else 0


def load(ckpt=None, hf_dir=None, dtype: str = "fp32") -> InferenceModel:
    """Exactly one of `ckpt` / `hf_dir`; clear errors for a missing folder or a bad dtype."""
    if (ckpt is None) == (hf_dir is None):
        raise ValueError("pass exactly one of --ckpt or --hf-dir")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    folder = Path(ckpt if ckpt is not None else hf_dir)
    if not folder.is_dir():
        flag = "--ckpt" if ckpt is not None else "--hf-dir"
        raise FileNotFoundError(f"{flag} {folder} does not exist")
    if ckpt is not None:
        return load_checkpoint(folder, DTYPES[dtype])
    return load_hf_folder(folder, DTYPES[dtype])
