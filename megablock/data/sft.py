"""Instruction (SFT) data: conversations -> tokens + per-token response flags -> packed windows.

On disk (tools/preprocess_data.py --format sft) an SFT dataset is two megatron-core indexed
datasets with the same document lengths, one document per conversation:
    PREFIX.bin/.idx          the tokens (Megatron-LM tooling reads them unchanged)
    PREFIX.flags.bin/.idx    uint8, 1 where the token is a response token (trained), else 0

Records, one JSON object per line:
  - {"prompt": str, "response": str}: tokens = tokens(prompt) + tokens(response), each text
    tokenized on its own (no special tokens added), so the boundary is exact; the response tokens
    are flagged. A self-distilled continuation is a prompt/response pair (tools/distill_data.py).
  - {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's own chat template
    (`tokenizer.apply_chat_template`), exactly as the model saw chats when it was instruction
    tuned; the tokens of every assistant turn (what the template adds for it after the
    generation prompt, its end-of-turn token included) are flagged. A tokenizer without a chat
    template is an error: guessing a format would train on text the model never sees at inference.
The end-of-document token appended after each conversation is a separator and never flagged:
a response that should end with EOS carries it itself (chat templates do); a cut-off distilled
continuation must not teach the model to stop there.

In training (data.format: sft) the conversations of a split are shuffled once (by the run seed)
and concatenated into one stream that is cut into windows of L = data.seq_len tokens ("packing");
each window carries the conversation id of every position, so attention never crosses a
conversation (document masking by ids, not by EOS: chat turns end with EOS inside a conversation).
A window with no response token among its targets would contribute nothing and is skipped, and the
remaining windows are numbered 0, 1, ... so that sample i is a pure function of i (resume-safe,
like the pretraining data). Past the last window the numbering wraps to the first (another epoch
in the same order).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from megablock.data.datasets import check_prefix_exists, import_megatron_datasets
from megablock.data.preprocess import PreprocessError, _lines, check_inputs

FLAGS_SUFFIX = ".flags"


def flags_prefix(prefix: str) -> str:
    """Prefix of the companion response-flag dataset of an SFT dataset."""
    return f"{prefix}{FLAGS_SUFFIX}"


# ----------------------------------------------------------------------------- rendering


def _ids(result) -> list[int]:
    """Token ids out of apply_chat_template's result (a list, or a BatchEncoding in transformers 5)."""
    if hasattr(result, "keys") and "input_ids" in result:
        result = result["input_ids"]
    return [int(t) for t in result]


def chat_tokens(tokenizer, messages: list) -> list[int]:
    """The chat template's token ids for `messages`, exactly as `apply_chat_template` gives them."""
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True))


