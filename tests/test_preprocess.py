"""tools/preprocess_data.py: tokens round-trip exactly, workers do not change the output, and
every bad input fails with its own message, a non-zero exit and no .bin/.idx left behind."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megablock.commands.preprocess_data import main
from megablock.data.preprocess import PreprocessError, preprocess
from megablock.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

DOCS = [
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be,\nthat is the question.",
    "The quick brown fox jumps over the lazy dog 0123456789 times. Ünïcödé ✓",
    "A block-diffusion model denoises a block of tokens at a time.",
] * 30


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def read_back(prefix):
    from megablock.data.datasets import import_megatron_datasets

    ds = import_megatron_datasets()[2].IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds


def expected(tok, docs, eod=True):
    return [tok(d, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eod else []) for d in docs]


def leftovers(prefix):
    """Files next to `prefix` whose names start with it (outputs or temporaries)."""
    parent = Path(prefix).parent
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(Path(prefix).name))


def write_jsonl(path, docs, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": 1}) + "\n")


# ------------------------------------------------------------------ round trip


def test_jsonl_txt_gz_round_trip(tmp_path, tok_dir, hf_tok):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:40])
    write_jsonl(tmp_path / "b.jsonl.gz", DOCS[40:80], opener=gzip.open)
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS[80:100]) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n\n".join(DOCS[100:]) + "\n\n")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt", "d.txt.gz")]
    stats = preprocess(inputs, str(tok_dir), str(tmp_path / "out" / "ds"), progress=False)
    docs, ds = read_back(tmp_path / "out" / "ds")
    assert docs == expected(hf_tok, DOCS)
    assert stats.documents == len(DOCS) and stats.tokens == sum(map(len, docs))
    assert ds.index.dtype == np.uint16  # vocabulary of 320 fits
    assert list(ds.index.document_indices) == list(range(len(DOCS) + 1))  # one sequence per doc
    assert leftovers(tmp_path / "out" / "ds") == ["ds.bin", "ds.idx"]


def test_one_and_two_workers_write_identical_files(tmp_path, tok_dir):
    # enough text for many chunks, so the two workers really interleave
    write_jsonl(tmp_path / "a.jsonl", [d * 40 for d in DOCS] * 4)
    for w in (1, 2):
        preprocess([str(tmp_path / "a.jsonl")], str(tok_dir), str(tmp_path / f"w{w}"), workers=w, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_text_split_modes_and_no_eod(tmp_path, tok_dir, hf_tok):
    text = "line one\nline two\n\nline three\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    cases = {
        "blank-line": ["line one\nline two", "line three"],
        "line": ["line one", "line two", "line three"],
        "file": [text],
    }
    for split, docs in cases.items():
        prefix = tmp_path / split
        preprocess([str(tmp_path / "t.txt")], str(tok_dir), str(prefix), text_split=split,
                   append_eod=False, progress=False)
        assert read_back(prefix)[0] == expected(hf_tok, docs, eod=False), split


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60, model_type="bpe",
        minloglevel=2, eos_id=2, bos_id=1, unk_id=0, pad_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    (tmp_path / "in.txt").write_text("\n".join(DOCS[:8]) + "\n", encoding="utf-8")
    preprocess([str(tmp_path / "in.txt")], str(tmp_path / "sp.model"), str(tmp_path / "ds"),
               text_split="line", workers=2, progress=False)
    lines = "\n".join(DOCS[:8]).split("\n")
    assert read_back(tmp_path / "ds")[0] == [sp.encode(line) + [2] for line in lines]


# ------------------------------------------------------------------ bad inputs


def _bad_inputs(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, DOCS)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    write_jsonl(tmp_path / "nokey.jsonl", ["fine", "also fine"])
    with open(tmp_path / "nokey.jsonl", "a") as f:
        f.write(json.dumps({"content": "wrong key"}) + "\n")
    (tmp_path / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n\nna\u00efve\n".encode("latin-1"))
    (tmp_path / "trunc.txt.gz").write_bytes(gzip.compress(b"some text\n" * 1000)[:60])
    (tmp_path / "adir").mkdir()
    return {
        "missing": ([str(tmp_path / "nope.txt")], "nope.txt does not exist"),
        "empty": ([str(tmp_path / "empty.txt")], "empty.txt is empty"),
        "no documents": ([str(tmp_path / "blank.txt")], "blank.txt contains no documents"),
        "directory": ([str(tmp_path / "adir")], "is not a regular file"),
        "missing key": ([str(good), str(tmp_path / "nokey.jsonl")], r"nokey.jsonl line 3: no 'text' key .*--json-key"),
        "invalid json": ([str(tmp_path / "badjson.jsonl")], "badjson.jsonl line 2: invalid JSON"),
        "non-utf8": ([str(tmp_path / "latin1.txt")], r"latin1.txt line 1: not valid UTF-8.*iconv"),
        "truncated gzip": ([str(tmp_path / "trunc.txt.gz")], "trunc.txt.gz: damaged or truncated gzip"),
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_inputs_fail_cleanly(tmp_path, tok_dir, workers):
    for name, (inputs, message) in _bad_inputs(tmp_path).items():
        prefix = tmp_path / "out" / name.replace(" ", "_")
        with pytest.raises(PreprocessError, match=message):
            preprocess(inputs, str(tok_dir), str(prefix), workers=workers, progress=False)
        assert leftovers(prefix) == [], name


def test_bad_tokenizer_and_cli_exit_code(tmp_path, tok_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    code = main(["--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path / "none"),
                 "--output-prefix", str(tmp_path / "x"), "--quiet"])
    assert code == 1 and "neither a Hugging Face tokenizer folder" in capsys.readouterr().err
    assert leftovers(tmp_path / "x") == []


def test_existing_output_survives_a_failed_run(tmp_path, tok_dir):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    preprocess([str(tmp_path / "a.jsonl")], str(tok_dir), str(tmp_path / "ds"), progress=False)
    before = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "bad.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(PreprocessError):
        preprocess([str(tmp_path / "bad.jsonl")], str(tok_dir), str(tmp_path / "ds"), progress=False)
    assert (tmp_path / "ds.bin").read_bytes() == before and leftovers(tmp_path / "ds") == ["ds.bin", "ds.idx"]


def test_cli_subprocess_bad_input(tmp_path, tok_dir):
    """The real script: an error deep in the second file, with 2 workers already busy on the
    first, exits 1 with the file and line, and leaves nothing."""
    write_jsonl(tmp_path / "good.jsonl", DOCS * 10)
    write_jsonl(tmp_path / "late.jsonl", DOCS * 10)
    with open(tmp_path / "late.jsonl", "a") as f:
        f.write('{"txt": "typo"}\n')
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
         "--input", str(tmp_path / "good.jsonl"), str(tmp_path / "late.jsonl"),
         "--output-prefix", str(tmp_path / "bad"), "--tokenizer", str(tok_dir), "--workers", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1, bad.stderr
    assert f"late.jsonl line {len(DOCS) * 10 + 1}: no 'text' key" in bad.stderr
    assert "no output written" in bad.stderr
    assert leftovers(tmp_path / "bad") == []


def test_cli_main_good_run(tmp_path, tok_dir, hf_tok, capsys):
    write_jsonl(tmp_path / "good.jsonl", DOCS * 10)
    code = main(["--input", str(tmp_path / "good.jsonl"), "--output-prefix", str(tmp_path / "ok"),
                 "--tokenizer", str(tok_dir), "--workers", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "documents: 1,200" in out and "tokens/s" in out
    assert read_back(tmp_path / "ok")[0] == expected(hf_tok, DOCS * 10)
