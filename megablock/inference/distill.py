"""Self-distillation data: prompt/response JSON lines whose responses are the model's own
continuations (tools/distill_data.py).

Training a block-diffusion model on its own AR outputs (dParallel, d3LLM) makes the tokens of a
block easier to guess together: they are what the clean half would have produced anyway, so
drafted blocks are accepted more often and more slots pass the commit threshold.

Prompts come from a file (one per line, or JSONL with a "prompt" field) or are cut from a corpus:
the first k tokens of a document, k uniform in a [min, max] range (seeded), decoded to text.
Responses are generated with megablock's KV-cached sampler at block size 1 (plain AR decoding;
greedy, or temperature sampling with a seed), prompts batched.

The output is resumable: record i (one JSON object per line: id, prompt, response, response_tokens)
is written once. Batches are fixed by prompt index (batch k = prompts k*n .. k*n+n-1) and batch k
samples with seed + k, so a rerun after an interruption recomputes exactly the batches it had not
finished, writes only the records still missing, and ends with the same file as an uninterrupted
run. A torn last line (the process died mid-write) is cut off before resuming. What decides the
records (model, prompts, max_new_tokens, batch_size, sampling, seed) is kept beside the output in
OUT.settings.json, and a rerun with other settings is refused: appending would silently mix
records of two settings (seed 7 and seed 8) in one file. Prompt plus max_new_tokens must fit the
model's positions (checked for every prompt before anything is generated).
Generations made elsewhere (any JSONL with prompt/response, e.g. from a serving engine) are
checked and written in the same format (`import_records`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from megablock.data.preprocess import iter_documents

from .loading import InferenceModel
from .sampler import GenerateConfig, check_positions
from .sampling import SamplingParams


class DistillError(ValueError):
    """A problem with the prompts or the output file; the message says how to fix it."""


# ----------------------------------------------------------------------------- prompts


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a file: JSONL with a "prompt" field (.jsonl/.json), else one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"prompt file {path} does not exist")
    prompts = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if p.suffix in (".jsonl", ".json"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DistillError(f"{path} line {n}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise DistillError(f"{path} line {n}: no 'prompt' string")
                prompts.append(obj["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise DistillError(f"prompt file {path} has no prompts")
    return prompts


def corpus_prompts(corpus: str, tokenizer, count: int, min_tokens: int, max_tokens: int, *, seed: int = 0,
                   text_split: str = "auto", doc_range: Optional[tuple[int, int]] = None) -> list[str]:
    """`count` prompts: the first k tokens (k uniform in [min_tokens, max_tokens]) of documents of
    `corpus` spread evenly over `doc_range` ([start, end) document indices; default all), among
    the documents long enough for max_tokens. Documents as preprocess_data.py cuts them (`auto`:
    blank-line blocks, or lines in a file without blank lines, such as the repository's kjv sample)."""
    if count < 1:
        raise DistillError(f"num_prompts={count} must be >= 1")
    if not 1 <= min_tokens <= max_tokens:
        raise DistillError(f"prefix range [{min_tokens}, {max_tokens}] must satisfy 1 <= min <= max")
    docs = list(iter_documents(corpus, text_split=text_split))
    lo, hi = doc_range or (0, len(docs))
    docs = docs[lo:hi]
    # Tokenize evenly spaced candidates, not the whole corpus (more of them when too few are long enough).
    for factor in (4, 32, None):
        candidates = len(docs) if factor is None else min(len(docs), factor * count)
        picks_idx = sorted({int(i * len(docs) / max(candidates, 1)) for i in range(candidates)})
        ids = [tokenizer(docs[i], add_special_tokens=False)["input_ids"] for i in picks_idx]
        usable = [x for x in ids if len(x) > max_tokens]
        if len(usable) >= count:
            break
    if len(usable) < count:
        raise DistillError(f"{corpus} documents {lo}..{hi}: {len(usable)} of {len(ids)} sampled ones have more than "
                           f"{max_tokens} tokens; {count} prompts requested: lower the count or the prefix length")
    rng = random.Random(seed)
    step = len(usable) / count
    picks = [usable[int(i * step)] for i in range(count)]
    return [tokenizer.decode(x[: rng.randint(min_tokens, max_tokens)]) for x in picks]


# ----------------------------------------------------------------------------- output


def _done_ids(out: Path) -> set:
    """Record ids already in `out`; a torn last line is truncated away first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):  # the last write did not finish: drop it, it will be redone
        with out.open("r+b") as f:
            f.truncate(end)
    done = set()
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                done.add(int(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise DistillError(f"{out} line {n} is not a distill record (id, prompt, response); "
                                   "write to a new --out file") from None
    return done


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to add records made with other `settings` to `out` (before anything in it is
    touched); record the settings of a new output."""
    record = settings_path(out)
    has_records = out.is_file() and out.stat().st_size > 0
    if record.is_file() and has_records:
        try:
            saved = json.loads(record.read_text())
        except ValueError as e:
            raise DistillError(f"{record} is not valid JSON ({e}); it records the settings of {out}: restore it, "
                               f"or write to a new --out file") from None
        diffs = [f"{k}: {out.name} has {saved.get(k)!r}, this run {settings.get(k)!r}"
                 for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if diffs:
            raise DistillError(
                f"{out} was written with other settings ({'; '.join(diffs)}); adding to it would mix records of "
                f"both in one file. Rerun with the recorded settings ({record}) to resume it, or write to a new "
                f"--out file"
            )
        return
    if has_records:
        raise DistillError(f"{out} holds records but no {record.name}, so the settings that made them are unknown "
                           f"and a rerun could mix two settings in one file: write to a new --out file")
    record.write_text(json.dumps(settings, indent=1) + "\n")


def _append(out: Path, records: Iterable[dict]) -> None:
    with out.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())  # a record on disk is a record that a resumed run will not redo


@dataclass
class DistillStats:
    prompts: int
    written: int
    skipped: int
    new_tokens: int
    seconds: float


def distill(im: InferenceModel, prompts: Sequence[str], out: str, *, max_new_tokens: int, batch_size: int = 8,
            temperature: float = 0.0, top_p: Optional[float] = None, seed: int = 0, progress: bool = True,
            stop_after_batches: Optional[int] = None, model: Optional[str] = None) -> DistillStats:
    """Write the model's continuation of every prompt to `out` (resumable; module docstring).
    `stop_after_batches` ends after that many generated batches (interruptions in tests); `model`
    names the model (its folder) in the recorded settings."""
    from tqdm import tqdm  # deferred like the tools' other progress bars

    if im.tokenizer is None:
        raise DistillError("the model has no tokenizer to encode prompts and decode responses")
    if batch_size < 1 or max_new_tokens < 1:
        raise DistillError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1")
    encoded_all = [im.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    empty = [i for i, e in enumerate(encoded_all) if not e]
    if empty:
        raise DistillError(f"prompts {empty[:8]} encode to no tokens; remove empty prompts")
    try:
        check_positions([len(e) for e in encoded_all], max_new_tokens, im.model.cfg)
    except ValueError as e:
        raise DistillError(str(e)) from None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_settings(path, {
        "model": model, "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest(),
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "temperature": temperature, "top_p": top_p, "seed": seed,
    })
    done = _done_ids(path)
    sampler = im.sampler()
    start, written, new_tokens, batches = time.perf_counter(), 0, 0, 0
    bar = tqdm(total=len(prompts), initial=sum(1 for i in range(len(prompts)) if i in done), unit=" prompts",
               disable=not progress, dynamic_ncols=True)
    try:
        for first in range(0, len(prompts), batch_size):
            ids = list(range(first, min(first + batch_size, len(prompts))))
            missing = [i for i in ids if i not in done]
            if not missing:
                continue
            if stop_after_batches is not None and batches >= stop_after_batches:
                break
            encoded = [encoded_all[i] for i in ids]
            cfg = GenerateConfig(block_size=1, max_new_tokens=max_new_tokens, shift=True,
                                 sampling=SamplingParams(temperature, None, top_p), seed=seed + first // batch_size)
            result = sampler.generate(encoded, cfg)
            records = []
            for i, toks in zip(ids, result.tokens):
                if i in done:
                    continue
                records.append({"id": i, "prompt": prompts[i], "response": im.tokenizer.decode(toks),
                                "response_tokens": len(toks)})
                new_tokens += len(toks)
            _append(path, records)
            done.update(missing)
            written += len(records)
            batches += 1
            bar.update(len(records))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{new_tokens / max(elapsed, 1e-9):.1f} new tokens/s", refresh=False)
    finally:
        bar.close()
    return DistillStats(len(prompts), written, len(prompts) - written, new_tokens, time.perf_counter() - start)


def import_records(source: str, out: str) -> DistillStats:
    """Check an external prompt/response JSONL (generations made elsewhere) and write its records
    to `out` in the distill format (ids in file order; resumable like `distill`)."""
    start = time.perf_counter()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(path)
    records = []
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillError(f"{source} line {n}: invalid JSON ({e.msg})") from None
            if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str)):
                raise DistillError(f"{source} line {n}: needs 'prompt' and 'response' strings")
            i = len(records)
            records.append({"id": i, "prompt": obj["prompt"], "response": obj["response"]})
    if not records:
        raise DistillError(f"{source} has no prompt/response records")
    new = [r for r in records if r["id"] not in done]
    _append(path, new)
    return DistillStats(len(records), len(new), len(records) - len(new), 0, time.perf_counter() - start)
