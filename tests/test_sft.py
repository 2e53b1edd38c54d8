"""Instruction (SFT) data: rendering, response flags on disk, packed windows, and the batches
training builds from them (prompt tokens never masked and never targets, response tokens noised
and scored, document masks for several conversations per window, empty windows skipped)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.config import ConfigError, load_config  # noqa: E402
from megablock.data.datasets import import_megatron_datasets  # noqa: E402
from megablock.commands.preprocess_data import main as preprocess_main  # noqa: E402
from megablock.data.preprocess import PreprocessError  # noqa: E402
from megablock.data.sft import SFTWindows, chat_tokens, flags_prefix, preprocess_sft  # noqa: E402
from megablock.diffusion.batch import build_batch  # noqa: E402
from megablock.diffusion.masks import dense_mask  # noqa: E402
from megablock.testing import tiny_tokenizer  # noqa: E402

# A small ChatML-style template (the format SmolLM2-Instruct and Qwen use).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
PAIRS = [
    ("To be, or not to be,", " that is the question."),
    ("In the beginning", " God created the heaven and the earth."),
    ("The quick brown fox", " jumps over the lazy dog."),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(d / "plain", with_mask=True)
    fast = tiny_tokenizer(d / "chat", with_mask=True)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(d / "chat"))
    return d


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read(prefix):
    idx = import_megatron_datasets()[2]
    toks, flags = idx.IndexedDataset(prefix), idx.IndexedDataset(flags_prefix(prefix))
    return [np.asarray(toks[i]).tolist() for i in range(len(toks))], [np.asarray(flags[i]).tolist() for i in range(len(flags))]


def test_prompt_response_tokens_and_flags(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir / "plain"))
    src = _jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    counts = preprocess_sft([src], str(tok_dir / "plain"), str(tmp_path / "sft"), progress=False)
    tokens, flags = _read(str(tmp_path / "sft"))
    for (p, r), ids, fl in zip(PAIRS, tokens, flags):
        ep, er = tok(p, add_special_tokens=False)["input_ids"], tok(r, add_special_tokens=False)["input_ids"]
        assert ids == ep + er + [tok.eos_token_id]  # each text tokenized on its own, EOD appended
        assert fl == [0] * len(ep) + [1] * len(er) + [0]  # the separator is never a target
    assert counts["documents"] == 3 and counts["response_tokens"] == sum(map(sum, flags))


def test_chat_renders_exactly_as_apply_chat_template(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir / "chat"))
    chats = [
        [{"role": "user", "content": "To be, or not to be"}, {"role": "assistant", "content": "that is the question."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "In the beginning"},
         {"role": "assistant", "content": "God created"}, {"role": "user", "content": "the heaven"},
         {"role": "assistant", "content": "and the earth."}],
    ]
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats])
    preprocess_sft([src], str(tok_dir / "chat"), str(tmp_path / "chat"), append_eod=False, progress=False)
    tokens, flags = _read(str(tmp_path / "chat"))
    for messages, ids, fl in zip(chats, tokens, flags):
        reference = tok.apply_chat_template(messages, tokenize=True)
        reference = reference["input_ids"] if hasattr(reference, "keys") else reference
        assert ids == list(reference) == chat_tokens(tok, messages)
        # Flagged tokens decode to exactly the assistant turns (content plus end-of-turn).
        spans, run = [], []
        for t, f in zip(ids, fl):
            if f:
                run.append(t)
            elif run:
                spans.append(run)
                run = []
        if run:
            spans.append(run)
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tok.decode(s) for s in spans] == [f"{a}<|endoftext|>\n" for a in assistant]


def test_chat_without_template_is_a_clear_error(tmp_path, tok_dir, capsys):
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(PreprocessError, match="no chat template"):
        preprocess_sft([src], str(tok_dir / "plain"), str(tmp_path / "x"), progress=False)
    assert not (tmp_path / "x.bin").exists()  # nothing half-written
    rc = preprocess_main(["--format", "sft", "--input", src, "--tokenizer", str(tok_dir / "plain"),
                          "--output-prefix", str(tmp_path / "x"), "--quiet"])
    assert rc == 1 and "no chat template" in capsys.readouterr().err


def test_bad_records_name_the_line(tmp_path, tok_dir):
    src = _jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "response": "b"}, {"text": "raw"}])
    with pytest.raises(PreprocessError, match="line 2"):
        preprocess_sft([src], str(tok_dir / "plain"), str(tmp_path / "b"), progress=False)


def test_data_format_is_validated_at_load():
    assert load_config(overrides=["data.format=sft"]).data.format == "sft"
    with pytest.raises(ConfigError, match="data.format='chat' is not one of"):
        load_config(overrides=["data.format=chat"])
    with pytest.raises(ConfigError, match="weighted blends"):
        load_config(overrides=["data.format=sft", "data.prefix=[0.5, a, 0.5, b]"])


# ----------------------------------------------------------------------------- windows and batches


def _packed(tmp_path, tok_dir, rows, L, **kw):
    src = _jsonl(tmp_path / "p.jsonl", rows)
    preprocess_sft([src], str(tok_dir / "plain"), str(tmp_path / "p"), progress=False)
    return SFTWindows(str(tmp_path / "p"), L, **kw)


def test_windows_pack_conversations_with_ids_and_skip_empty_ones(tmp_path, tok_dir):
    # Conversations with long prompts: some windows hold prompt tokens only and must be skipped.
    rows = [{"prompt": "In the beginning God created the heaven and the earth. " * 3, "response": " Amen."},
            {"prompt": "To be,", "response": " or not to be."}, {"prompt": "The quick", "response": " brown fox."}]
    w = _packed(tmp_path, tok_dir, rows, 16, seed=0)
    tokens, flags = _read(str(tmp_path / "p"))
    order = np.random.default_rng(0).permutation(3)
    stream = sum((tokens[i] for i in order), [])
    fstream = sum((flags[i] for i in order), [])
    doc = sum(([k] * len(tokens[i]) for k, i in enumerate(order)), [])
    n = len(stream) // 16
    kept = [k for k in range(n) if any(fstream[k * 16 + 1:(k + 1) * 16])]  # token 0 is never a target
    assert 0 < len(kept) < n and len(w) == len(kept)
    got_t, got_f, got_d = w.get(list(range(len(kept))))
    for row, k in enumerate(kept):
        sl = slice(k * 16, (k + 1) * 16)
        assert got_t[row].tolist() == stream[sl]
        assert got_f[row].tolist() == [bool(x) for x in fstream[sl]]
        assert got_d[row].tolist() == [d - doc[k * 16] for d in doc[sl]]
    assert torch.equal(w.get([len(kept)])[0], got_t[:1])  # past the end: the next epoch, same order


def _window_with_two_conversations(tmp_path, tok_dir):
    rows = [{"prompt": p, "response": r} for p, r in PAIRS] * 2
    w = _packed(tmp_path, tok_dir, rows, 32, seed=3)
    for i in range(len(w)):
        t, f, d = w.get([i])
        if d.max() >= 1 and f.any():
            return w, i
    raise AssertionError("no window holds two conversations")


@pytest.mark.parametrize("block_size", [1, 4])
def test_prompt_tokens_never_masked_nor_targets(tmp_path, tok_dir, block_size):
    w, _ = _window_with_two_conversations(tmp_path, tok_dir)
    idx = list(range(len(w)))
    inputs = w.batch_inputs(idx)
    x0, resp = inputs["samples"], inputs["loss_mask"]
    b, L = x0.shape
    mask_id = 319
    for seed in range(5):
        batch = build_batch(**inputs, sample_indices=idx, block_size=block_size, mask_token_id=mask_id, seed=seed)
        if block_size == 1:  # AR mode: every weight sits where the next token is a response token
            assert torch.equal(batch.diff_weights[:, :-1] > 0, resp[:, 1:])
            assert torch.equal(batch.ar_weights[:, :-1] > 0, resp[:, 1:])
            assert batch.diff_normalizer == resp[:, 1:].sum().item()
            continue
        xt, clean = batch.input_ids[:, :L], batch.input_ids[:, L:]
        assert torch.equal(clean, x0)
        masked = xt == mask_id
        assert not (masked & ~resp).any()  # prompt tokens stay visible in the noised half
        assert masked.any()
        # Each output position is weighted iff the token it predicts (its next one) is a response token:
        # noised half where that token is masked, clean half L_AR everywhere and L_diff at block starts.
        nxt_resp = torch.zeros_like(resp)
        nxt_resp[:, :-1] = resp[:, 1:]
        nxt_masked = torch.zeros_like(masked)
        nxt_masked[:, :-1] = masked[:, 1:]
        assert torch.equal(batch.diff_weights[:, :L] > 0, nxt_masked)
        assert torch.equal(batch.ar_weights[:, L:] > 0, nxt_resp)
        starts = torch.zeros(L, dtype=torch.bool)
        starts[block_size - 1:L - 1:block_size] = True
        assert torch.equal(batch.diff_weights[:, L:] > 0, nxt_resp & starts)
        assert batch.diff_normalizer == resp[:, 1:].sum().item()  # per response token
        targets = torch.cat([torch.where(nxt_masked, torch.roll(x0, -1, 1), 0), torch.where(nxt_resp, torch.roll(x0, -1, 1), 0)], 1)
        assert torch.equal(batch.targets, targets)
        # Within the masked response tokens the noise is the pretraining noise (same draws).
        plain = build_batch(x0, idx, block_size, mask_token_id=mask_id, seed=seed)
        assert torch.equal(masked, (plain.input_ids[:, :L] == mask_id) & resp)


def test_document_masks_of_a_packed_window(tmp_path, tok_dir):
    w, i = _window_with_two_conversations(tmp_path, tok_dir)
    inputs = w.batch_inputs([i])
    doc = inputs["doc_ids"][0]
    batch = build_batch(**inputs, sample_indices=[i], block_size=4, mask_token_id=319, seed=0)
    assert torch.equal(batch.layout.doc_ids, inputs["doc_ids"])
    mask = dense_mask(batch.layout)[0]  # [2L, 2L] bool, True = may attend
    L = inputs["samples"].shape[1]
    pos = torch.arange(L)
    same_doc = doc[:, None] == doc[None, :]
    blk = pos // 4
    # clean half: causal within a conversation; noised half: own block (same conversation) plus the
    # clean prefix before the block in the same conversation; never clean -> noised.
    assert torch.equal(mask[L:, L:], (pos[None, :] <= pos[:, None]) & same_doc)
    assert torch.equal(mask[:L, :L], (blk[:, None] == blk[None, :]) & same_doc)
    assert torch.equal(mask[:L, L:], (blk[None, :] < blk[:, None]) & same_doc)
    assert not mask[L:, :L].any()
    assert (doc != doc[0]).any()  # the window really spans two conversations


def test_complementary_copies_keep_prompts_visible(tmp_path, tok_dir):
    w, i = _window_with_two_conversations(tmp_path, tok_dir)
    inputs = w.batch_inputs([i])
    resp = inputs["loss_mask"]
    batch = build_batch(**inputs, sample_indices=[i], block_size=4, mask_token_id=319, seed=0, complementary=True)
    L = resp.shape[1]
    masked = batch.input_ids[:, :L] == 319
    assert not (masked & ~torch.cat([resp, resp])).any()
    assert batch.diff_normalizer == 2 * resp[:, 1:].sum().item()
    assert batch.layout.doc_ids.shape == (2, L)


def test_without_flags_the_batch_is_unchanged():
    x0 = torch.randint(0, 300, (3, 16))
    a = build_batch(x0, [0, 1, 2], 4, mask_token_id=319, seed=7)
    b = build_batch(x0, [0, 1, 2], 4, mask_token_id=319, seed=7, loss_mask=torch.ones_like(x0, dtype=torch.bool))
    for name in ("input_ids", "targets", "diff_weights", "ar_weights"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.diff_normalizer == b.diff_normalizer  # all-response flags are pretraining


def test_training_runs_on_sft_data_with_the_confidence_term(tmp_path):
    """examples/pretrain_nbdiff.py with data.format=sft (and the confidence term on): it trains,
    logs finite losses, validates on the SFT validation split, and the curriculum still advances."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from megablock.checkpoint.convert import convert
    from megablock.testing import save_tiny_hf_model

    root = Path(__file__).resolve().parents[1]
    save_tiny_hf_model(tmp_path / "hf", "llama")
    convert(tmp_path / "ckpt", hf_dir=tmp_path / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    rows = [{"prompt": p, "response": r} for p, r in PAIRS] * 12
    src = _jsonl(tmp_path / "d.jsonl", rows)
    preprocess_sft([src], str(tmp_path / "ckpt" / "tokenizer"), str(tmp_path / "sft"), progress=False)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "pretrain_nbdiff.py"), "--config", str(root / "examples" / "configs" / "tiny.yaml"),
         "--set", f"model.init_from={tmp_path / 'ckpt'}", f"data.prefix={tmp_path / 'sft'}", "data.format=sft",
         f"checkpoint.save_dir={tmp_path / 'run'}", "train.steps=4", "train.eval_interval=4",
         "diffusion.confidence_loss_weight=0.1", "diffusion.stages=[{block_size: 1, tokens: 128}, {block_size: 4}]"],
        env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["block_size"] for m in metrics if "loss" in m] == [1, 4, 4, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_two_prefixes_pack_the_conversations_of_both(tmp_path, tok_dir):
    # The first prefix's datasets are closed when the second's are opened: its documents must
    # have been copied out (they once viewed freed memory maps, and packing segfaulted).
    first = [{"prompt": "To be,", "response": " or not to be."}, {"prompt": "The quick", "response": " brown fox."}]
    second = [{"prompt": "", "response": " In the beginning God created the heaven and the earth."}]
    for name, rows in (("a", first), ("b", second)):
        preprocess_sft([_jsonl(tmp_path / f"{name}.jsonl", rows)], str(tok_dir / "plain"), str(tmp_path / name),
                       progress=False)
    w = SFTWindows([str(tmp_path / "a"), str(tmp_path / "b")], 8, seed=0)
    docs = _read(str(tmp_path / "a"))[0] + _read(str(tmp_path / "b"))[0]
    order = np.random.default_rng(0).permutation(len(docs))
    assert w.tokens.tolist() == sum((docs[i] for i in order), [])
    assert len(w) > 0


def test_lone_surrogate_names_the_file_and_line(tmp_path, tok_dir, capsys):
    """Issue 25.10: a lone surrogate ("\\ud800") was the tokenizer's TypeError, no file or line."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "x\\ud800y", "response": "b"}\n')
    with pytest.raises(PreprocessError, match=r"s.jsonl line 2: the text holds \\ud800, a lone UTF-16 surrogate"):
        preprocess_sft([str(src)], str(tok_dir / "plain"), str(tmp_path / "x"), progress=False)
    rc = preprocess_main(["--format", "sft", "--input", str(src), "--tokenizer", str(tok_dir / "plain"),
                          "--output-prefix", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "line 2" in err and "unexpected" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x*"))  # nothing written


def test_long_prompts_are_counted_and_warned_once(tmp_path, tok_dir, caplog):
    """Issue 25.12: SFT prompts longer than seq_len left 76 of 1,259 windows, silently."""
    import logging

    from megablock.training.setup import warn_long_prompts

    rows = [{"prompt": "In the beginning God created the heaven and the earth. " * 3, "response": " Amen."},
            {"prompt": "To be,", "response": " or not to be."}, {"prompt": "The quick", "response": " brown fox."}]
    w = _packed(tmp_path, tok_dir, rows, 16, seed=0)
    tokens, flags = _read(str(tmp_path / "p"))
    longest = max(f.index(1) for f in flags)
    assert (w.conversations, w.long_prompts, w.longest_prompt) == (3, 1, longest) and longest >= 16
    with caplog.at_level(logging.WARNING, logger="megablock.training.setup"):
        warn_long_prompts(w, 16)
    [record] = caplog.records
    assert f"1 of 3 conversations have a prompt of >= data.seq_len=16 tokens (longest {longest})" in record.message
    assert f"{len(w)} of {w.windows_total} packed windows kept" in record.message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megablock.training.setup"):
        (tmp_path / "short").mkdir()
        warn_long_prompts(_packed(tmp_path / "short", tok_dir, rows[1:], 16, seed=0), 16)
    assert not caplog.records
