"""Fixtures shared by the tests and benchmarks: tiny tokenizers, tiny HF models, gloo workers.

Nothing here touches the network: tokenizers are trained on a few sentences and HF models are
made from small configs with random weights.
"""
from __future__ import annotations

import os
import tempfile
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megablock.checkpoint.adapters import split_factor
from megablock.checkpoint.convert import convert
from megablock.checkpoint.format import full_shapes
from megablock.checkpoint.mappings import FAMILY_NAMES
from megablock.data.preprocess import preprocess
from megablock.inference.speculative import LAYOUTS, layout_config
from megablock.model.lora import MASK_DELTA, base_weight_name
from megablock.parallel.state import free_port

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"

_CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "A block-diffusion model denoises a block of tokens at a time, left to right.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
]


def tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 320, with_mask: bool = False):
    """Train a byte-level BPE tokenizer on a few sentences and save it as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS_TOKEN] + ([MASK_TOKEN] if with_mask else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    if with_mask:
        fast.add_special_tokens({"mask_token": MASK_TOKEN})
    fast.save_pretrained(str(path))
    return fast


FAMILIES = FAMILY_NAMES


def tiny_hf_config(family: str, vocab_size: int = 320, **overrides):
    """A tiny config of one supported family (2 layers, hidden 64, GQA 4/2 heads)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "qwen2":
        cls = transformers.Qwen2Config
    elif family == "qwen3":
        cls = transformers.Qwen3Config
        common["head_dim"] = 16
    elif family == "mistral":
        cls = transformers.MistralConfig
        common["sliding_window"] = None
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    common.update(overrides)
    return cls(**common)


def tiny_hf_model(family: str, seed: int = 0, vocab_size: int = 320, **overrides):
    """A tiny randomly initialised HF causal LM in fp32 (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(family, vocab_size=vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # Random init leaves norms at 1; perturb them so parity tests see the norm weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def peaked_model(family: str = "llama", seed: int = 0, scale: float = 40.0, **overrides):
    """A tiny HF model whose head is scaled up, so its predictions are confident (greedy decoding
    then has clear winners and sampling tests see peaked distributions)."""
    hf = tiny_hf_model(family, seed=seed, **overrides)
    with torch.no_grad():
        hf.lm_head.weight.mul_(scale)
    return hf


def save_tiny_hf_model(path, family: str, seed: int = 0, with_tokenizer: bool = True, **overrides):
    """Save a tiny HF model (and a matching tiny tokenizer) to `path`; returns the model."""
    path = Path(path)
    model = tiny_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(str(path))
    if with_tokenizer:
        tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return model


def training_assets(root, family: str = "llama", ckpt_name: str = "ckpt") -> Path:
    """A tiny converted checkpoint (root/CKPT_NAME, with a mask token) and the repo's public-domain
    text sample tokenized with its tokenizer (root/data): what training tests start from."""
    root = Path(root)
    save_tiny_hf_model(root / "hf", family)
    convert(root / ckpt_name, hf_dir=root / "hf", mask_token=MASK_TOKEN, progress=False, log=lambda *a: None)
    inputs = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "examples" / "data").glob("*.txt.gz"))
    if not inputs:
        raise FileNotFoundError("examples/data has no corpus sample")
    preprocess(inputs, str(root / ckpt_name / "tokenizer"), str(root / "data"), workers=1, progress=False)
    return root


def speculative_configs(max_new_tokens: int, block_sizes=(2, 4, 8), **settings):
    """Every valid speculative layout (those of `speculative.LAYOUTS`, and overlap with branches and
    reused drafts) at each block size (overlap needs B >= 3), with `settings` (sampling, seed, ...)."""
    layouts = [*LAYOUTS.values(), dict(next_draft="overlap", branches=2, reuse_drafts=True)]
    for B in block_sizes:
        for layout in layouts:
            if not (layout.get("next_draft") == "overlap" and B == 2):
                yield layout_config(layout, B, max_new_tokens=max_new_tokens, **settings)


def randomize_adapters(model, rank: int, scale: float = 0.1) -> None:
    """Give a model's LoRA B factors and mask-row delta non-zero values (apply_lora starts B at 0),
    drawn as full tensors keyed by name and split, so every TP layout holds the same adapters
    (A is already drawn that way by apply_lora). `rank`: the LoRA rank."""
    shapes = full_shapes(model.cfg, model.tp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                shape = (shapes[base_weight_name(name)][0], rank)
            elif name == MASK_DELTA:
                shape = tuple(p.shape)
            else:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = scale * torch.randn(shape, generator=g)
            p.copy_(split_factor(model.cfg, name, full, model.tp, model.tp_rank).to(p.dtype))


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes (env set for
    torch.distributed with gloo) and return each rank's result; re-raises a rank's error."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size, join=True)
        results = []
        for rank in range(world_size):
            blob = torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=True)
            if not blob["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{blob['error']}")
            results.append(blob["result"])
        return results
