"""PNG charts of judge summaries (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pairwise_chart(summary: dict, path: str | Path) -> Path:
    """Stacked win / tie / loss bars for model A, overall and per category, with the win rate's interval and
    the length-controlled win rate marked."""
    plt = _pyplot()
    groups = [("overall", summary)] + list((summary.get("categories") or {}).items())
    groups = [(name, g) for name, g in groups if g.get("n")]
    fig, ax = plt.subplots(figsize=(7, 2.2 + 0.5 * max(len(groups), 1)))
    for row, (name, g) in enumerate(groups):
        n = g["n"]
        wins, ties, losses = g["wins_a"] / n, g["ties"] / n, g["wins_b"] / n
        ax.barh(row, wins, color="#4c72b0", label="A wins" if row == 0 else None)
        ax.barh(row, ties, left=wins, color="#bbbbbb", label="tie" if row == 0 else None)
        ax.barh(row, losses, left=wins + ties, color="#dd8452", label="B wins" if row == 0 else None)
        lo, hi = g["ci_a"]
        ax.errorbar(g["win_rate_a"], row, xerr=[[g["win_rate_a"] - lo], [hi - g["win_rate_a"]]], fmt="o",
                    color="black", capsize=3, label="win rate A, CI" if row == 0 else None)
    lc = (summary.get("length_controlled") or {}).get("lc_win_rate")
    if lc is not None and groups:
        ax.plot([lc], [0], marker="D", color="crimson", linestyle="none", label="length-controlled")
    ax.set_yticks(range(len(groups)), [f"{name} (n={g['n']})" for name, g in groups])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("fraction of prompts")
    title = f"{summary.get('model_a')} (A) vs {summary.get('model_b')} (B), judge {summary.get('judge')}"
    if summary.get("n"):
        lo, hi = summary["ci_a"]
        title += (f"\nwin rate A {summary['win_rate_a']:.2f} [{lo:.2f}, {hi:.2f}], length-controlled "
                  + (f"{lc:.2f}" if lc is not None else "n/a")
                  + f", position-inconsistent {summary['position_bias_rate']:.0%}, unparseable "
                  f"{summary['unparseable']}")
    ax.set_title(title, fontsize=8)
    if groups:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=5, frameon=False)
    else:
        ax.text(0.5, 0.5, "no parseable verdicts", ha="center", transform=ax.transAxes)
    return _save(plt, fig, path)


def single_chart(summary: dict, path: str | Path) -> Path:
    """Mean grade per model with its interval."""
    plt = _pyplot()
    models = [(name, m) for name, m in summary["models"].items() if m["n"]]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * max(len(models), 1)))
    for row, (name, m) in enumerate(models):
        lo, hi = m["ci"]
        ax.barh(row, m["mean"], color="#4c72b0")
        ax.errorbar(m["mean"], row, xerr=[[m["mean"] - lo], [hi - m["mean"]]], fmt="none", color="black", capsize=3)
    ax.set_yticks(range(len(models)), [f"{name} (n={m['n']})" for name, m in models])
    low, high = summary["scale"]
    ax.set_xlim(0, high)
    ax.set_xlabel(f"mean grade ({low}-{high})")
    if not models:
        ax.text(0.5, 0.5, "no parseable grades", ha="center", transform=ax.transAxes)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
