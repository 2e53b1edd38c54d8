"""Plot a training run's metrics.jsonl as PNG files.

    python tools/plot_metrics.py SAVE_DIR|metrics.jsonl [--out DIR]

Writes DIR/metrics.png (all panels) and one PNG per panel: loss.png, losses.png (diffusion and AR
loss), block_size.png, val_nelbo.png, tokens_per_s.png, lr_grad_norm.png. DIR defaults to
SAVE_DIR/plots. Block-size stage changes are drawn as dotted vertical lines on every panel, and
validation NELBO points are coloured by the block size they were measured at: a NELBO is a bound
at its own block size, so values from different stages are not on one curve. A run with
diffusion.schedule=adaptive adds schedule.png: the clipped interval the searches chose and the
loss variance they measured.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from megablock.cli import add_common_flags, run_tool


class PlotError(ValueError):
    pass


def read_metrics(path: Path) -> list[dict]:
    """Records in step order; a step logged twice (a resumed run that redid it) keeps its last record."""
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found; pass a training save dir (with metrics.jsonl) or the file itself")
    by_step = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write can leave a partial last line; anything else is a corrupt file.
            if n == len(lines):
                continue
            raise PlotError(f"{path}:{n} is not JSON") from None
        if "step" in rec:
            by_step[rec["step"]] = rec
    if not by_step:
        raise PlotError(f"{path} has no metrics records yet")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) where the record has a finite number under `key`."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def stage_changes(records: list[dict]) -> list[tuple[int, int]]:
    """(step, new block size) at every step whose block size differs from the previous record's."""
    out, prev = [], None
    for r in records:
        b = r.get("block_size")
        if prev is not None and b != prev:
            out.append((r["step"], b))
        prev = b
    return out


def _panel_loss(ax, recs):
    ax.plot(*series(recs, "loss"), color="tab:blue", lw=1.5)
    ax.set_title("training loss (L_diff + lambda L_AR)")
    ax.set_ylabel("nats / token")


def _panel_losses(ax, recs):
    ax.plot(*series(recs, "diffusion_loss"), label="diffusion (NELBO)", color="tab:purple", lw=1.5)
    ax.plot(*series(recs, "ar_loss"), label="AR", color="tab:green", lw=1.5)
    ax.set_title("diffusion and AR loss")
    ax.set_ylabel("nats / token")
    ax.legend(fontsize=8)


def _panel_block(ax, recs):
    xs, ys = series(recs, "block_size")
    ax.step(xs, ys, where="mid", color="tab:orange", lw=1.5)  # changes between steps, like the stage lines
    ax.set_title("block size (curriculum)")
    ax.set_yscale("log", base=2)
    sizes = sorted(set(ys))
    ax.set_yticks(sizes, [str(int(b)) for b in sizes])
    ax.minorticks_off()


def _panel_val(ax, recs):
    xs, ys = series(recs, "val_nelbo")
    if not xs:
        ax.text(0.5, 0.5, "no validation records\n(train.eval_interval = 0?)", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    else:
        blocks = {r["step"]: r.get("block_size") for r in recs}
        for b in sorted({blocks[x] for x in xs}, key=lambda v: (v is None, v)):
            px, py = zip(*[(x, y) for x, y in zip(xs, ys) if blocks[x] == b])
            ax.plot(px, py, marker="o", ms=5, lw=1, label=f"B = {b}")  # joined within a block size only
        ax.legend(fontsize=8)
    ax.set_title("validation NELBO (at the step's block size)")
    ax.set_ylabel("nats / token")


def _panel_speed(ax, recs):
    ax.plot(*series(recs, "tokens_per_s"), color="tab:red", lw=1.5)
    ax.set_title("throughput")
    ax.set_ylabel("tokens / s")


def _panel_lr(ax, recs):
    ax.plot(*series(recs, "lr"), color="tab:blue", lw=1.5, label="lr")
    ax.set_ylabel("learning rate", color="tab:blue")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax2 = ax.twinx()
    ax2.plot(*series(recs, "grad_norm"), color="tab:gray", lw=1, label="grad norm")
    ax2.set_ylabel("grad norm", color="tab:gray")
    ax.set_title("learning rate and gradient norm")


def _panel_schedule(ax, recs):
    xs, lo = series(recs, "clip_min")
    _, hi = series(recs, "clip_max")
    ax.fill_between(xs, lo, hi, step="mid", color="tab:cyan", alpha=0.35, label="t ~ U[clip_min, clip_max]")
    ax.step(xs, lo, where="mid", color="tab:cyan", lw=1)
    ax.step(xs, hi, where="mid", color="tab:cyan", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mask ratio t")
    vx, vy = series(recs, "loss_variance")
    if vx:
        ax2 = ax.twinx()
        ax2.plot(vx, vy, "o", color="tab:red", ms=5, label="loss variance (chosen)")
        ax2.set_ylabel("per-sample loss variance", color="tab:red")
    ax.set_title("adaptive noise schedule (searched interval)")
    ax.legend(fontsize=8, loc="lower left")


PANELS = [
    ("loss", _panel_loss), ("losses", _panel_losses), ("block_size", _panel_block),
    ("val_nelbo", _panel_val), ("tokens_per_s", _panel_speed), ("lr_grad_norm", _panel_lr),
]
SCHEDULE_PANEL = ("schedule", _panel_schedule)


def panels_for(records: list[dict]) -> list:
    return PANELS + ([SCHEDULE_PANEL] if any("clip_min" in r for r in records) else [])


def _decorate(ax, changes, steps):
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)  # the same step axis on every panel
    for step, b in changes:
        ax.axvline(step - 0.5, color="black", ls=":", lw=0.8, alpha=0.6)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot(records: list[dict], out: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    changes = stage_changes(records)
    steps = [r["step"] for r in records]
    written = []
    panels = panels_for(records)
    rows = -(-len(panels) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.25 * rows))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (_, draw) in zip(axes.flat, panels):
        draw(ax, records)
        _decorate(ax, changes, steps)
    last = records[-1]
    fig.suptitle(f"{title}  (step {last['step']}, {last.get('consumed_tokens', '?'):,} tokens; "
                 "dotted lines: block-size stage changes)" if isinstance(last.get("consumed_tokens"), int)
                 else f"{title}  (step {last['step']})", fontsize=12)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    written.append(out / "metrics.png")
    for name, draw in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        draw(ax, records)
        _decorate(ax, changes, steps)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="training save dir (with metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", help="output folder (default: SAVE_DIR/plots)")
    return add_common_flags(p)


def run(args) -> int:
    path = Path(args.path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    records = read_metrics(path)
    save_dir = path if path.is_dir() else path.parent
    out = Path(args.out) if args.out else save_dir / "plots"
    written = plot(records, out, title=save_dir.resolve().name)
    print(f"wrote {len(written)} plots of {len(records)} steps to {out}/ (overview: {out / 'metrics.png'})")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser, teardown=False)
