"""Evaluation of a block-diffusion LM (the logic behind tools/evaluate.py): NELBO / perplexity bound per block size, AR-mode NLL,
generation speed and generative perplexity.

NELBO at block size B (DESIGN.md, "Evaluation NELBO"): the data are the dataset's token stream
in document order cut into consecutive non-overlapping L-token windows (`eval_windows`). Each
window is noised K times with t ~ U[eps, 1] per block (the unbiased schedule, not training's
clipped range, and 1/t weights) and scored with the training objective's L_diff, built by the same
batch builder training uses, so the number is exactly what training's `diffusion_loss` estimates.
With token shift the first token of each block is an AR step of the bound and token 0 of a window
is never a target, so the bound is per predicted token (L - 1 per window) and at B = 1 the batch
builder's "ar" layout makes it exactly the AR NLL of the same windows.

Noise is keyed by (seed + k, window index): sample k of window i is the same whatever the batch
size, the order or K (K = 1 is a prefix of K = 4), so results are reproducible and comparable.

AR mode runs the model causally on the clean windows (one pass, what B = 1 sampling does); its NLL
is the same number as the NELBO at B = 1 for a model with token shift.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from megablock.config import DiffusionSection
from megablock.diffusion.batch import DiffusionBatch, build_batch
from megablock.diffusion.loss import token_cross_entropy

from .loading import InferenceModel
from .measure import DecodeConfig, decode

# Logits of one forward are capped at about this many fp32 entries when the batch size is chosen
# automatically (the cross-entropy makes one more copy): ~1 GiB.
_AUTO_BATCH_LOGITS = 1 << 28


class EvaluationError(ValueError):
    """Bad evaluation input; the message says what is wrong and how to fix it."""


def check_block_size(block_size: int, seq_len: int, mask_token_id: Optional[int], shift: bool) -> None:
    """The block size for windows of `seq_len` and a model with `mask_token_id` (None: it has none)."""
    check_block_range(block_size, seq_len)
    if mask_token_id is None and (block_size > 1 or not shift):
        raise EvaluationError(
            f"the model has no mask token, so it can only be evaluated at block size 1 (AR), not {block_size}; "
            "convert it with tools/convert_hf.py (which adds a mask token) and train it for block diffusion"
        )


def check_block_range(block_size: int, seq_len: int) -> None:
    """The block size on its own, before a model is loaded."""
    if block_size < 1:
        raise EvaluationError(f"block_size={block_size} must be >= 1")
    if seq_len % block_size:
        raise EvaluationError(f"block_size={block_size} does not divide seq_len={seq_len}; choose a divisor of {seq_len}")


def auto_batch_size(seq_len: int, vocab_size: int, two_halves: bool) -> int:
    """Windows per forward keeping the logits near `_AUTO_BATCH_LOGITS` entries."""
    per_window = seq_len * (2 if two_halves else 1) * vocab_size
    return max(1, _AUTO_BATCH_LOGITS // per_window)


def _weighted_ce(model, batch: DiffusionBatch, weights: torch.Tensor) -> torch.Tensor:
    """sum(weights * CE) of one batch. Only positions with a weight go through the output layer:
    in two-half layouts that is under half the positions, so the full-vocabulary logits (the
    biggest tensor of an evaluation) shrink accordingly."""
    hidden = model.encode(batch.input_ids, batch.position_ids, batch.layout)
    sel = weights > 0
    logits = model.head(hidden[sel])[None]  # [1, N, V/TP]
    ce = token_cross_entropy(logits, batch.targets[sel][None])[0]
    return (ce.double() * weights[sel].double()).sum()


@torch.inference_mode()
def nelbo_sums(
    model, windows: torch.Tensor, block_size: int, *, mask_token_id: Optional[int], shift: bool = True,
    attention: str = "context_causal", samples: int = 1, seed: int = 0, eps: float = 1e-3,
    batch_size: Optional[int] = None, progress: Optional[Callable[[int], None]] = None,
) -> tuple[float, float]:
    """(sum over windows and noise samples of the weighted CE, number of target tokens counted),
    so NELBO per token = sum / count. At block size 1 with shift nothing is random and the K
    samples would be identical: one pass is made and counted once."""
    cfg = DiffusionSection(attention=attention, shift=shift, schedule="linear", eps=eps, loss_weighting="elbo")
    device = next(model.parameters()).device
    n, L = windows.shape
    deterministic = shift and block_size == 1 and attention != "full"
    k_samples = 1 if deterministic else samples
    bs = batch_size or auto_batch_size(L, model.padded_vocab_size // model.tp, attention != "full")
    total, count = 0.0, 0.0
    for k in range(k_samples):
        for start in range(0, n, bs):
            rows = windows[start : start + bs]
            batch = build_batch(
                rows, torch.arange(start, start + rows.shape[0]), block_size, cfg,
                mask_token_id=mask_token_id, seed=seed + k,
            ).to(device)
            total += float(_weighted_ce(model, batch, batch.diff_weights))
            count += batch.diff_normalizer
            if progress:
                progress(rows.shape[0])
    return total, count


def ar_nll_sums(model, windows: torch.Tensor, *, batch_size: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None) -> tuple[float, float]:
    """(sum of next-token NLL, number of predicted tokens) of a causal pass over the windows
    (the batch builder's "ar" layout: x0 only, plain causal attention)."""
    return nelbo_sums(model, windows, 1, mask_token_id=None, shift=True, attention="context_causal",
                      samples=1, batch_size=batch_size, progress=progress)


# --- generation ----------------------------------------------------------------------------------
def check_generation_args(em: InferenceModel, seq_len: int, n_prompts: int, prompt_len: int, cfg: DecodeConfig,
                          ref_hf_dir) -> None:
    """Fail before the (long) NELBO pass, not after it."""
    if n_prompts < 1:
        raise EvaluationError(f"gen_prompts={n_prompts} must be >= 1")
    if not 1 <= prompt_len <= seq_len:
        raise EvaluationError(f"gen_prompt_len={prompt_len} must be in [1, seq_len={seq_len}]")
    try:
        cfg.validate(em.mask_token_id)
    except ValueError as e:
        raise EvaluationError(f"generation settings: {e}") from None
    if ref_hf_dir is not None:
        if not (Path(ref_hf_dir) / "config.json").is_file():
            raise EvaluationError(f"ref_hf_dir={ref_hf_dir} is not a Hugging Face model folder (no config.json)")
        if em.tokenizer is None:
            raise EvaluationError("scoring samples with ref_hf_dir= needs the model's tokenizer to decode them; "
                                  "the model folder has none")


def generation_prompts(windows: torch.Tensor, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of `count` windows spread evenly over the evaluation data."""
    n, L = windows.shape
    picks = torch.linspace(0, n - 1, min(count, n)).round().long().unique()
    return [windows[i, :length].tolist() for i in picks]


@torch.inference_mode()
def reference_nll(ref_dir, prompts: Sequence[str], continuations: Sequence[str],
                  progress: Optional[Callable[[int], None]] = None) -> tuple[float, int]:
    """(sum of NLL, token count) of each continuation given its prompt under an HF causal LM.

    Text is re-tokenized with the reference model's own tokenizer (it need not share the
    evaluated model's); prompt and continuation are encoded separately so exactly the
    continuation's tokens are scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_dir = Path(ref_dir)
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    total, count = 0.0, 0
    for prompt, cont in zip(prompts, continuations):
        p_ids = tok(prompt)["input_ids"]
        c_ids = tok(cont, add_special_tokens=False)["input_ids"]
        if c_ids and p_ids:
            ids = torch.tensor([p_ids + c_ids])
            logits = ref(ids).logits[0, len(p_ids) - 1 : -1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids):], reduction="sum"))
            count += len(c_ids)
        if progress:
            progress(1)
    return total, count


