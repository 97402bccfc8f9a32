"""``fastalign plot RUN_DIR``: PNG curves of every numeric metric in ``RUN_DIR/metrics.jsonl``."""
from __future__ import annotations

import math
from pathlib import Path

from fastalign.train.metrics import read_metrics

SKIP = {"step", "epoch"}
FIRST = ("loss", "reward", "kl", "entropy", "clip_frac", "reward_length_corr", "accuracy", "rewards/accuracies")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``curves.png`` (all metrics on a grid) and one ``<metric>.png`` per metric into
    ``out_dir`` (default ``RUN_DIR/plots``). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({k for r in rows for k, v in r.items()
                    if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)},
                   key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))
    if not names:
        raise ValueError(f"{run_dir}: metrics.jsonl has no numeric metrics to plot")
    series = {n: [(r["step"], r[n]) for r in rows if isinstance(r.get(n), (int, float))] for n in names}
    written = []
    cols = min(3, len(names))
    grid_rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(4.5 * cols, 3 * grid_rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _draw(ax, name, series[name])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    written.append(out / "curves.png")
    for name in names:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _draw(ax, name, series[name])
        fig.tight_layout()
        path = out / f"{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _draw(ax, name, points):
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    ax.plot(steps, values, lw=1.2)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
