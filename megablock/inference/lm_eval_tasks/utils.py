"""Data of megablock's offline lm-evaluation-harness tasks: the JSONL files next to this module.

Written for this project (no benchmark data is copied): a few arithmetic word problems in the
GSM8K answer format ("... #### N"), a few everyday multiple-choice questions and a few short
paragraphs for rolling log-likelihood. They are smoke tests of the evaluation path (every
request type, few-shot, filters, metrics), not benchmarks: their scores say that a model and
its decoding work, and let two backends be compared number for number.

The harness calls a task's `custom_dataset` with the task's metadata (and the model's
arguments) as keyword arguments; they are not needed here. Reading through this function
rather than `dataset_path: json` keeps the data path relative to this file, so the tasks work
from any working directory.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _splits(name: str):
    import datasets  # deferred: the harness imports this module while indexing tasks

    rows: dict = {}
    with open(HERE / f"{name}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row.pop("split"), []).append(row)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})


def load_arith(**_):
    return _splits("arith")


def load_choice(**_):
    return _splits("choice")


def load_text(**_):
    return _splits("text")