# --- the whole evaluation --------------------------------------------------------------------------
def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def evaluate(
    em: InferenceModel, windows: torch.Tensor, block_size: int, *, samples: int = 1, seed: int = 0,
    eps: float = 1e-3, batch_size: Optional[int] = None, progress: bool = True,
    generation: Optional[DecodeConfig] = None, gen_prompts: int = 4, gen_prompt_len: int = 32, ref_hf_dir=None,
) -> dict:
    """All numbers of tools/evaluate.py for one model, data and block size (see module docstring).
    `generation` (a GenerateConfig or SpeculativeConfig at `block_size`) also decodes
    `gen_prompts` prompts of `gen_prompt_len` tokens (megablock.inference.measure) and, with
    `ref_hf_dir`, scores the samples (generative perplexity)."""
    from tqdm import tqdm

    n, L = windows.shape
    check_block_size(block_size, L, em.mask_token_id, em.shift)
    if samples < 1:
        raise EvaluationError(f"samples={samples} must be >= 1")
    if not 0 < eps <= 1:
        raise EvaluationError(f"eps={eps} must be in (0, 1]")
    if batch_size is not None and batch_size < 1:
        raise EvaluationError(f"batch_size={batch_size} must be >= 1")
    if generation is not None:
        if generation.block_size != block_size:
            raise EvaluationError(f"the generation config decodes at block size {generation.block_size}, the "
                                  f"evaluation is at {block_size}; give both the same block size")
        check_generation_args(em, L, gen_prompts, gen_prompt_len, generation, ref_hf_dir)

    result: dict = {"block_size": block_size, "samples": samples, "windows": n, "seq_len": L, "tokens": n * L}
    same_as_ar = em.shift and block_size == 1 and em.attention != "full"
    passes = 1 if same_as_ar else samples + 1  # noise samples, then the causal pass
    with tqdm(total=n * passes, desc=f"evaluate B={block_size}", unit="window",
              disable=not progress, dynamic_ncols=True) as bar:
        start = time.perf_counter()
        total, count = nelbo_sums(em.model, windows, block_size, mask_token_id=em.mask_token_id, shift=em.shift,
                                  attention=em.attention, samples=samples, seed=seed, eps=eps,
                                  batch_size=batch_size, progress=bar.update)
        result["nelbo"] = total / count
        result["ppl_bound"] = _exp(result["nelbo"])
        result["targets"] = int(count / (1 if same_as_ar else samples))
        if same_as_ar:  # the B = 1 pass *is* the causal pass
            ar_total, ar_count = total, count
        else:
            ar_total, ar_count = ar_nll_sums(em.model, windows, batch_size=batch_size, progress=bar.update)
        result["ar_nll"] = ar_total / ar_count
        result["ar_ppl"] = _exp(result["ar_nll"])
        result["eval_seconds"] = round(time.perf_counter() - start, 3)

    if generation is not None:
        result.update(_generation_metrics(em, windows, generation, gen_prompts, gen_prompt_len, ref_hf_dir, progress))
    return result


