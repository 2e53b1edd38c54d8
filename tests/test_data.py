"""Training samples (megatron GPTDataset / blends), the data-parallel sampler, resumable
per-step batches, evaluation windows and the vocabulary check."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from megablock.data.datasets import (
    TokenWindows, build_gpt_datasets, check_vocabulary, eval_windows, import_megatron_datasets, parse_blend,
)
from megablock.data.loader import StepBatcher
from megablock.data.preprocess import preprocess
from megablock.data.sampler import DataParallelSampler, data_parallel_coords
from megablock.config import DiffusionSection
from megablock.diffusion.curriculum import Curriculum
from megablock.testing import run_distributed, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB, EOD, MASK = 320, 0, 319
L = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small indexed datasets from the committed sample corpus, plus a one-document one."""
    tmp = tmp_path_factory.mktemp("data")
    tiny_tokenizer(tmp / "tok")
    with gzip.open(ROOT / "examples/data/kjv_sample.txt.gz", "rt", encoding="utf-8") as f:
        verses = [next(f) for _ in range(400)]
    (tmp / "kjv.txt").write_text("".join(verses), encoding="utf-8")
    with gzip.open(ROOT / "examples/data/shakespeare_sample.txt.gz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(1500)]
    (tmp / "play.txt").write_text("".join(lines), encoding="utf-8")
    preprocess([str(tmp / "kjv.txt")], str(tmp / "tok"), str(tmp / "kjv"), text_split="line", progress=False)
    preprocess([str(tmp / "play.txt")], str(tmp / "tok"), str(tmp / "play"), progress=False)
    preprocess([str(tmp / "kjv.txt")], str(tmp / "tok"), str(tmp / "onedoc"), text_split="file", progress=False)
    return tmp


def stream(prefix):
    ds = import_megatron_datasets()[2].IndexedDataset(str(prefix))
    return np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)


# ------------------------------------------------------------------ datasets