class ConversationRenderer:
    """Tokenizes SFT records into (token ids, response flags) with a Hugging Face tokenizer."""

    def __init__(self, tokenizer_dir: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        if not Path(tokenizer_dir).is_dir():
            raise PreprocessError(f"--format sft needs a Hugging Face tokenizer folder; {tokenizer_dir} is not one")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise PreprocessError(f"cannot load a Hugging Face tokenizer from {tokenizer_dir}: {e}") from e
        self.path = str(tokenizer_dir)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id

    def _text(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def render(self, record: dict, where: str) -> tuple[list[int], list[int]]:
        """(tokens, flags) of one record; `where` ("FILE line N") goes into error messages."""
        if not isinstance(record, dict):
            raise PreprocessError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "messages" in record:
            return self._render_chat(record["messages"], where)
        if "prompt" in record and "response" in record:
            prompt, response = record["prompt"], record["response"]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise PreprocessError(f"{where}: 'prompt' and 'response' must be strings")
            p, r = self._text(prompt), self._text(response)
            if not r:
                raise PreprocessError(f"{where}: empty response; drop the line (it would train nothing)")
            return p + r, [0] * len(p) + [1] * len(r)
        raise PreprocessError(
            f"{where}: an SFT record needs 'prompt' and 'response' strings or a 'messages' list "
            f"(found keys {sorted(record)})"
        )

    def _render_chat(self, messages, where: str) -> tuple[list[int], list[int]]:
        if not getattr(self.tok, "chat_template", None):
            raise PreprocessError(
                f"{where}: a chat 'messages' record, but the tokenizer {self.path} has no chat template; "
                "use a tokenizer that ships one (its tokenizer_config.json 'chat_template'), or write the "
                "data as prompt/response records"
            )
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise PreprocessError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        if not any(m["role"] == "assistant" for m in messages):
            raise PreprocessError(f"{where}: no assistant message; nothing would be trained")
        tokens = chat_tokens(self.tok, messages)
        flags = [0] * len(tokens)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # The assistant turn's tokens: what rendering turn i adds after the generation prompt.
            try:
                before = _ids(self.tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True))
            except Exception:  # noqa: BLE001 - a template may refuse an empty conversation (i == 0)
                if i:
                    raise
                before = []
            upto = chat_tokens(self.tok, messages[: i + 1])
            if tokens[: len(before)] != before or tokens[: len(upto)] != upto:
                raise PreprocessError(
                    f"{where}: the chat template does not render this conversation's prefixes as prefixes of "
                    "the whole (it rewrites earlier turns), so assistant tokens cannot be located; write the "
                    "data as prompt/response records"
                )
            flags[len(before): len(upto)] = [1] * (len(upto) - len(before))
        return tokens, flags


def iter_records(path: str) -> Iterator[tuple[dict, str]]:
    """(record, "FILE line N") of a JSONL file (blank lines skipped)."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PreprocessError(f"{path} line {n}: invalid JSON ({e.msg}); fix or remove the line") from None
        try:  # JSON may escape a lone surrogate ("\ud800"): not text, and the tokenizer's TypeError names nothing
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start:e.end].encode("unicode_escape").decode()
            raise PreprocessError(f"{path} line {n}: the text holds {bad}, a lone UTF-16 surrogate (not a character); "
                                  f"fix the escape (a pair such as \\ud83d\\ude00) or remove the line") from None
        yield record, f"{path} line {n}"


def preprocess_sft(inputs: Sequence[str], tokenizer: str, output_prefix: str, *, append_eod: bool = True,
                   progress: bool = True) -> dict:
    """Write PREFIX.bin/.idx (tokens) and PREFIX.flags.bin/.idx (response flags); returns counts.

    Runs in this process: each record is rendered on its own (a chat template per conversation),
    which is not where preprocessing time goes at SFT data sizes."""
    builder_cls = import_megatron_datasets()[2].IndexedDatasetBuilder
    dtype_of = import_megatron_datasets()[2].DType.optimal_dtype
    inputs = [str(p) for p in inputs]
    check_inputs(inputs)
    r = ConversationRenderer(tokenizer)
    if append_eod and r.eos_id is None:
        raise PreprocessError(f"tokenizer {tokenizer} has no EOS token to separate conversations; pass --no-append-eod")
    prefix, fprefix = str(output_prefix), flags_prefix(str(output_prefix))
    tmp = {p: f"{p}.tmp-{os.getpid()}" for p in (prefix, fprefix)}
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    from tqdm import tqdm

    docs = tokens = response = 0
    try:
        tb = builder_cls(tmp[prefix] + ".bin", dtype=dtype_of(r.vocab_size))
        fb = builder_cls(tmp[fprefix] + ".bin", dtype=np.uint8)
        for path in inputs:
            count = 0
            for record, where in tqdm(iter_records(path), disable=not progress, unit=" conv", desc=Path(path).name):
                ids, flags = r.render(record, where)
                if append_eod:
                    ids, flags = ids + [r.eos_id], flags + [0]
                tb.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
                fb.add_document(np.asarray(flags, dtype=np.uint8), [len(flags)])
                docs, count, tokens, response = docs + 1, count + 1, tokens + len(ids), response + sum(flags)
            if not count:
                raise PreprocessError(f"input file {path} contains no records; remove it from --input")
        tb.finalize(tmp[prefix] + ".idx")
        fb.finalize(tmp[fprefix] + ".idx")
        for p, t in tmp.items():
            os.replace(t + ".bin", p + ".bin")
            os.replace(t + ".idx", p + ".idx")
    except BaseException:
        for t in tmp.values():
            for ext in (".bin", ".idx"):
                if os.path.exists(t + ext):
                    os.remove(t + ext)
        raise
    return {"documents": docs, "tokens": tokens, "response_tokens": response}


# ----------------------------------------------------------------------------- training windows


def _split_range(n: int, split: tuple[float, float, float], which: int) -> tuple[int, int]:
    """[lo, hi) document range of split `which` (0 train, 1 valid, 2 test) out of n documents."""
    bounds = [0]
    for f in split:
        bounds.append(bounds[-1] + f)
    lo, hi = (int(round(b * n)) for b in (bounds[which], bounds[which + 1]))
    return lo, hi


class SFTWindows:
    """Packed L-token windows of an SFT dataset split: `get(indices)` -> tokens, flags, doc ids.

    The split's conversations (across all prefixes, in order) are shuffled with `seed`, packed into
    one stream and cut into windows; windows without a response target (with token shift token 0
    of a window is never a target) are dropped. Memory: the split's tokens, in RAM."""

    def __init__(self, prefix: Union[str, Sequence[str]], seq_len: int, split: tuple[float, float, float] = (1, 0, 0),
                 which: int = 0, seed: int = 1234, shift: bool = True):
        _, _, idx_mod = import_megatron_datasets()
        prefixes = [prefix] if isinstance(prefix, (str, os.PathLike)) else list(prefix)
        docs: list[tuple[np.ndarray, np.ndarray]] = []
        for p in map(str, prefixes):
            check_prefix_exists(p)
            if not (os.path.isfile(flags_prefix(p) + ".bin") and os.path.isfile(flags_prefix(p) + ".idx")):
                raise FileNotFoundError(
                    f"{p} has no response flags ({flags_prefix(p)}.bin/.idx): data.format=sft needs a dataset "
                    "written by tools/preprocess_data.py --format sft"
                )
            toks, flags = idx_mod.IndexedDataset(p), idx_mod.IndexedDataset(flags_prefix(p))
            if len(toks) != len(flags) or not np.array_equal(toks.index.sequence_lengths, flags.index.sequence_lengths):
                raise ValueError(f"{p} and {flags_prefix(p)} disagree on document lengths: re-run preprocessing")
            # Copies: the arrays would otherwise view the datasets' memory maps, which close when the
            # next prefix's datasets replace these (a second prefix then read freed memory).
            docs.extend((np.array(toks[i]), np.array(flags[i])) for i in range(len(toks)))
        lo, hi = _split_range(len(docs), split, which)
        order = lo + np.random.default_rng(seed).permutation(hi - lo)
        self.seq_len = L = seq_len
        if len(order) == 0:
            self.tokens = np.zeros(0, np.int64)
            self.flags = np.zeros(0, bool)
            self.doc = np.zeros(0, np.int64)
        else:
            self.tokens = np.concatenate([docs[i][0] for i in order]).astype(np.int64)
            self.flags = np.concatenate([docs[i][1] for i in order]).astype(bool)
            self.doc = np.repeat(np.arange(len(order)), [len(docs[i][0]) for i in order])
        # Conversations whose prompt alone fills a window: their responses are trained with a cut
        # prompt, and their prompt-only windows are dropped (training.setup.sft_windows warns with the numbers).
        prompt_lengths = [int(np.argmax(docs[i][1])) if docs[i][1].any() else len(docs[i][1]) for i in order]
        self.conversations = len(order)
        self.long_prompts = sum(1 for n in prompt_lengths if n >= L)
        self.longest_prompt = max(prompt_lengths, default=0)
        n = len(self.tokens) // L
        first = 1 if shift else 0
        targets = self.flags[: n * L].reshape(n, L)[:, first:]
        self.index = np.nonzero(targets.any(1))[0]
        self.windows_total = n
        if len(self.index) == 0:
            raise ValueError(
                f"the SFT split has no window of {L} tokens with a response token ({len(order)} conversations, "
                f"{len(self.tokens)} tokens); give it more data or a larger share in data.split"
            )

    def __len__(self) -> int:
        return len(self.index)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([b, L] tokens, [b, L] bool response flags, [b, L] conversation ids starting at 0)."""
        L = self.seq_len
        rows = [int(self.index[int(i) % len(self.index)]) for i in torch.as_tensor(indices).flatten().tolist()]
        sl = [slice(w * L, (w + 1) * L) for w in rows]
        tokens = torch.from_numpy(np.stack([self.tokens[s] for s in sl]))
        flags = torch.from_numpy(np.stack([self.flags[s] for s in sl]))
        doc = np.stack([self.doc[s] - self.doc[s.start] for s in sl])
        return tokens, flags, torch.from_numpy(doc)

    def batch_inputs(self, indices) -> dict:
        """Keyword arguments of `build_batch` for these samples."""
        tokens, flags, doc = self.get(indices)
        return {"samples": tokens, "loss_mask": flags, "doc_ids": doc}


def response_fraction(windows: SFTWindows) -> float:
    """Share of the kept windows' tokens that are response tokens (for logs)."""
    L = windows.seq_len
    kept = windows.flags[: windows.windows_total * L].reshape(-1, L)[windows.index]
    return float(kept.mean()) if kept.size else math.nan