def _generation_metrics(em, windows, cfg: DecodeConfig, n_prompts, prompt_len, ref_hf_dir, progress) -> dict:
    from tqdm import tqdm

    prompts = generation_prompts(windows, n_prompts, prompt_len)
    record = decode(em, prompts, cfg)
    samples = record.tokens
    mode = "speculative" if record.mode == "speculative" else "threshold"
    metrics = {
        "gen_prompts": len(prompts), "gen_new_tokens": record.new_tokens, "gen_forwards": record.forwards,
        "gen_tokens_per_forward": round(record.tokens_per_forward, 4),
        "gen_tokens_per_s": round(record.tokens_per_s, 2),
        "gen_seconds": round(record.seconds, 3), "gen_mode": mode,
    }
    if mode == "speculative":  # acceptance next to the generative perplexity it comes with
        metrics["gen_verified_blocks"] = len(record.accepted)
        metrics["gen_mean_accepted"] = round(record.mean_accepted, 4)
        metrics["gen_acceptance_rate"] = round(record.acceptance_rate, 4)
        metrics["gen_accepted_histogram"] = {str(k): v for k, v in record.histogram().items()}
    if em.tokenizer is not None:
        detokenize = lambda ids: em.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prompt_texts = [detokenize(p) for p in prompts]
        texts = [detokenize(t) for t in samples]
        metrics["gen_sample"] = prompt_texts[0] + texts[0]
        if ref_hf_dir is not None:
            with tqdm(total=len(texts), desc="score samples", unit="sample", disable=not progress) as bar:
                nll, count = reference_nll(ref_hf_dir, prompt_texts, texts, progress=bar.update)
            metrics["gen_ref_tokens"] = count
            metrics["gen_nll"] = nll / count if count else float("nan")
            metrics["gen_ppl"] = _exp(metrics["gen_nll"]) if count else float("nan")
    return metrics