def test_parse_blend():
    assert parse_blend("a/b") == (["a/b"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([0.3, "a", 0.7, "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match=r"\[weight, prefix"):
        parse_blend([0.3, "a", "b"])
    with pytest.raises(ValueError, match="not all 0"):
        parse_blend([0, "a", 0, "b"])


def test_samples_are_L_consecutive_tokens(data):
    """add_extra_token_to_sequence=False: one epoch of a one-document dataset is exactly its
    consecutive non-overlapping L-token windows (in shuffled order)."""
    train, valid, test = build_gpt_datasets(
        str(data / "onedoc"), seq_len=L, vocab_size=VOCAB, eod_token_id=EOD, train_samples=None,
        split="100,0,0", cache_dir=str(data / "cache"),
    )
    assert valid is None and test is None
    tokens = stream(data / "onedoc")
    n = len(tokens) // L
    windows = TokenWindows(train, L)
    assert len(windows) == n
    got = windows.get(range(n)).numpy()
    assert not np.array_equal(got, tokens[: n * L].reshape(n, L)), "samples are shuffled"
    order = np.lexsort(got.T[::-1])
    want = tokens[: n * L].reshape(n, L)
    assert np.array_equal(got[order], want[np.lexsort(want.T[::-1])])
    assert torch.equal(windows.get([n + 3]), windows.get([3]))  # indices wrap


def test_weighted_blend_without_torch_distributed(data):
    train, valid, _ = build_gpt_datasets(
        [0.25, str(data / "kjv"), 0.75, str(data / "play")], seq_len=L, vocab_size=VOCAB,
        eod_token_id=EOD, train_samples=400, valid_samples=8, split="90,10,0", cache_dir=str(data / "cache"),
    )
    assert len(train) == 400 and valid is not None
    ids = np.array([train[i]["dataset_id"] for i in range(400)])
    assert abs((ids == 0).mean() - 0.25) < 0.02  # megatron's blending is deterministic, ~exact
    assert TokenWindows(train, L).get([0, 1, 2]).shape == (3, L)
    with pytest.raises(FileNotFoundError, match="tools/preprocess_data.py"):
        build_gpt_datasets(str(data / "missing"), seq_len=L, vocab_size=VOCAB, eod_token_id=EOD, train_samples=1)


def test_eval_windows_read_the_stored_stream(data):
    tokens = stream(data / "kjv")
    w = eval_windows(str(data / "kjv"), L)
    assert w.shape == (len(tokens) // L, L)
    assert torch.equal(w.flatten(), torch.from_numpy(tokens[: w.numel()]))
    w = eval_windows(str(data / "kjv"), L, max_tokens=5 * L + 7)
    assert w.shape == (5, L) and torch.equal(w.flatten(), torch.from_numpy(tokens[: 5 * L]))
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(str(data / "kjv"), L, max_tokens=L - 1)


def test_check_vocabulary(data):
    tokens = stream(data / "kjv")
    mask = next(i for i in range(VOCAB - 1, 0, -1) if i not in set(tokens.tolist()))
    stats = check_vocabulary(str(data / "kjv"), VOCAB, mask)
    assert stats == {"max_token_id": int(tokens.max()), "tokens": len(tokens)}
    with pytest.raises(ValueError, match="different tokenizer; re-run tools/preprocess_data.py"):
        check_vocabulary(str(data / "kjv"), int(tokens.max()), 0)
    with pytest.raises(ValueError, match="--mask-token"):
        check_vocabulary(str(data / "kjv"), VOCAB, None)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        check_vocabulary(str(data / "kjv"), VOCAB, VOCAB)
    with pytest.raises(ValueError, match="contains the mask token id"):
        check_vocabulary(str(data / "kjv"), VOCAB, int(tokens[5]))


# ------------------------------------------------------------------ sampler


def test_data_parallel_ranks_partition_the_global_batch():
    G, m = 16, 2
    single = DataParallelSampler(G, m)
    for consumed in (0, 16, 48):
        stream_order = [i for mb in single.micro_batches(consumed) for i in mb]
        assert stream_order == list(range(consumed, consumed + G))
        ranks = [DataParallelSampler(G, m, r, 2).micro_batches(consumed) for r in range(2)]
        assert all(len(r) == 4 for r in ranks)  # accumulation steps = 16 / (2 * 2)
        # micro-step a of rank r holds positions a*m*D + r*m ...; interleaving gives the stream
        merged = [i for a in range(4) for r in range(2) for i in ranks[r][a]]
        assert merged == stream_order
        assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))


def test_tensor_and_pipeline_ranks_get_identical_samples():
    world, tp, pp = 8, 2, 2
    coords = [data_parallel_coords(r, world, tp, pp) for r in range(world)]
    # tensor fastest, then data, then pipeline
    assert coords == [(0, 2), (0, 2), (1, 2), (1, 2), (0, 2), (0, 2), (1, 2), (1, 2)]
    batches = [DataParallelSampler(8, 2, *c).micro_batches(24) for c in coords]
    assert batches[0] == batches[1] == batches[4] == batches[5]
    assert batches[2] == batches[3] == batches[6] == batches[7] != batches[0]


def test_sampler_validation():
    with pytest.raises(ValueError, match="multiple of 4"):
        DataParallelSampler(10, 2, 0, 2)
    with pytest.raises(ValueError, match="rank 2 not in"):
        DataParallelSampler(8, 2, 2, 2)


# ------------------------------------------------------------------ batches per step


def make_loader(data, dp_rank=0, dp_size=1, G=8, m=2, cache="cache", **cfg):
    train, _, _ = build_gpt_datasets(
        str(data / "kjv"), seq_len=L, vocab_size=VOCAB, eod_token_id=EOD, train_samples=200,
        split="100,0,0", cache_dir=str(data / cache),
    )
    stages = [{"block_size": 1, "tokens": 2 * G * L}, {"block_size": 4, "tokens": G * L}, {"block_size": 8}]
    return StepBatcher(
        TokenWindows(train, L), DataParallelSampler(G, m, dp_rank, dp_size),
        DiffusionSection(stages=stages, **cfg), mask_token_id=MASK, seed=17, eod_token_id=EOD,
    )


def batches_equal(a, b):
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("input_ids", "position_ids", "targets", "diff_weights", "ar_weights")
    ) and a.diff_normalizer == b.diff_normalizer and a.layout == b.layout


def test_resume_reproduces_batches_and_noise(data):
    loader = make_loader(data, complementary=True, antithetic=True)
    G = 8
    run = [loader.step(s * G) for s in range(5)]
    assert [r.block_size for r in run] == [1, 1, 4, 8, 8] and [r.curriculum_stage for r in run] == [0, 0, 1, 2, 2]
    resumed = make_loader(data, complementary=True, antithetic=True)  # fresh objects, as after a restart
    for s in (3, 2, 4):
        again = resumed.step(s * G)
        assert again.block_size == run[s].block_size
        assert all(batches_equal(x, y) for x, y in zip(run[s].micro_batches, again.micro_batches))


def _rows_by_index(step, sampler):
    rows = {}
    for indices, batch in zip(sampler.micro_batches(step.consumed_samples), step.micro_batches):
        for k, idx in enumerate(indices):
            rows[idx] = (batch.input_ids[k], batch.targets[k], batch.diff_weights[k], batch.ar_weights[k])
    return rows


def test_dp_ranks_union_equals_single_rank_stream_noise_included(data):
    single = make_loader(data)
    ranks = [make_loader(data, dp_rank=r, dp_size=2) for r in range(2)]
    for consumed in (16, 24):  # block sizes 4 and 8: real noise
        want = _rows_by_index(single.step(consumed), single.sampler)
        got = {}
        for loader in ranks:
            part = _rows_by_index(loader.step(consumed), loader.sampler)
            assert not set(part) & set(got)
            got.update(part)
        assert sorted(got) == sorted(want) == list(range(consumed, consumed + 8))
        for idx in want:
            assert all(torch.equal(a, b) for a, b in zip(want[idx], got[idx]))


def _distributed_first_step(rank, world_size, data_dir):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    dp_rank, dp_size = data_parallel_coords(rank, world_size)
    loader = make_loader(Path(data_dir), dp_rank, dp_size, cache="cache_gloo")  # fresh cache
    step = loader.step(16)
    return loader.sampler.micro_batches(16), [b.input_ids for b in step.micro_batches]


def test_two_gloo_ranks_build_datasets_and_split_the_batch(data, tmp_path):
    """With torch.distributed up, rank 0 builds the index cache and rank 1 loads it (barrier
    inside megatron); each rank's rows equal the single-process rows of the same samples."""
    results = run_distributed(_distributed_first_step, 2, str(data))
    single = make_loader(data)
    want = _rows_by_index(single.step(16), single.sampler)
    seen = []
    for indices, inputs in results:
        for mb, x in zip(indices, inputs):
            for k, idx in enumerate(mb):
                assert torch.equal(x[k], want[idx][0])
                seen.append(idx)
    assert sorted(seen) == list(range(16, 24))
