"""Observability: the log, metrics JSONL per step, a progress bar, and reward-hacking / collapse monitors.

Each optimizer step appends one JSON object to ``RUN_DIR/metrics.jsonl`` (``step``, ``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``, and whatever the algorithm reports: ``reward``, ``kl``, ``entropy``,
``clip_frac``, ``reward_length_corr``, ...). ``fastalign plot RUN_DIR`` draws them (plot.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("fastalign.train")

# name in the metrics -> (config threshold field, direction): "above" warns when value > threshold
MONITORS = {
    "kl": ("warn_kl", "above"),
    "entropy": ("warn_entropy", "below"),
    "clip_frac": ("warn_clip_frac", "above"),
    "reward_length_corr": ("warn_reward_length_corr", "abs_above"),
}
# name in the metrics -> (config field K, value): warn when the metric holds that value for K steps running
STREAKS = {"uniform_group_frac": ("warn_uniform_groups", 1.0)}
STREAK_MESSAGES = {"uniform_group_frac": "every group's rewards were equal for {k} steps running: every advantage is "
                                         "0 and nothing trains (check the reward functions, or sample more diverse "
                                         "completions: num_generations, temperature)"}
BAR_KEYS = ("loss", "reward", "kl", "accuracy", "rewards/accuracies", "tokens_per_s")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a redirected or captured stream), not the one at setup."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def setup_logging(is_main: bool) -> None:
    """``[fastalign] LEVEL message`` lines on stderr: INFO on the main process, warnings only on the others."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[fastalign] %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_main else logging.WARNING)


def to_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def pending_float(value):
    """:func:`to_float`'s reduction left on the device, without synchronising: a 0-d tensor (read it later with
    :func:`read_floats`), or a Python float. Integer tensors (token counts) are reduced in float64, exactly."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return t.float().mean() if t.is_floating_point() else t.double().mean()
    return float(value)


def read_floats(values: list) -> list[float]:
    """Python floats of :func:`pending_float` results: one device-to-host copy per device for all the tensors
    among them, instead of one synchronising ``.item()`` each."""
    out: list[float] = [0.0] * len(values)
    groups: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            groups.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
    for idx in groups.values():
        for i, x in zip(idx, torch.stack([values[i].double() for i in idx]).tolist()):
            out[i] = x
    return out


def reward_length_correlation(rewards: torch.Tensor, lengths: torch.Tensor) -> float:
    """Pearson correlation of rewards (B,) with response lengths (B,); 0 when either is constant. A value near
    +-1 suggests the policy is being rewarded for length, not content."""
    r, n = rewards.detach().double().flatten(), lengths.detach().double().flatten()
    r, n = r - r.mean(), n - n.mean()
    denom = r.norm() * n.norm()
    return 0.0 if denom.item() == 0 else float((r @ n / denom).item())


class Monitors:
    """Check each step's metrics against the config's ``warn_*`` thresholds; log a warning when a monitor
    crosses its threshold (once per crossing, not every step) and count the steps spent beyond it."""

    def __init__(self, cfg):
        self.thresholds = {name: (getattr(cfg, field, None), how) for name, (field, how) in MONITORS.items()}
        self.active: set[str] = set()
        self.counts: dict[str, int] = {name: 0 for name in MONITORS}
        self.streak_limits = {name: (getattr(cfg, field), value) for name, (field, value) in STREAKS.items()
                              if getattr(cfg, field, None) is not None}
        self.streaks = {name: 0 for name in self.streak_limits}
        self.counts.update({name: 0 for name in self.streak_limits})

    def check(self, step: int, metrics: dict) -> list[str]:
        fired = []
        for name, (k, value) in self.streak_limits.items():
            self.streaks[name] = self.streaks[name] + 1 if metrics.get(name) == value else 0
            if self.streaks[name] >= k:
                self.counts[name] += 1
            if self.streaks[name] == k:
                msg = f"step {step}: " + STREAK_MESSAGES[name].format(k=k)
                log.warning(msg)
                fired.append(msg)
        for name, (limit, how) in self.thresholds.items():
            if limit is None or name not in metrics or not math.isfinite(metrics[name]):
                continue
            value = metrics[name]
            bad = value > limit if how == "above" else value < limit if how == "below" else abs(value) > limit
            if bad:
                self.counts[name] += 1
                if name not in self.active:
                    word = "below" if how == "below" else "above"
                    msg = f"step {step}: {name} = {value:.4g} is {word} the warning threshold {limit:g}"
                    log.warning(msg)
                    fired.append(msg)
                self.active.add(name)
            else:
                self.active.discard(name)
        return fired


class MetricsLogger:
    """JSONL writer + progress bar (tqdm) on the main process; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self._last = time.perf_counter()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run: keep the rows up to the checkpoint, drop a torn last line
            rows, torn = parse_rows(self.path)
            keep = [r for r in rows if r.get("step", 0) <= start_step]
            if torn:
                log.warning("%s: dropped a torn last line (the run was stopped while writing it)", self.path)
            if len(keep) < len(rows):
                log.info("%s: dropped %d row(s) past step %d, the step resumed from", self.path,
                         len(rows) - len(keep), start_step)
            if torn or len(keep) < len(rows):
                tmp = self.path.with_name(f".tmp-{self.path.name}")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
                os.replace(tmp, self.path)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=True)

    def timer(self) -> float:
        """Seconds since the previous call (the step time)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (to_float(v) if not isinstance(v, (str, bool)) else v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in BAR_KEYS if isinstance(row.get(k), float)},
                                 refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def parse_rows(path: Path) -> tuple[list[dict], bool]:
    """(rows, torn) of a metrics.jsonl: a last line that does not parse as a JSON object (a run killed while
    writing it) is left out and reported as ``torn``; a broken line anywhere else is a ValueError naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as exc:  # JSONDecodeError is a ValueError
            if k == len(numbered) - 1:
                return rows, True
            raise ValueError(f"{path}:line {lineno}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        rows.append(row)
    return rows, False


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl``; a torn last line is skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fastalign run directory?")
    rows, torn = parse_rows(path)
    if torn:
        log.warning("%s: skipped a torn last line (the run was stopped while writing it)", path)
    return rows
