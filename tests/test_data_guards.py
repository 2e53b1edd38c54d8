"""Data defects of issue 13: an empty split must fail fast (not hang megatron-core), truncated or
mismatched .bin/.idx files name the file, preprocess never leaves a mismatched pair, the
repository's one-verse-per-line sample is not one document, and the vocabulary check runs at
every block size."""
import gzip
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from megablock.config import ConfigError, load_config
from megablock.data import preprocess as pre
from megablock.data.datasets import (
    DatasetFileError, build_gpt_datasets, check_vocabulary, open_indexed, split_document_counts,
)
from megablock.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB, EOD, L = 320, 0, 16


@contextmanager
def deadline(seconds: int):
    """Turn a hang (the defect: megatron-core loops forever over an empty split) into a failure."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: the empty split hangs")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(path)
    return path


def _dataset(tmp, tok, name, docs):
    (tmp / f"{name}.jsonl").write_text("".join('{"text": "%s"}\n' % d for d in docs), encoding="utf-8")
    pre.preprocess([str(tmp / f"{name}.jsonl")], str(tok), str(tmp / name), progress=False)
    return str(tmp / name)


def test_empty_validation_split_is_an_error_not_a_hang(tmp_path, tok):
    # 4 documents with tiny.yaml's 90,10,0: round(0.9 * 4) = 4 train, 0 validation documents.
    prefix = _dataset(tmp_path, tok, "four", ["In the beginning God created the heaven and the earth."] * 4)
    assert split_document_counts(4, "90,10,0") == [4, 0, None]
    with deadline(60), pytest.raises(ConfigError) as err:
        build_gpt_datasets(prefix, seq_len=L, vocab_size=VOCAB, eod_token_id=EOD, train_samples=8,
                           valid_samples=2, split="90,10,0", cache_dir=str(tmp_path / "cache"))
    message = str(err.value)
    assert "validation split 0 of the 4 documents" in message and "data.split" in message
    assert "train.eval_interval=0" in message
    # Without validation samples asked for, the same data builds.
    train, valid, _ = build_gpt_datasets(prefix, seq_len=L, vocab_size=VOCAB, eod_token_id=EOD, train_samples=8,
                                         split="90,10,0", cache_dir=str(tmp_path / "cache"))
    assert len(train) >= 8
    # Megatron's own rounding for a bigger dataset: the count matches what it builds.
    assert split_document_counts(24, "98,2,0") == [24, 0, None]  # round(23.52)
    assert split_document_counts(25, "98,2,0") == [24, 1, None]  # round(24.5) = 24
    assert split_document_counts(100, "98,2,0") == [98, 2, None]


def test_empty_split_in_a_weighted_blend(tmp_path, tok):
    many = _dataset(tmp_path, tok, "many", [f"verse number {i} of the book" for i in range(60)])
    few = _dataset(tmp_path, tok, "few", ["a single document"])
    with deadline(60), pytest.raises(ConfigError, match=r"validation split 0 of the 1 documents in .*few"):
        build_gpt_datasets([0.5, many, 0.5, few], seq_len=L, vocab_size=VOCAB, eod_token_id=EOD, train_samples=8,
                           valid_samples=2, split="90,10,0", cache_dir=str(tmp_path / "cache"))


def test_training_setup_reports_the_empty_split(tmp_path, tok):
    """The path the trainer takes (build_data) reaches the message instead of megatron's loop."""
    from megablock.training.setup import build_data

    prefix = _dataset(tmp_path, tok, "three", ["one document", "another document", "a third"])
    cfg = load_config(str(ROOT / "examples/configs/tiny.yaml"),
                      [f"data.prefix={prefix}", f"data.cache_dir={tmp_path / 'cache'}"])
    model_cfg = SimpleNamespace(vocab_size=VOCAB + 1, mask_token_id=VOCAB, eos_token_id=EOD)
    info = SimpleNamespace(dp_rank=0, dp=1)
    with deadline(60), pytest.raises(ConfigError, match="validation split 0 of the 3 documents"):
        build_data(cfg, model_cfg, info)


