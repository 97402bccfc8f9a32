"""The training loop every algorithm shares, by composition: setup, optimizer and schedule, gradient
accumulation with globally normalized losses, clipping, the NaN guard, metrics, monitors, checkpoints, resume.

An algorithm reads top to bottom::

    run = prepare(cfg)                                   # logging, torchrun, seed, model path, tokenizer
    model = models.load_model(run.model_path, ...)
    sampler = batching.Sampler(len(examples), cfg.batch_size, seed=cfg.seed, rank=..., world_size=...)
    loop = TrainLoop(cfg, model, run, extra_state={"sampler": sampler})
    while not loop.done:
        micro = [collate(sampler.next()) for _ in range(cfg.grad_accum)]
        loop.step(micro, loss_fn, weight_fn=lambda mb: number_of_tokens(mb))
    return loop.finish()

``loss_fn(micro_batch) -> (loss, stats)`` returns the micro-batch's *mean* loss over its units (tokens, pairs,
sequences) and ``weight_fn`` counts those units; the step minimizes the mean over every unit of the global batch
(all micro-batches, all processes), so gradient accumulation and N processes equal one big batch exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fastalign.train import checkpoint, distributed, metrics as metrics_mod, models, resume, run_dir, tiny
from fastalign.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("fastalign.train")

# a step whose micro-batches all weigh 0 divides by this, not by 0 (and is then skipped as bad)
MIN_TOTAL_WEIGHT = 1e-12
MIN_STEP_SECONDS = 1e-9  # tokens_per_s of a step the timer cannot resolve


class TooManyBadSteps(RuntimeError):
    """Raised when more than ``max_bad_steps`` steps had a NaN/inf loss or gradient norm."""


@dataclass
class Run:
    """What :func:`prepare` resolved: the process layout, the model directory, the tokenizer."""

    info: distributed.DistInfo
    model_path: Path
    tokenizer: object
    run_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg) -> Run:
    """Logging, torchrun process group, the run directory's rules and record (``run_dir.open_run``: every path is
    checked before a model loads), seeds, the model directory (the embedded tiny model when none is given), the
    tokenizer."""
    info = distributed.setup(cfg.device)
    metrics_mod.setup_logging(info.is_main)
    directory = run_dir.open_run(cfg, info)
    seed_everything(cfg.seed)
    model_path = Path(cfg.model) if cfg.model else _tiny_model(info)
    if info.is_main and not cfg.model:
        log.info("no model given: using the embedded tiny model at %s", model_path)
    return Run(info=info, model_path=model_path, tokenizer=models.load_tokenizer(model_path), run_dir=directory)


def _tiny_model(info) -> Path:
    path = tiny.default_tiny_model_dir() if info.is_main else None
    distributed.barrier()  # rank 0 builds it; the others then find it
    return Path(distributed.broadcast_object(str(path) if path else None)) if info.enabled else path


def _attended_tokens(micro_batch) -> torch.Tensor | int:
    """The micro-batch's attended token count (a tensor, read back with the step's other numbers)."""
    if isinstance(micro_batch, dict) and isinstance(micro_batch.get("attention_mask"), torch.Tensor):
        return micro_batch["attention_mask"].sum()
    return 0


class TrainLoop:
    """Owns the wrapped model(s), optimizer, scheduler, counters, metrics and checkpoints of one run.

    Args:
        cfg: a :class:`~fastalign.train.config.TrainConfig` (any algorithm's).
        model: the trainable transformers/peft model, unwrapped; ``self.model`` is what to call afterwards
            (wrapped for DDP/FSDP2 under torchrun; see :func:`models.forward_head`).
        run: from :func:`prepare`.
        extra_models: more trainable models (a PPO value model): wrapped, optimized and checkpointed alongside,
            available as ``self.models[name]``.
        extra_state: objects with ``state_dict``/``load_state_dict`` (the data sampler, an adaptive KL
            controller) saved in checkpoints and restored on resume.
        rank_state: the same, for state each process holds its own of (the rollout in use): saved per process.
    """

    def __init__(self, cfg, model: nn.Module, run: Run, *, extra_models: dict[str, nn.Module] | None = None,
                 extra_state: dict | None = None, rank_state: dict | None = None, desc: str | None = None):
        self.cfg, self.run, self.info = cfg, run, run.info
        self.extra_state, self.rank_state = dict(extra_state or {}), dict(rank_state or {})
        unwrapped = {"model": model, **(extra_models or {})}
        self.step_count, self.bad_steps, self.last_saved = 0, 0, -1
        self.history: list[dict] = []
        resume_from = resume.resume_point(run.run_dir, self.info) if cfg.resume else None
        if cfg.resume and resume_from is None:
            log.info("resume: no complete checkpoint in %s/checkpoints, starting from scratch", run.run_dir)
        if resume_from is not None:  # weights go into the unsharded models, before wrapping
            for name, m in unwrapped.items():
                checkpoint.load_weights(m, resume_from / name)
        for m in unwrapped.values():
            m.to(self.info.device)
            m.train()
        self.models = {name: distributed.wrap(m, self.info, cfg.parallelism) for name, m in unwrapped.items()}
        self.model = self.models["model"]
        self.params = [p for m in self.models.values() for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        if resume_from is not None:
            self._restore(resume_from)
        self.monitors = metrics_mod.Monitors(cfg)
        self.metrics = metrics_mod.MetricsLogger(run.run_dir, total_steps=cfg.max_steps, start_step=self.step_count,
                                                 enabled=self.info.is_main, progress=cfg.progress,
                                                 desc=desc or type(cfg).__name__.removesuffix("Config").lower())

    # ------------------------------------------------------------------------------------------------ state
    def _restore(self, path: Path) -> None:
        state, rng, rank = checkpoint.load_trainer_state(path, self.info)
        algorithm = run_dir.algorithm_name(self.cfg)
        if state.get("algorithm") not in (None, algorithm):
            raise resume.CheckpointError(f"resume: {path} is a {state['algorithm']!r} checkpoint, not {algorithm!r}")
        checkpoint.load_optimizer_state(self.models, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, obj in self.extra_state.items():
            if name in state["extra"]:
                obj.load_state_dict(state["extra"][name])
        self.step_count = self.last_saved = int(state["step"])
        self.bad_steps = int(state["counters"].get("bad_steps", 0))
        for name, obj in self.rank_state.items():
            if rank is not None and name in rank:
                obj.load_state_dict(rank[name])
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:
            log.warning("resume: world size changed (%d -> %d); RNG streams restart, data position is kept",
                        state["world_size"], self.info.world_size)
        log.info("resumed from %s at step %d", path, self.step_count)

    def save(self) -> Path:
        """Write a checkpoint of the current step (collective)."""
        path = checkpoint.save_checkpoint(
            self.run.run_dir, self.step_count, models=self.models, optimizer=self.optimizer,
            scheduler=self.scheduler, info=self.info, tokenizer=self.run.tokenizer, extra=self.extra_state,
            counters={"bad_steps": self.bad_steps}, keep=self.cfg.save_total_limit, rank_state=self.rank_state,
            algorithm=run_dir.algorithm_name(self.cfg),
        )
        self.last_saved = self.step_count
        return path

    @property
    def done(self) -> bool:
        return self.step_count >= self.cfg.max_steps

    # ------------------------------------------------------------------------------------------------- step
    def step(self, micro_batches: list, loss_fn: Callable, weight_fn: Callable | None = None,
             extra_metrics: dict | None = None) -> dict:
        """One optimizer step over ``micro_batches`` (this process's share of the global batch).

        Returns the step's metrics (global means): loss, the stats ``loss_fn`` returned, lr, grad_norm,
        tokens_per_s, skipped (1 when the NaN guard skipped the step), plus ``extra_metrics``.
        """
        loss_sum, tokens, stat_sums, total = self._accumulate(micro_batches, loss_fn, weight_fn)
        grad_norm = self._clip_gradients()
        loss_sum, tokens, stat_sums = self._reduce(loss_sum, tokens, stat_sums)
        loss = loss_sum / max(total, MIN_TOTAL_WEIGHT)
        out = {"loss": loss, **{k: v / max(total, MIN_TOTAL_WEIGHT) for k, v in stat_sums.items()}}
        skipped = self._apply_or_skip(loss, grad_norm, total)
        lr = self._advance_schedule()
        out.update(lr=lr, grad_norm=grad_norm, skipped=int(skipped), bad_steps=self.bad_steps,
                   tokens_per_s=tokens / max(self.metrics.timer(), MIN_STEP_SECONDS), **(extra_metrics or {}))
        return self._record(out)

    def _accumulate(self, micro_batches: list, loss_fn: Callable,
                    weight_fn: Callable | None) -> tuple[float, int, dict[str, float], float]:
        """Backward of each micro-batch's loss, scaled so the gradients are those of the mean over every unit of
        the global batch. Returns this process's weighted loss sum, token count and weighted stat sums, and the
        global total weight."""
        # the weights set the gradients' scale, so they are read before the first backward (one transfer for all)
        weights = metrics_mod.read_floats([metrics_mod.pending_float(weight_fn(mb)) if weight_fn is not None else 1.0
                                           for mb in micro_batches])
        total = float(distributed.all_reduce_sum(torch.tensor(sum(weights), dtype=torch.float64)))
        scale = self.info.world_size / max(total, MIN_TOTAL_WEIGHT)  # DDP/FSDP average gradients over processes
        kept = []  # per micro-batch: the loss, its stats and its token count, read back once after every backward
        for i, (mb, w) in enumerate(zip(micro_batches, weights)):
            with self._gradient_sync(last=i == len(micro_batches) - 1):
                loss, stats = loss_fn(mb)
                if w > 0:
                    (loss * (w * scale)).backward()
            pending = metrics_mod.pending_float
            kept.append((pending(loss), {k: pending(v) for k, v in (stats or {}).items()},
                         pending(_attended_tokens(mb))))
        flat = [x for loss, stats, tok in kept for x in (loss, tok, *stats.values())]
        values = iter(metrics_mod.read_floats(flat))
        loss_sum, stat_sums, tokens = 0.0, {}, 0
        for (_, stats, _), w in zip(kept, weights):
            loss_sum += next(values) * w
            tokens += int(next(values))
            for k in stats:
                stat_sums[k] = stat_sums.get(k, 0.0) + next(values) * w
        return loss_sum, tokens, stat_sums, total

    def _gradient_sync(self, last: bool) -> contextlib.ExitStack:
        """DDP and FSDP2 reduce gradients on the last micro-batch of a step only."""
        stack = contextlib.ExitStack()
        for m in self.models.values():
            if hasattr(m, "set_requires_gradient_sync"):  # FSDP2
                m.set_requires_gradient_sync(last)
            if hasattr(m, "no_sync") and not last and self.info.enabled:  # DDP
                stack.enter_context(m.no_sync())
        return stack

    @staticmethod
    def _reduce(loss_sum: float, tokens: int, stat_sums: dict[str, float]) -> tuple[float, float, dict]:
        """The weighted sums of every process, summed (one all-reduce)."""
        names = sorted(stat_sums)
        loss_sum, tokens, *values = distributed.sum_over_processes([loss_sum, tokens, *(stat_sums[k] for k in names)])
        return loss_sum, tokens, dict(zip(names, values))

    def _clip_gradients(self) -> float:
        """Clip the global gradient norm to ``max_grad_norm`` (when set); returns the norm before clipping."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        return float(grad_norm)

    def _apply_or_skip(self, loss: float, grad_norm: float, total: float) -> bool:
        """The optimizer update, or, for a NaN/inf loss or gradient norm (or no weight at all), no update: the step
        is counted as bad, and too many bad steps stop the run. Returns True when the step was skipped."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm)) or total <= 0
        self.step_count += 1
        if bad:
            self.bad_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: loss %s, grad norm %s: step skipped (%d skipped so far, limit %d)",
                        self.step_count, loss, grad_norm, self.bad_steps, self.cfg.max_bad_steps)
            if self.bad_steps > self.cfg.max_bad_steps:
                self.metrics.close()
                raise TooManyBadSteps(f"{self.bad_steps} steps had a NaN/inf loss or gradient (max_bad_steps="
                                      f"{self.cfg.max_bad_steps}); stopping. Lower the learning rate or check the "
                                      "data.")
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return bad

    def _advance_schedule(self) -> float:
        """Step the learning-rate schedule; returns the rate this step used. A skipped step still advances it,
        as it advances the data."""
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # torch warns when the optimizer did not step first (a skipped step)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return lr

    def _record(self, out: dict) -> dict:
        """Monitors, history, metrics.jsonl and the progress bar, and a checkpoint when one is due."""
        out = {k: metrics_mod.to_float(v) for k, v in out.items()}
        for message in self.monitors.check(self.step_count, out):
            self.metrics.write(f"warning: {message}")
        self.history.append({"step": self.step_count, **out})
        self.metrics.log(self.step_count, out)
        if self.cfg.save_steps and self.step_count % self.cfg.save_steps == 0:
            self.save()
        return out

    def finish(self) -> dict:
        """Final checkpoint (when saving is on), the trained model in ``RUN_DIR/final`` (save_pretrained, with
        the tokenizer; written and verified like a checkpoint), a summary line. Returns ``{"run_dir", "final_dir",
        "history", "bad_steps"}``."""
        if self.cfg.save_steps and self.last_saved != self.step_count:
            self.save()
        final = checkpoint.save_final(self.run.run_dir, self.models, self.run.tokenizer, self.info)
        self.metrics.close()
        if self.bad_steps:
            log.warning("%d of %d steps were skipped for a NaN/inf loss or gradient", self.bad_steps,
                        self.step_count)
        counts = {k: v for k, v in self.monitors.counts.items() if v}
        if counts:
            log.warning("monitor threshold crossings (steps): %s", counts)
        log.info("done: %d steps; model saved to %s", self.step_count, final)
        return {"run_dir": self.run.run_dir, "final_dir": final, "history": self.history,
                "bad_steps": self.bad_steps}
