"""diffusion.schedule=adaptive (BD3-LM's clipped-interval search): the variance estimate against a
brute-force computation and the same at TP = 2, PP = 2 and DP = 2; the search picks the known
lowest-variance interval of a constructed model; stop and resume across searches is exact."""
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megablock.testing import run_distributed, training_assets
from megablock.training.schedule_search import candidate_intervals

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "tiny.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ADAPTIVE = ["diffusion.schedule=adaptive", "diffusion.schedule_search_widths=[0.5, 0.8, 1.0]",
            "diffusion.schedule_search_step=0.25", "diffusion.schedule_search_batches=1",
            "diffusion.schedule_search_draws=3"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return training_assets(tmp_path_factory.mktemp("search"))


def _sets(assets, save_dir, *extra):
    return [f"model.init_from={assets / 'ckpt'}", f"data.prefix={assets / 'data'}", f"checkpoint.save_dir={save_dir}",
            f"data.cache_dir={assets / 'cache'}", *ADAPTIVE, *extra]


def test_candidate_grid():
    assert candidate_intervals([0.5, 1.0], 0.25, 1e-3) == [(0.001, 0.5), (0.25, 0.75), (0.5, 1.0), (0.001, 1.0)]
    grid = candidate_intervals([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.1, 1e-3)  # the default
    assert len(grid) == 21 and all(0 < lo < hi <= 1 for lo, hi in grid)


def _trainer(assets, save_dir, *extra):
    from megablock.config import load_config
    from megablock.training.trainer import Trainer

    return Trainer(load_config(str(CONFIG), _sets(assets, save_dir, *extra)))


def _variance_worker(rank, world, assets, save_dir, layout, interval):
    from megablock.training.schedule_search import loss_variance

    trainer = _trainer(assets, Path(save_dir) / f"r{rank}", *layout)
    settings = replace(trainer.train_data.settings, clip_min=interval[0], clip_max=interval[1])
    return loss_variance(trainer.engine, trainer.search_data, 4, settings, draws=3, seed=11)


def _brute_force_worker(rank, world, assets, save_dir, interval):
    """Per sample and per draw: its own batch, a full forward, F.cross_entropy over the whole
    vocabulary; then statistics.variance across draws and the mean over samples."""
    import torch.nn.functional as F

    from megablock.diffusion.batch import build_batch
    from megablock.training.schedule_search import draw_seed

    trainer = _trainer(assets, save_dir)
    held, model = trainer.search_data, trainer.model
    settings = replace(trainer.train_data.settings, clip_min=interval[0], clip_max=interval[1])
    indices = [i for mb in held.sampler.micro_batches(0) for i in mb]
    variances = []
    with torch.no_grad():
        for idx in indices:
            losses = []
            for k in range(3):
                b = build_batch(held.windows.get([idx]), [idx], 4, settings, mask_token_id=held.mask_token_id,
                                seed=draw_seed(11, k), eod_token_id=held.eod_token_id)
                logits = model(b.input_ids, b.position_ids, b.layout)[0].double()
                ce = F.cross_entropy(logits, b.targets[0], reduction="none")
                losses.append(float((ce * b.diff_weights[0]).sum()) / b.diff_normalizer)
            variances.append(statistics.variance(losses))
    return sum(variances) / len(variances), len(indices)


def test_variance_matches_brute_force_and_every_layout(assets, tmp_path):
    interval = (0.25, 0.75)
    brute, n = run_distributed(_brute_force_worker, 1, assets, tmp_path / "brute", interval)[0]
    one = run_distributed(_variance_worker, 1, assets, tmp_path / "one", [], interval)[0]
    assert n == 4 and brute > 0  # one global batch of tiny.yaml
    assert one == pytest.approx(brute, rel=1e-5)  # fp32 model vs float64 CE: ~1e-7 apart
    for layout in (["parallel.tensor=2"], ["parallel.pipeline=2"], ["parallel.zero_stage=1"]):
        # DP = 2 splits the held-out samples over the ranks; TP and PP split the model.
        got = run_distributed(_variance_worker, 2, assets, tmp_path / layout[0], layout, interval)
        assert got[0] == got[1] == pytest.approx(one, rel=1e-4), layout


def _uniform_search_worker(rank, world, assets, save_dir):
    """A model whose head is zero predicts uniformly: every masked token costs log(V - 1) (the
    mask token is never predicted), so a sample's loss is c * sum_b N_b / t_b with
    N_b ~ Binomial(B - 1, t_b) and its variance across draws is known in closed form."""
    trainer = _trainer(assets, save_dir, "diffusion.schedule_search_draws=24", "diffusion.schedule_search_batches=2",
                       "diffusion.schedule_search_widths=[0.5, 0.6, 0.9]", "diffusion.schedule_search_step=0.1",
                       "train.eval_interval=0")
    with torch.no_grad():
        trainer.model.output_layer.weight.zero_()
    from megablock.training.schedule_search import search_interval

    result = search_interval(trainer.engine, trainer.search_data, 4, trainer.train_data.settings, seed=3, step=0)
    return result.interval, result.table, trainer.model_cfg.vocab_size


def test_search_picks_the_known_lowest_variance_interval(assets, tmp_path):
    chosen, table, vocab = run_distributed(_uniform_search_worker, 1, assets, tmp_path / "uniform")[0]
    L, B = 32, 4
    c = math.log(vocab - 1) / (L - 1)

    def exact(lo, hi):  # Var[sum_b N_b / t_b] = blocks * (B - 1) * (E[1/t] - 1), t ~ U[lo, hi]
        return c * c * (L // B) * (B - 1) * (math.log(hi / lo) / (hi - lo) - 1)

    best = min(table, key=lambda row: exact(row[0], row[1]))
    assert chosen == (best[0], best[1]) == (0.5, 1.0)
    for lo, hi, measured in table:
        if lo >= 0.1:  # near t = eps, 1/t is so heavy-tailed that 24 draws cannot pin the variance down
            assert measured == pytest.approx(exact(lo, hi), rel=0.35), (lo, hi)  # 24 draws x 8 samples
    assert max(table, key=lambda row: row[2])[0] == 1e-3  # ...but it is by far the noisiest


def _run(assets, save_dir, *extra):
    cmd = [sys.executable, str(ROOT / "examples" / "pretrain_nbdiff.py"), "--config", str(CONFIG),
           "--set", *_sets(assets, save_dir, "diffusion.schedule_search_interval=2", *extra)]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_across_searches_is_exact(assets, tmp_path):
    reference = _run(assets, tmp_path / "ref")
    # Steps 1-2 are B = 1 (nothing to search); a search before step 3 (B = 2 starts, and the
    # interval of 2 steps) and before step 5 (B = 4 starts): the choice logged with its variance.
    assert all("clip_min" in m for m in reference)
    assert [("loss_variance" in m) for m in reference] == [False, False, True, False, True, False]
    searches = [json.loads(line) for line in (tmp_path / "ref" / "schedule_search.jsonl").read_text().splitlines()]
    assert [s["step"] for s in searches] == [2, 4] and [s["block_size"] for s in searches] == [2, 4]
    assert all(len(s["candidates"]) == 5 for s in searches)  # widths 0.5, 0.8, 1.0 from 0 in steps of 0.25

    save = tmp_path / "resumed"
    _run(assets, save, "train.exit_after_steps=4")  # stops after step 4: the search before step 5 is still ahead
    resumed = _run(assets, save, "checkpoint.resume=true")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference, resumed):
        for key in ("loss", "diffusion_loss", "grad_norm", "clip_min", "clip_max", "loss_variance"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert (save / "schedule_search.jsonl").read_text() == (tmp_path / "ref" / "schedule_search.jsonl").read_text()
