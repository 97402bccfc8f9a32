"""Checkpoints: save_pretrained layout, atomic writes (incomplete directories ignored), pruning, RNG state."""
import logging
import random

import numpy as np
import pytest
import torch

from fastalign.train import checkpoint, distributed, loop, metrics, models
from fastalign.train.config import SFTConfig


def _setup(tmp_path, tiny_model_dir, **kw):
    cfg = SFTConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), progress=False, dtype="float32",
                    max_steps=10, **kw)
    run = loop.prepare(cfg)
    model = models.load_model(run.model_path, dtype="float32")
    return cfg, run, model


def test_layout_atomicity_and_pruning(tmp_path, tiny_model_dir):
    cfg, run, model = _setup(tmp_path, tiny_model_dir, save_total_limit=2)
    train = loop.TrainLoop(cfg, model, run)
    for step in (1, 2, 3):
        train.step_count = step
        path = train.save()
    assert path == checkpoint.checkpoint_dir(run.run_dir, 3)
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    for name in ("COMPLETE", "trainer_state.pt", "rng-rank0.pt", "model/model.safetensors", "model/config.json",
                 "model/tokenizer.json"):
        assert (path / name).is_file(), name
    # a crash mid-write leaves only a .tmp directory (or one without COMPLETE): never picked up
    (run.run_dir / "checkpoints" / ".tmp-step-000004").mkdir()
    (run.run_dir / "checkpoints" / "step-000009").mkdir()
    assert checkpoint.latest_checkpoint(run.run_dir) == path
    # the saved weights reload into a fresh model exactly (tied head included)
    fresh = models.load_model(tiny_model_dir, dtype="float32")
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    checkpoint.load_weights(fresh, path / "model")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_rng_round_trip_and_state(tmp_path, tiny_model_dir):
    state = checkpoint.rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
    cfg, run, model = _setup(tmp_path, tiny_model_dir)
    train = loop.TrainLoop(cfg, model, run)
    train.step_count = 7
    train.save()
    trainer_state, rng, rank = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(run.run_dir),
                                                             distributed.DistInfo())
    assert trainer_state["step"] == 7 and rng is not None and "optimizer" in trainer_state
    assert trainer_state["algorithm"] == "sft" and rank is None  # no per-process state in an SFT run
    # a different world size keeps the weights and data position but not the per-rank RNG streams
    _, rng, _ = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(run.run_dir),
                                              distributed.DistInfo(rank=0, world_size=2))
    assert rng is None


def _two_checkpoints(tmp_path, tiny_model_dir):
    """A 4-step SFT run with checkpoints at steps 2 and 4, and the config to resume it to step 6."""
    from fastalign.train import sft

    kw = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, save_steps=2,
              max_length=48, progress=False, dtype="float32", learning_rate=1e-3)
    sft.train(SFTConfig(**kw))
    return sft, SFTConfig(**{**kw, "max_steps": 6, "resume": True})


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_and_is_written_before_complete(tmp_path, tiny_model_dir):
    import json

    from fastalign.train import manifest

    _two_checkpoints(tmp_path, tiny_model_dir)
    for path in (checkpoint.checkpoint_dir(tmp_path / "run", 4), tmp_path / "run" / "final"):
        listed = json.loads((path / "MANIFEST.json").read_text())["files"]
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        assert set(listed) == on_disk - {"MANIFEST.json", "COMPLETE"}
        assert (path / "MANIFEST.json").stat().st_mtime_ns <= (path / "COMPLETE").stat().st_mtime_ns
        assert manifest.verify(path) is None
    assert "model.safetensors" in listed and "tokenizer.json" in listed  # final: weights and tokenizer
    assert not list((tmp_path / "run").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["flip-weights", "0x7f-weights", "truncate-state", "flip-state", "remove-rng"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, tiny_model_dir, caplog, damage):
    sft, resume_cfg = _two_checkpoints(tmp_path, tiny_model_dir)
    newest = checkpoint.checkpoint_dir(tmp_path / "run", 4)
    weights, state = newest / "model" / "model.safetensors", newest / "trainer_state.pt"
    if damage == "flip-weights":
        _flip_byte(weights)
    elif damage == "0x7f-weights":  # four bytes of one fp32 weight: 3.4e38, finite, and every step then NaN
        data = bytearray(weights.read_bytes())
        data[-400:-396] = b"\x7f\x7f\x7f\x7f"
        weights.write_bytes(bytes(data))
    elif damage == "truncate-state":
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "flip-state":
        _flip_byte(state)
    else:
        (newest / "rng-rank0.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="fastalign.train"):
        result = sft.train(resume_cfg)
    assert f"checkpoint {newest} fails verification" in caplog.text
    assert "falling back to" in caplog.text and "step-000002" in caplog.text
    assert [h["step"] for h in result["history"]] == [3, 4, 5, 6] and result["bad_steps"] == 0
    assert (tmp_path / "run" / "checkpoints" / ".bad-step-000004").is_dir()  # kept aside, never resumed again
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_resume_with_no_good_checkpoint_is_an_error_that_changes_nothing(tmp_path, tiny_model_dir):
    from fastalign.train import resume

    sft, resume_cfg = _two_checkpoints(tmp_path, tiny_model_dir)
    for step in (2, 4):
        _flip_byte(checkpoint.checkpoint_dir(tmp_path / "run", step) / "model" / "model.safetensors")
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(resume.CheckpointError, match=r"no checkpoint .* passes verification \(step-000004: model/"
                                                     r"model.safetensors: SHA-256 differs.*step-000002"):
        sft.train(resume_cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows
    assert len(checkpoint.complete_checkpoints(tmp_path / "run")) == 2


def test_non_finite_weights_are_never_saved(tmp_path, tiny_model_dir):
    cfg, run, model = _setup(tmp_path, tiny_model_dir)
    train = loop.TrainLoop(cfg, model, run)
    train.step_count = 1
    train.save()
    with torch.no_grad():
        train.params[3].view(-1)[7] = float("nan")
    with pytest.raises(checkpoint.NonFiniteWeights, match=r"NaN/inf \(model: .*\); not saved"):
        train.save()
    with pytest.raises(checkpoint.NonFiniteWeights):
        train.finish()
    assert not (run.run_dir / "final").exists() and not (run.run_dir / ".tmp-final").exists()
    assert [p.name for p in (run.run_dir / "checkpoints").iterdir()] == ["step-000001"]


def test_final_is_replaced_atomically_and_checked(tmp_path, tiny_model_dir, monkeypatch):
    cfg, run, model = _setup(tmp_path, tiny_model_dir)
    train = loop.TrainLoop(cfg, model, run)
    first = train.finish()["final_dir"]
    assert (first / "model.safetensors").is_file() and (first / "COMPLETE").is_file()
    # save_pretrained writing nothing (as it does, with only a log line, for a path it cannot use) is an error
    monkeypatch.setattr(type(models.unwrap(model)), "save_pretrained", lambda self, *a, **k: None)
    with pytest.raises(RuntimeError, match="wrote no weights"):
        loop.TrainLoop(cfg, models.load_model(run.model_path, dtype="float32"), run).finish()
    assert (first / "model.safetensors").is_file()  # the earlier final/ is untouched
