"""tools/distill_data.py: the output is the sampler's own greedy continuations, an interrupted run
resumes to the same file as an uninterrupted one, external generations are imported, and the
output feeds SFT preprocessing."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.inference.distill import DistillError, corpus_prompts, distill, import_records  # noqa: E402
from megablock.inference.loading import from_hf_model  # noqa: E402
from megablock.inference.sampler import GenerateConfig  # noqa: E402
from megablock.parallel.state import initialize_parallel  # noqa: E402
from megablock.testing import tiny_hf_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["To be, or not", "In the beginning God", "The quick brown", "And the earth was",
           "Whether 'tis nobler", "A block-diffusion model"]


@pytest.fixture(scope="module")
def im(tmp_path_factory):
    initialize_parallel(1, 1)
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"), with_mask=True)
    hf = tiny_hf_model("llama", seed=0)
    with torch.no_grad():  # peaked, varied distributions: continuations differ between prompts
        hf.lm_head.weight.mul_(40.0)
    model = from_hf_model(hf, mask_token_id=tok.mask_token_id)
    model.tokenizer = tok
    model.eos_token_ids = []  # run every continuation to max_new_tokens
    return model


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_output_is_the_samplers_greedy_continuation(tmp_path, im):
    out = tmp_path / "d.jsonl"
    stats = distill(im, PROMPTS, str(out), max_new_tokens=10, batch_size=4, progress=False)
    records = _records(out)
    assert [r["id"] for r in records] == list(range(len(PROMPTS))) and stats.written == len(PROMPTS)
    sampler = im.sampler()
    for r, prompt in zip(records, PROMPTS):
        # Reference: the same sampler, one prompt at a time, greedy AR (B = 1).
        ids = im.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ref = sampler.generate([ids], GenerateConfig(block_size=1, max_new_tokens=10)).tokens[0]
        assert r["prompt"] == prompt
        assert r["response"] == im.tokenizer.decode(ref) and r["response_tokens"] == 10
    assert len({r["response"] for r in records}) > 1


def test_interrupted_run_resumes_to_the_same_file(tmp_path, im):
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    kw = dict(max_new_tokens=8, batch_size=2, temperature=1.0, seed=5, progress=False)
    distill(im, PROMPTS, str(whole), **kw)
    first = distill(im, PROMPTS, str(part), stop_after_batches=1, **kw)  # "interrupted" after one batch
    assert first.written == 2
    lines = whole.read_text().splitlines(keepends=True)
    with part.open("a") as f:  # then killed inside the next batch: one record written, one torn
        f.write(lines[2] + lines[3][:17])
    resumed = distill(im, PROMPTS, str(part), **kw)  # redoes batch [2, 3], writes only id 3 of it
    assert resumed.written == len(PROMPTS) - 3
    assert part.read_text() == whole.read_text()  # same records, same order, no duplicates
    again = distill(im, PROMPTS, str(part), **kw)
    assert again.written == 0 and part.read_text() == whole.read_text()


def test_import_external_generations(tmp_path):
    src = tmp_path / "ext.jsonl"
    src.write_text(json.dumps({"prompt": "a", "response": "b", "model": "x"}) + "\n\n"
                   + json.dumps({"prompt": "c", "response": "d"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert import_records(str(src), str(out)).written == 2
    assert _records(out) == [{"id": 0, "prompt": "a", "response": "b"}, {"id": 1, "prompt": "c", "response": "d"}]
    assert import_records(str(src), str(out)).written == 0  # resumable too
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DistillError, match="line 1"):
        import_records(str(tmp_path / "bad.jsonl"), str(tmp_path / "o2.jsonl"))


def test_corpus_prompts_cut_prefixes_in_range(tmp_path, im):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(" ".join(PROMPTS[i:] + PROMPTS[:i]) for i in range(6)) + "\n")
    prompts = corpus_prompts(str(corpus), im.tokenizer, 4, 3, 6, seed=0)
    assert len(prompts) == 4
    for p in prompts:
        assert 3 <= len(im.tokenizer(p, add_special_tokens=False)["input_ids"]) <= 6
    assert prompts == corpus_prompts(str(corpus), im.tokenizer, 4, 3, 6, seed=0)  # seeded
    with pytest.raises(DistillError, match="prompts requested"):
        corpus_prompts(str(corpus), im.tokenizer, 10, 3, 6)


def test_cli_writes_records_that_sft_preprocessing_reads(tmp_path, im):
    from megablock.commands.distill_data import main
    from megablock.data.sft import SFTWindows, preprocess_sft

    src = tmp_path / "ext.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "response": " " + p}) + "\n" for p in PROMPTS))
    out = tmp_path / "o.jsonl"
    assert main(["--import", str(src), "--out", str(out)]) == 0
    im.tokenizer.save_pretrained(str(tmp_path / "tok"))
    counts = preprocess_sft([str(out)], str(tmp_path / "tok"), str(tmp_path / "sft"), progress=False)
    assert counts["documents"] == len(PROMPTS) and counts["response_tokens"] > 0
    assert len(SFTWindows(str(tmp_path / "sft"), 8)) > 0


def test_rerun_with_other_settings_is_refused(tmp_path, im):
    """Issue 25.7: a rerun with another --seed / --max-new-tokens / --batch-size appended to the
    same file, silently mixing records of both settings."""
    out = tmp_path / "d.jsonl"
    kw = dict(max_new_tokens=4, batch_size=2, temperature=1.0, seed=7, progress=False)
    distill(im, PROMPTS[:2], str(out), stop_after_batches=1, **kw)
    before = out.read_bytes()
    for change, message in [({"seed": 8}, "seed: d.jsonl has 7, this run 8"),
                            ({"max_new_tokens": 5}, "max_new_tokens: d.jsonl has 4, this run 5"),
                            ({"batch_size": 1}, "batch_size: d.jsonl has 2, this run 1")]:
        with pytest.raises(DistillError, match=message):
            distill(im, PROMPTS, str(out), **{**kw, **change})
        assert out.read_bytes() == before  # nothing appended
    with pytest.raises(DistillError, match="prompts_sha256"):
        distill(im, PROMPTS[::-1][:2], str(out), **kw)
    distill(im, PROMPTS[:2], str(out), **kw)  # the recorded settings resume it
    # A file of records without a settings record (an older megablock) cannot be told apart.
    (tmp_path / "old.jsonl").write_bytes(before)
    with pytest.raises(DistillError, match="no old.jsonl.settings.json"):
        distill(im, PROMPTS[:2], str(tmp_path / "old.jsonl"), **kw)
    assert (tmp_path / "old.jsonl").read_bytes() == before


def test_generation_past_the_models_positions_is_refused(tmp_path, im):
    """Issue 25.7: --max-new-tokens 100000 ran past the model's 256 positions without a word."""
    out = tmp_path / "d.jsonl"
    with pytest.raises(DistillError, match=r"plus max_new_tokens=100000 reaches position .* past the model's 256 "
                                           r"positions .*lower max_new_tokens to \d+ or less"):
        distill(im, PROMPTS, str(out), max_new_tokens=100000, progress=False)
    assert not out.exists() and not (tmp_path / "d.jsonl.settings.json").exists()
    # Issue 25.12: both samplers refuse too (generate.py: a 501-token prompt plus 400 new tokens).
    from megablock.inference.speculative import SpeculativeConfig, speculative_sampler

    with pytest.raises(ValueError, match="a prompt of 250 tokens plus max_new_tokens=7 reaches position 257"):
        im.sampler().generate([[5] * 250], GenerateConfig(block_size=1, max_new_tokens=7))
    with pytest.raises(ValueError, match="shorten the prompt to fewer than 256 tokens"):
        speculative_sampler(im).generate([[5] * 300], SpeculativeConfig(block_size=4, max_new_tokens=4))
    assert len(im.sampler().generate([[5] * 250], GenerateConfig(block_size=1, max_new_tokens=6)).tokens[0]) == 6



def test_corpus_prompts_from_the_kjv_sample_and_zero_prompts(im):
    """Issue 25.7: the default split made the one-verse-per-line kjv sample one document ("1 of 1
    sampled ones"); --num-prompts 0 raised ZeroDivisionError."""
    from pathlib import Path

    kjv = str(Path(__file__).resolve().parents[1] / "examples" / "data" / "kjv_sample.txt.gz")
    prompts = corpus_prompts(kjv, im.tokenizer, 4, 3, 6, seed=0)
    assert len(set(prompts)) == 4
    with pytest.raises(DistillError, match="num_prompts=0 must be >= 1"):
        corpus_prompts(kjv, im.tokenizer, 0, 3, 6)
