"""Metrics JSONL, monitors with thresholds, the NaN guard (skip, count, abort), and `fastalign plot`."""
import json
import logging
import math

import pytest
import torch

from fastalign.train import loop, metrics, models, plot
from fastalign.train.config import SFTConfig


def test_monitors_warn_once_per_crossing(caplog):
    cfg = SFTConfig(warn_kl=1.0, warn_entropy=0.5, warn_clip_frac=None, warn_reward_length_corr=0.8)
    mon = metrics.Monitors(cfg)
    with caplog.at_level(logging.WARNING, logger="fastalign.train"):
        assert mon.check(1, {"kl": 0.5, "entropy": 1.0}) == []
        fired = mon.check(2, {"kl": 2.0, "entropy": 0.1, "clip_frac": 0.9, "reward_length_corr": -0.9})
        assert len(fired) == 3  # clip_frac has no threshold
        assert mon.check(3, {"kl": 3.0, "entropy": 0.1}) == []  # still crossed: no repeat
        assert len(mon.check(5, {"kl": 0.1}) + mon.check(6, {"kl": 4.0})) == 1  # recovered, then crossed again
    assert "kl = 2 is above the warning threshold 1" in caplog.text
    assert "entropy = 0.1 is below" in caplog.text
    assert mon.counts == {"kl": 3, "entropy": 2, "clip_frac": 0, "reward_length_corr": 1}


def test_reward_length_correlation():
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(metrics.reward_length_correlation(2 * lengths + 1, lengths), 1.0, rel_tol=1e-9)
    assert math.isclose(metrics.reward_length_correlation(-lengths, lengths), -1.0, rel_tol=1e-9)
    assert metrics.reward_length_correlation(torch.ones(4), lengths) == 0.0


def _loop(tmp_path, tiny_model_dir, **kw):
    cfg = SFTConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), progress=False, dtype="float32",
                    learning_rate=1e-2, **kw)
    run = loop.prepare(cfg)
    return loop.TrainLoop(cfg, models.load_model(run.model_path, dtype="float32"), run)


def test_nan_loss_is_skipped_counted_and_aborts(tmp_path, tiny_model_dir, caplog):
    train = _loop(tmp_path, tiny_model_dir, max_steps=10, max_bad_steps=2)
    param = train.params[0]

    def loss_fn(poison):
        def fn(_):
            loss = (param.float() ** 2).mean()
            return (loss * float("nan") if poison else loss), {}
        return fn

    before = param.detach().clone()
    with caplog.at_level(logging.WARNING, logger="fastalign.train"):
        out = train.step([0], loss_fn(True))
    assert out["skipped"] == 1 and train.bad_steps == 1 and "step skipped" in caplog.text
    assert torch.equal(param, before) and all(p.grad is None for p in train.params)
    assert train.step([0], loss_fn(False))["skipped"] == 0 and not torch.equal(param, before)
    train.step([0], loss_fn(True))
    with pytest.raises(loop.TooManyBadSteps, match="3 steps had a NaN/inf"):
        train.step([0], loss_fn(True))
    rows = metrics.read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [1, 0, 1]


def test_metrics_jsonl_and_plot(tmp_path):
    run = tmp_path / "run"
    logger = metrics.MetricsLogger(run, total_steps=3, progress=True)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "reward": torch.tensor([0.1 * step, 0.3 * step]), "kl": 0.01 * step})
    logger.close()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"step": 2, "loss": 0.5, "reward": pytest.approx(0.4), "kl": 0.02}
    written = plot.plot_run(run)
    assert {p.name for p in written} == {"curves.png", "loss.png", "reward.png", "kl.png"}
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plot.plot_run(tmp_path / "nothing")


def _torn_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "loss": 0.2')  # killed mid-write
    return run


def test_a_torn_last_line_is_dropped_on_resume_and_skipped_by_plot(tmp_path, caplog):
    run = _torn_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastalign.train"):
        assert [r["step"] for r in metrics.read_metrics(run)] == [1, 2, 3]
        assert "skipped a torn last line" in caplog.text
        assert {p.name for p in plot.plot_run(run)} == {"curves.png", "loss.png"}
    run = _torn_run(tmp_path / "again")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastalign.train"):
        logger = metrics.MetricsLogger(run, total_steps=5, start_step=2, progress=False)
    assert "dropped a torn last line" in caplog.text and "dropped 1 row(s) past step 2" in caplog.text
    logger.log(3, {"loss": 0.3})
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_broken_line_inside_the_file_is_an_error_naming_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:line 2: not valid JSON"):
        metrics.read_metrics(run)


def test_read_floats_gives_to_float_values_with_one_transfer():
    from fastalign.train.metrics import pending_float, read_floats, to_float

    values = [torch.tensor(0.1234567), torch.tensor([1.5, 2.25], dtype=torch.bfloat16), torch.tensor(7),
              torch.tensor([True, False, True]).sum(), 3, 0.25, torch.tensor([1e-3, 2e-3, 4e-3])]
    got = read_floats([pending_float(v) for v in values])
    assert got == [to_float(v) for v in values]
    assert all(type(x) is float for x in got)
    big = torch.tensor(2**40 + 1)  # a token count beyond float32's integers is read exactly
    assert read_floats([pending_float(big)]) == [float(2**40 + 1)]
    assert read_floats([]) == []
