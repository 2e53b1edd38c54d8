"""Text (jsonl / txt, optionally gzip) -> megatron-core indexed dataset (PREFIX.bin / PREFIX.idx).

The output is written with megatron-core's `IndexedDatasetBuilder`, one sequence per document,
so Megatron-LM tooling reads it unchanged.  Each document is the tokenizer's output for its text
(no special tokens added) followed, by default, by the tokenizer's EOS id as end-of-document.

Reading and writing run in this process; tokenization runs in a `multiprocessing.Pool` of
`workers` processes fed with chunks of documents through `imap`, which keeps document order, so
any number of workers writes byte-identical files.  Hugging Face tokenizers' own Rust thread pool
is switched off (TOKENIZERS_PARALLELISM=false, unless the caller set it) so `workers` is the
whole parallelism.

Failure leaves nothing behind: output goes to temporary names next to PREFIX and is renamed
only after the index is complete (old .idx removed first, then .bin, then .idx: an interruption
leaves the old pair, the new pair, or no .idx, never a mismatched pair); every input error names
the file (and line) and the fix.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megablock.data.datasets import import_megatron_datasets

TEXT_SPLITS = ("auto", "blank-line", "file", "line")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CHUNK_CHARS = 1 << 16  # ~64 KB of text per task: small enough to balance, big enough to amortize IPC
CHUNK_DOCS = 1024


class PreprocessError(ValueError):
    """An input or setup problem; the message says what is wrong and how to fix it (a ValueError,
    like every expected error: the tools print it as one line, not as "an unexpected error")."""


# ----------------------------------------------------------------------------- tokenizers


class TextTokenizer:
    """The little a preprocessing worker needs: batch encoding, EOS id, vocabulary size.

    Accepts a Hugging Face tokenizer folder (AutoTokenizer) or a sentencepiece `.model` file."""

    def __init__(self, path: str):
        self.path = str(path)
        p = Path(path)
        if p.is_file() and p.suffix == ".model":
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(p))
            except Exception as e:  # noqa: BLE001 - sentencepiece raises plain exceptions
                raise PreprocessError(f"cannot load sentencepiece model {p}: {e}") from e
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            eos = self._sp.eos_id()
            self.eos_id = eos if eos >= 0 else None
        elif p.is_dir():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(p))
            except Exception as e:  # noqa: BLE001
                raise PreprocessError(
                    f"cannot load a Hugging Face tokenizer from {p}: {e}; the folder needs "
                    "tokenizer.json or vocab/merges files (save one with tokenizer.save_pretrained)"
                ) from e
            self._sp = None
            self.vocab_size = len(self._hf)
            self.eos_id = self._hf.eos_token_id
        else:
            raise PreprocessError(
                f"tokenizer {path} is neither a Hugging Face tokenizer folder nor a sentencepiece "
                ".model file; pass --tokenizer DIR (with tokenizer.json) or --tokenizer FILE.model"
            )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._sp is not None:
            return self._sp.encode(texts, num_threads=1)
        return self._hf(texts, add_special_tokens=False)["input_ids"]


def token_dtype(vocab_size: int):
    """Token dtype for a vocabulary, the same rule megatron-core's own preprocessing uses."""
    return import_megatron_datasets()[2].DType.optimal_dtype(vocab_size)


# ----------------------------------------------------------------------------- reading


