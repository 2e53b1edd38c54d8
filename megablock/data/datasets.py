"""Training and evaluation token windows from megatron-core indexed datasets.

Training samples come from megatron-core's `GPTDataset` built through
`BlendedMegatronDatasetBuilder` (so blends, splits and the on-disk index cache behave exactly as in
Megatron-LM).  Settings we rely on (megatron-core 0.16.1):
  - `sequence_length = L` with `add_extra_token_to_sequence = False`: each sample's "tokens" field
    is exactly L consecutive tokens of the shuffled, packed document stream, and consecutive
    samples do not share a token (the AR "labels" field is ignored: the diffusion batch builder
    derives its own targets from the L tokens);
  - `reset_position_ids = reset_attention_mask = eod_mask_loss = False` and
    `create_attention_mask = False`: nothing per-sample is computed that we would throw away
    (document masking, when on, is derived from EOD tokens by the batch builder);
  - the tokenizer object only needs `vocab_size`, `eod` and `unique_identifiers` (part of the
    cache key): `DatasetTokenizer` is that.  It has no `pad`, so megatron pads with -1 and never
    rewrites real tokens (a `pad` equal to a real id would make GPTDataset zero those tokens);
  - without torch.distributed it builds in-process; with it, every rank must call the builder
    (rank 0 builds the index cache, a barrier, the others load it).  We build on every rank: the
    .bin is memory-mapped, so this costs no memory per rank.
"""
from __future__ import annotations

import os
import struct
import warnings
from unittest import mock
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from megablock.config import ConfigError


def import_megatron_datasets():
    """Import megatron-core's dataset modules without its Apex/TE fallback warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.datasets import blended_megatron_dataset_builder as builder
        from megatron.core.datasets import gpt_dataset, indexed_dataset
    return builder, gpt_dataset, indexed_dataset


class DatasetTokenizer:
    """The tokenizer stand-in GPTDatasetConfig needs (no text is tokenized at training time)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    def tokenize(self, text: str):  # pragma: no cover - never called by GPTDataset
        raise NotImplementedError("DatasetTokenizer cannot tokenize; preprocess data first")