def test_kjv_sample_is_many_documents_by_default(tmp_path, tok):
    # The committed sample has one verse per line and no blank line: the default split used to
    # make it ONE document, which leaves any validation split empty.
    with gzip.open(ROOT / "examples/data/kjv_sample.txt.gz", "rt", encoding="utf-8") as f:
        verses = [next(f) for _ in range(50)]
    (tmp_path / "kjv.txt").write_text("".join(verses), encoding="utf-8")
    stats = pre.preprocess([str(tmp_path / "kjv.txt")], str(tok), str(tmp_path / "kjv"), progress=False)
    assert stats.documents == 50
    # Text with blank lines keeps blank-line documents by default.
    (tmp_path / "play.txt").write_text("a line\nmore\n\nnext speech\n", encoding="utf-8")
    assert pre.preprocess([str(tmp_path / "play.txt")], str(tok), str(tmp_path / "play"), progress=False).documents == 2


def test_truncated_files_name_the_file(tmp_path, tok):
    prefix = _dataset(tmp_path, tok, "ds", [f"document {i} with some words" for i in range(20)])
    open_indexed(prefix)  # intact
    bin_bytes, idx_bytes = Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()

    Path(prefix + ".bin").write_bytes(bin_bytes[:-7])
    with pytest.raises(DatasetFileError, match=r"ds\.bin has .* the \.bin is truncated.*preprocess_data"):
        open_indexed(prefix)
    with pytest.raises(DatasetFileError, match=r"ds\.bin"):  # the training path
        build_gpt_datasets(prefix, seq_len=L, vocab_size=VOCAB, eod_token_id=EOD, train_samples=4, split="100,0,0")
    with pytest.raises(DatasetFileError, match=r"ds\.bin"):  # the evaluation / vocabulary path
        check_vocabulary(prefix, VOCAB, None, require_mask=False)

    Path(prefix + ".bin").write_bytes(bin_bytes)
    Path(prefix + ".idx").write_bytes(idx_bytes[: len(idx_bytes) // 2])
    with pytest.raises(DatasetFileError, match=r"ds\.idx is truncated or corrupt"):
        open_indexed(prefix)


def test_corrupt_idx_error_has_no_traceback_after_it(tmp_path, tok, monkeypatch):
    """Issue 25.10: megatron's IndexedDataset.__del__ printed an AttributeError traceback after
    the one-line .idx error."""
    import gc
    import sys

    prefix = _dataset(tmp_path, tok, "ds", [f"document {i} with some words" for i in range(20)])
    idx = Path(prefix + ".idx")
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with pytest.raises(DatasetFileError, match=r"ds\.idx is truncated or corrupt"):
        open_indexed(prefix)
    gc.collect()
    assert not ignored, [str(u.exc_value) for u in ignored]


def test_interrupted_install_never_leaves_a_mismatched_pair(tmp_path, tok, monkeypatch):
    old = _dataset(tmp_path, tok, "ds", ["old text"] * 3)
    new_docs = [f"a much longer new document number {i}" for i in range(30)]
    (tmp_path / "new.jsonl").write_text("".join('{"text": "%s"}\n' % d for d in new_docs), encoding="utf-8")
    real_replace = os.replace

    # A hard kill (no handler runs) between the .bin and the .idx rename: the prefix must not
    # pair the new .bin with the old .idx (that pair reads as valid tokens of the wrong data).
    def killed_at_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise SystemExit("kill -9")
        return real_replace(src, dst)

    tmp_bin, tmp_idx = str(tmp_path / "t.bin"), str(tmp_path / "t.idx")
    pre.preprocess([str(tmp_path / "new.jsonl")], str(tok), str(tmp_path / "t"), progress=False)
    monkeypatch.setattr(pre.os, "replace", killed_at_idx)
    with pytest.raises(SystemExit):
        pre.install_pair(tmp_bin, tmp_idx, old)
    monkeypatch.setattr(pre.os, "replace", real_replace)
    with pytest.raises(FileNotFoundError, match=r"ds\.idx not found"):
        open_indexed(old)

    # An interruption the process sees (Ctrl-C) at the same moment completes the new pair.
    _dataset(tmp_path, tok, "ds", ["old text"] * 3)
    calls = []

    def interrupted_once(src, dst):
        calls.append(dst)
        if str(dst).endswith("ds.idx") and len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(pre.os, "replace", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess([str(tmp_path / "new.jsonl")], str(tok), old, progress=False)
    monkeypatch.setattr(pre.os, "replace", real_replace)
    assert len(open_indexed(old)) == len(new_docs)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_vocabulary_checked_when_every_stage_is_ar(tmp_path, tok):
    """All stages B = 1 used to skip the check: ids >= vocab crashed in the embedding."""
    from megablock.training.setup import build_data

    prefix = _dataset(tmp_path, tok, "ds", [f"document {i} with some words" for i in range(40)])
    ds = open_indexed(prefix)  # kept alive: its items are views of its mmap
    top = int(np.max(np.concatenate([ds[i] for i in range(len(ds))])))
    # A model whose vocabulary ends below the data's largest id (padding rows would hold it).
    with pytest.raises(ValueError, match=f"contains token id {top} but the model vocabulary has {top}"):
        check_vocabulary(prefix, top, None, require_mask=False)
    assert check_vocabulary(prefix, top + 1, None, require_mask=False)["max_token_id"] == top
    cfg = load_config(str(ROOT / "examples/configs/tiny.yaml"), [
        f"data.prefix={prefix}", f"data.cache_dir={tmp_path / 'cache'}", "train.eval_interval=0",
        "diffusion.stages=[{block_size: 1}]",
    ])
    model_cfg = SimpleNamespace(vocab_size=top, mask_token_id=None, eos_token_id=EOD)
    with pytest.raises(ValueError, match=f"contains token id {top}"):
        build_data(cfg, model_cfg, SimpleNamespace(dp_rank=0, dp=1))
    # At B = 1 no mask token is needed.
    model_cfg.vocab_size = top + 1
    build_data(cfg, model_cfg, SimpleNamespace(dp_rank=0, dp=1))


@pytest.fixture(scope="module")
def masked_text(tmp_path_factory):
    """A converted tiny model with the mask token <|mask|>, and data whose text contains it 3 times."""
    from megablock.checkpoint.convert import convert
    from megablock.testing import save_tiny_hf_model

    root = tmp_path_factory.mktemp("masked_text")
    save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    docs = [f"document {i} with some words" + (" <|mask|> here" if i in (3, 17, 29) else "") for i in range(40)]
    return root, _dataset(root, root / "ckpt" / "tokenizer", "ds", docs)


def test_mask_token_in_the_data_is_refused_at_block_size_1(masked_text):
    """Issue 25.2: a B = 1-only run skipped the mask check and reached an inf loss."""
    from megablock.checkpoint.format import read_metadata
    from megablock.training.setup import build_data

    root, prefix = masked_text
    model_cfg = read_metadata(root / "ckpt").model
    cfg = load_config(str(ROOT / "examples/configs/tiny.yaml"), [
        f"data.prefix={prefix}", f"data.cache_dir={root / 'cache'}", "train.eval_interval=0",
        "diffusion.stages=[{block_size: 1}]",
    ])
    with pytest.raises(ValueError, match=rf"dataset {prefix} contains the mask token id {model_cfg.mask_token_id} 3 times"):
        build_data(cfg, model_cfg, SimpleNamespace(dp_rank=0, dp=1))
    assert not (root / "cache").exists()  # refused before megatron built any index


def test_evaluate_refuses_data_with_the_mask_token(masked_text, capsys):
    """Issue 25.2: evaluate.py printed "nelbo": Infinity with rc 0."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "tools" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    root, prefix = masked_text
    for block_size in ("1", "4"):
        assert cli.main(["--ckpt", str(root / "ckpt"), "--data", prefix, "--seq-len", "16", "--block-size",
                         block_size, "--json", "--quiet"]) == 1
        out, err = capsys.readouterr()
        assert f"{prefix} contains the model's mask token id" in err and " 3 times" in err, err
        assert "Infinity" not in out and "nelbo" not in out