def check_inputs(paths: list[str]) -> None:
    """Fail fast (before any work) on inputs that are missing, not files, empty or unreadable."""
    if not paths:
        raise PreprocessError("no input files; pass --input FILE [FILE ...]")
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise PreprocessError(f"input file {path} does not exist; check the path")
        if not p.is_file():
            raise PreprocessError(f"input {path} is not a regular file; pass the files inside it")
        if not os.access(p, os.R_OK):
            raise PreprocessError(f"input file {path} is not readable; fix its permissions (chmod +r)")
        if p.stat().st_size == 0:
            raise PreprocessError(f"input file {path} is empty; remove it from --input")


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _is_json(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(JSON_SUFFIXES)


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its newline) of a plain or gzip file."""
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PreprocessError(
                        f"{path} line {n}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                        "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                    ) from None
                if n == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield n, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise PreprocessError(
            f"{path}: damaged or truncated gzip data ({e}); re-create or re-download the file"
        ) from None
    except OSError as e:
        raise PreprocessError(f"cannot read {path}: {e}") from None


def _has_blank_line(path: str) -> bool:
    return any(not line.strip() for _, line in _lines(path))


def iter_documents(path: str, json_key: str = "text", text_split: str = "auto") -> Iterator[str]:
    """Documents of one input file, in file order.

    `.jsonl`/`.json`/`.ndjson` (optionally `.gz`): one JSON object per line, text under `json_key`
    (blank lines skipped).  Anything else is text, split by `text_split`:
      - ``blank-line``: a document per block of lines separated by blank lines (trailing newline
        of the block dropped);
      - ``line``: a document per non-blank line (newline dropped);
      - ``file``: the whole file is one document, exactly as stored;
      - ``auto`` (default): ``blank-line`` if the file has a blank line, else ``line``.  A text
        without blank lines (one verse / sentence / record per line, like examples/data's KJV
        sample) would otherwise become a single document, and a dataset of a few documents
        leaves a Megatron split (e.g. the validation split) with none.
    Empty documents are skipped (they would be sequences of length 0 or a lone EOD)."""
    if text_split not in TEXT_SPLITS:
        raise PreprocessError(f"--text-split {text_split!r} is not one of {TEXT_SPLITS}")
    if text_split == "auto" and not _is_json(path):
        text_split = "blank-line" if _has_blank_line(path) else "line"
        if text_split == "line":
            print(f"note: {path} has no blank line: one document per line (--text-split auto); "
                  "pass --text-split file to keep the whole file as one document", file=sys.stderr)
    if _is_json(path):
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreprocessError(f"{path} line {n}: invalid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(obj, dict) or json_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise PreprocessError(
                    f"{path} line {n}: no {json_key!r} key (found {keys}); pass --json-key KEY "
                    "naming the field that holds the text"
                )
            text = obj[json_key]
            if not isinstance(text, str):
                raise PreprocessError(
                    f"{path} line {n}: {json_key!r} is a {type(text).__name__}, not a string"
                )
            if text:
                yield text
    elif text_split == "file":
        text = "".join(line for _, line in _lines(path))
        if text.strip():
            yield text
    elif text_split == "line":
        for _, line in _lines(path):
            if line.strip():
                yield line.rstrip("\r\n")
    else:
        block: list[str] = []
        for _, line in _lines(path):
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\r\n")
                block = []
        if block:
            yield "".join(block).rstrip("\r\n")


def _chunks(paths: list[str], json_key: str, text_split: str) -> Iterator[list[str]]:
    """Documents of all files in order, grouped into chunks; raises if a file has none."""
    chunk: list[str] = []
    size = 0
    for path in paths:
        count = 0
        for doc in iter_documents(path, json_key, text_split):
            count += 1
            chunk.append(doc)
            size += len(doc)
            if size >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
                yield chunk
                chunk, size = [], 0
        if count == 0:
            raise PreprocessError(
                f"input file {path} contains no documents"
                + (f" (no non-empty {json_key!r} values)" if _is_json(path) else "")
                + "; remove it from --input"
            )
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(tokenizer, eod: Optional[int], dtype) -> None:
    """Pool initializer: `tokenizer` is a path (loaded once per process) or a loaded one."""
    if not isinstance(tokenizer, TextTokenizer):
        tokenizer = TextTokenizer(tokenizer)
    _WORKER.update(tokenizer=tokenizer, eod=eod, dtype=dtype)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize one chunk: (all tokens concatenated, per-document lengths)."""
    ids = _WORKER["tokenizer"].encode_batch(texts)
    eod = _WORKER["eod"]
    if eod is not None:
        for doc in ids:
            doc.append(eod)
    lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for d in ids for t in d), dtype=_WORKER["dtype"], count=int(lengths.sum()))
    return flat, lengths