def parse_blend(prefix: Union[str, Sequence[Any]]) -> tuple[list[str], Optional[list[float]]]:
    """`data.prefix` -> megatron blend: "p", ["p"], ["p1", "p2"] (weights from sizes) or
    [w1, "p1", w2, "p2"] (weighted)."""
    if isinstance(prefix, (str, os.PathLike)):
        return [str(prefix)], None
    items = list(prefix)
    if not items:
        raise ValueError("data.prefix is empty; give a dataset prefix or [w1, prefix1, w2, prefix2]")
    if all(isinstance(x, (str, os.PathLike)) for x in items):
        return [str(x) for x in items], None
    if len(items) % 2 or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and isinstance(p, (str, os.PathLike))
        for w, p in zip(items[::2], items[1::2])
    ):
        raise ValueError(
            f"data.prefix {items!r} is neither a list of prefixes nor [weight, prefix, weight, "
            "prefix, ...]; write e.g. [0.7, data/wiki, 0.3, data/books]"
        )
    weights = [float(w) for w in items[::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.prefix weights {weights} must be >= 0 and not all 0")
    return [str(p) for p in items[1::2]], weights


def check_prefix_exists(prefix: str) -> None:
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(
                f"dataset {prefix}{ext} not found; create it with tools/preprocess_data.py "
                f"--output-prefix {prefix}, or fix data.prefix"
            )


class DatasetFileError(ValueError):
    """A .bin/.idx file is truncated, corrupt or does not belong to its partner."""


def open_indexed(prefix: str):
    """megatron-core's IndexedDataset for `prefix`, after checking that .idx parses and that
    .bin has exactly the bytes .idx describes.

    megatron-core reads both files through mmap/frombuffer, so a truncated file otherwise fails
    deep inside numpy without a file name (or, for a .bin longer than its .idx describes, reads
    tokens of another dataset without any error)."""
    _, _, idx_mod = import_megatron_datasets()
    check_prefix_exists(prefix)
    remake = f"re-create it with tools/preprocess_data.py --output-prefix {prefix}"
    ds = idx_mod.IndexedDataset.__new__(idx_mod.IndexedDataset)
    try:
        ds.__init__(prefix)
    except (AssertionError, ValueError, struct.error, OSError) as e:
        # Its __del__ deletes .bin_reader and .index, which a failed __init__ may not have set:
        # without these, Python prints that AttributeError's traceback after our one-line error.
        ds.__dict__.setdefault("bin_reader", None)
        ds.__dict__.setdefault("index", None)
        raise DatasetFileError(f"dataset index {prefix}.idx is truncated or corrupt ({e}); {remake}") from None
    index = ds.index
    if len(index) == 0:
        expected = 0
    else:
        itemsize = np.dtype(index.dtype).itemsize
        ends = index.sequence_pointers.astype(np.int64) + index.sequence_lengths.astype(np.int64) * itemsize
        expected = int(ends.max())
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its index describes (not the pair of this .idx)"
        raise DatasetFileError(
            f"dataset file {prefix}.bin has {actual:,} bytes but {prefix}.idx describes {expected:,}: "
            f"the .bin is {what}; {remake}"
        )
    return ds


SPLIT_NAMES = ("training", "validation", "test")


def split_document_counts(num_documents: int, split: str) -> list[Optional[int]]:
    """Documents megatron-core gives each split (train, valid, test) of a dataset with
    `num_documents` sequences: None for a split with no share.  Same arithmetic as
    BlendedMegatronDatasetBuilder (split matrix book-ends, rounded per dataset)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [
        None if bounds is None
        else int(round(bounds[1] * float(num_documents))) - int(round(bounds[0] * float(num_documents)))
        for bounds in matrix
    ]


def check_split_documents(paths: list[str], split: str, wanted: list[bool]) -> None:
    """Refuse a split that is asked for samples but gets no document of some dataset.

    megatron-core builds such a split by looping over epochs until the split's tokens cover the
    requested samples; with zero tokens that loop never ends (100% CPU in "Build ... indices")."""
    for path in paths:
        n = len(open_indexed(path))
        counts = split_document_counts(n, split)
        for name, count, asked in zip(SPLIT_NAMES, counts, wanted):
            if asked and count == 0:
                fixes = [f"give the {name} split a larger share in data.split (now {split!r})",
                         "preprocess the text into more documents (tools/preprocess_data.py --text-split line "
                         "makes one document per line)"]
                if name == "validation":
                    fixes.append("or set train.eval_interval=0 (no validation)")
                raise ConfigError(
                    f"data.split={split!r} gives the {name} split 0 of the {n} documents in {path} "
                    f"(megatron-core splits a dataset by whole documents), so it has no tokens to "
                    f"sample from; " + "; ".join(fixes)
                )


def build_gpt_datasets(
    prefix: Union[str, Sequence[Any]],
    *,
    seq_len: int,
    vocab_size: int,
    eod_token_id: int,
    train_samples: Optional[int],
    valid_samples: Optional[int] = None,
    test_samples: Optional[int] = None,
    split: str = "98,2,0",
    seed: int = 1234,
    cache_dir: Optional[str] = None,
) -> list:
    """[train, valid, test] megatron datasets (None where the split is empty) whose samples carry
    L = `seq_len` tokens.  A `*_samples` of None means one epoch of that split for a single
    prefix or an unweighted list, and an empty split for a weighted blend (megatron sizes
    weighted blends from sample counts).  Call on every rank when distributed."""
    builder_mod, gpt, _ = import_megatron_datasets()
    paths, weights = parse_blend(prefix)
    sizes = [train_samples, valid_samples, test_samples]
    # A dataset is asked for samples of a split when the split's size is positive (for a weighted
    # blend every dataset with weight > 0 gets a share of it); None builds one epoch, which
    # megatron-core handles for an empty split (an empty dataset, no hang).
    check_split_documents(paths, split, [bool(s) for s in sizes])
    config = gpt.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(paths, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=DatasetTokenizer(vocab_size, eod_token_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
    )
    if weights is not None:  # megatron needs a size for every split of a weighted blend
        sizes = [0 if s is None else s for s in sizes]
    builder = builder_mod.BlendedMegatronDatasetBuilder(gpt.GPTDataset, sizes, lambda: True, config)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        built = builder.build()
    else:
        # megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() without
        # checking that a process group exists; a single-process run is rank 0.
        with mock.patch.object(torch.distributed, "get_rank", lambda *args, **kwargs: 0):
            built = builder.build()
    return [d if d is not None and len(d) > 0 else None for d in built]


class TokenWindows:
    """Random access to the L-token samples of a built dataset: `get(indices) -> [b, L]`.

    Global sample indices past the dataset's end wrap around (the dataset is built for the
    planned number of samples; wrapping only matters when training runs longer than planned)."""

    def __init__(self, dataset, seq_len: int):
        if dataset is None or len(dataset) == 0:
            raise ValueError("the dataset split is empty; give it a non-zero share in data.split")
        self.dataset = dataset
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices) -> torch.Tensor:
        rows = []
        for i in torch.as_tensor(indices).flatten().tolist():
            tokens = self.dataset[int(i) % len(self.dataset)]["tokens"]
            if tokens.numel() != self.seq_len:
                raise RuntimeError(f"sample {i} has {tokens.numel()} tokens, expected {self.seq_len}")
            rows.append(tokens)
        return torch.stack(rows).long()

    def batch_inputs(self, indices) -> dict:
        """Keyword arguments of `build_batch` for these samples (SFT windows add flags and ids)."""
        return {"samples": self.get(indices)}


def _token_stream(prefix: str):
    """(memory-mapped token array of the whole .bin in stored order, IndexedDataset)."""
    ds = open_indexed(prefix)
    index = ds.index
    lengths = index.sequence_lengths.astype(np.int64)
    pointers = index.sequence_pointers.astype(np.int64)
    itemsize = np.dtype(index.dtype).itemsize
    contiguous = len(lengths) == 0 or (
        pointers[0] == 0 and np.array_equal(pointers[1:], pointers[:-1] + lengths[:-1] * itemsize)
    )
    if contiguous:  # what IndexedDatasetBuilder always writes
        return np.memmap(prefix + ".bin", dtype=index.dtype, mode="r", shape=(int(lengths.sum()),)), ds
    return np.concatenate([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros(0, index.dtype), ds


def eval_windows(prefix: str, seq_len: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """[n, L] consecutive non-overlapping windows of the dataset's token stream in document order,
    tokens exactly as stored (EODs included, nothing added), covering at most `max_tokens` tokens;
    a last partial window is dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    stream, _ = _token_stream(prefix)
    total = stream.shape[0] if max_tokens is None else min(stream.shape[0], int(max_tokens))
    n = total // seq_len
    if n == 0:
        raise ValueError(
            f"{prefix} offers {total} tokens (dataset has {stream.shape[0]}), fewer than one "
            f"window of seq_len={seq_len}; lower seq_len= or raise max_tokens= (now {max_tokens})"
        )
    return torch.from_numpy(np.asarray(stream[: n * seq_len], dtype=np.int64)).view(n, seq_len)


def check_vocabulary(
    prefix: Union[str, Sequence[Any]], vocab_size: int, mask_token_id: Optional[int], require_mask: bool = True
) -> dict:
    """Check that every dataset's tokens fit the model's vocabulary and that the model's mask
    token (if it has one) never occurs in the data; with `require_mask` (some stage masks tokens)
    a usable mask token must exist. Returns {"max_token_id", "tokens"}.  Scans the .bin files once
    (memory-mapped).

    Both checks run at every block size: an id past the vocabulary is an IndexError in the
    embedding, and an id in the padding rows (vocab_size <= id < padded size) gets a masked logit,
    i.e. loss = inf; so does the mask token as a target (its logit is masked too), even at B = 1."""
    if not require_mask and mask_token_id is not None and not 0 <= mask_token_id < vocab_size:
        mask_token_id = None  # unusable, and not needed: its range is only an error where it masks
    elif mask_token_id is None and require_mask:
        raise ValueError(
            "the model has no mask token id; convert it with tools/convert_hf.py --mask-token TEXT "
            "(adds the token to the tokenizer and the embedding)"
        )
    if mask_token_id is not None and not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask token id {mask_token_id} is outside the model vocabulary (size {vocab_size}); "
            "re-convert the model with --mask-token so the embedding includes it"
        )
    paths, _ = parse_blend(prefix)
    max_id, total = -1, 0
    for path in paths:
        stream, _ = _token_stream(path)
        chunk = 1 << 24
        path_max, mask_count = -1, 0
        for start in range(0, stream.shape[0], chunk):
            part = np.asarray(stream[start : start + chunk])
            path_max = max(path_max, int(part.max()))
            if mask_token_id is not None:
                mask_count += int(np.count_nonzero(part == mask_token_id))
        if path_max >= vocab_size:
            raise ValueError(
                f"dataset {path} contains token id {path_max} but the model vocabulary has "
                f"{vocab_size} ids: it was tokenized with a different tokenizer; re-run "
                "tools/preprocess_data.py with the model's tokenizer (the checkpoint's tokenizer/ folder)"
            )
        if mask_count:
            raise ValueError(
                f"dataset {path} contains the mask token id {mask_token_id} {mask_count} times: "
                "real text would look like noise, and the mask token is never a valid prediction (its "
                "logit is masked: the loss is inf); pick a mask token that never occurs in text "
                "(tools/convert_hf.py --mask-token) or re-tokenize the data without it"
            )
        max_id, total = max(max_id, path_max), total + int(stream.shape[0])
    return {"max_token_id": max_id, "tokens": total}