class _Throttle:
    """Keeps the pool's feeder thread at most `limit` chunks ahead of the writer.

    `Pool.imap` drains its input iterable as fast as it can; without this a large corpus would
    be read into memory long before it is tokenized."""

    def __init__(self, limit: int):
        self._slots = threading.Semaphore(limit)
        self._stop = threading.Event()

    def wrap(self, it):
        for item in it:
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            yield item

    def release(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------- driver


def install_pair(tmp_bin: str, tmp_idx: str, prefix: str) -> None:
    """Move a finished (.bin, .idx) pair to PREFIX.bin / PREFIX.idx so that no moment, however
    the process is stopped, shows readers a .bin with the .idx of another dataset.

    Two renames cannot be one atomic step, so the old .idx goes first: readers (megatron-core's
    IndexedDataset, megablock's loaders) need both files, and from then on until the new .idx is
    in place they find "PREFIX.idx not found" instead of an old index over new tokens."""
    old_idx = prefix + ".idx"
    if os.path.exists(old_idx):
        os.remove(old_idx)
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, old_idx)


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float
    skipped_empty: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"documents: {self.documents:,}  tokens: {self.tokens:,}  seconds: {self.seconds:.2f}  "
            f"tokens/s: {self.tokens_per_s:,.0f}"
        )


def preprocess(
    inputs: list[str],
    tokenizer: str,
    output_prefix: str,
    *,
    workers: int = 1,
    json_key: str = "text",
    text_split: str = "auto",
    append_eod: bool = True,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize `inputs` into `output_prefix`.bin/.idx; returns counts and timing."""
    IndexedDatasetBuilder = import_megatron_datasets()[2].IndexedDatasetBuilder
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    if text_split not in TEXT_SPLITS:
        raise PreprocessError(f"--text-split {text_split!r} is not one of {TEXT_SPLITS}")
    inputs = [str(p) for p in inputs]
    check_inputs(inputs)
    tok = TextTokenizer(tokenizer)
    if append_eod and tok.eos_id is None:
        raise PreprocessError(
            f"tokenizer {tokenizer} has no EOS token to use as end-of-document; set eos_token in "
            "its tokenizer_config.json or pass --no-append-eod"
        )
    eod = tok.eos_id if append_eod else None
    dtype = token_dtype(tok.vocab_size)

    prefix = str(output_prefix)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = tmp + ".bin", tmp + ".idx"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        open(tmp_bin, "wb").close()
    except OSError as e:
        raise PreprocessError(f"cannot write {prefix}.bin ({e.strerror}); choose a writable --output-prefix") from None

    from tqdm import tqdm

    start = time.perf_counter()
    docs = tokens = 0
    pool = None
    throttle = _Throttle(4 * workers)
    bar = tqdm(unit=" docs", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        chunks = _chunks(inputs, json_key, text_split)
        if workers == 1:
            _init_worker(tok, eod, dtype)
            results = map(_encode_chunk, chunks)
        else:
            # fork hands the loaded tokenizer to the workers for free (loading a 50k-entry BPE
            # costs ~0.5 s of CPU per process); spawn makes each worker load it from the path.
            fork = "fork" in multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok if fork else tokenizer, eod, dtype))
            results = pool.imap(_encode_chunk, throttle.wrap(chunks))
        for flat, lengths in results:
            throttle.release()
            offset = 0
            for n in lengths.tolist():
                builder.add_document(flat[offset : offset + n], [n])
                offset += n
            docs += len(lengths)
            tokens += int(flat.size)
            bar.update(len(lengths))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{tokens:,} tokens, {tokens / max(elapsed, 1e-9):,.0f} tokens/s", refresh=False)
        builder.finalize(tmp_idx)
        install_pair(tmp_bin, tmp_idx, prefix)
    except BaseException:
        throttle.stop()
        if pool is not None:
            pool.terminate()
            pool = None
        if not os.path.exists(tmp_bin) and os.path.exists(tmp_idx):
            # Interrupted inside install_pair after the new .bin went in: finish, so the prefix
            # holds the complete new pair rather than a .bin without its .idx.
            os.replace(tmp_idx, prefix + ".idx")
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return PreprocessStats(documents=docs, tokens=tokens, seconds=time.perf_counter() - start)
