"""Checkpoints: save_pretrained layout, atomic writes (incomplete directories ignored), pruning, RNG state."""
import random

import numpy as np
import torch

from fastalign.train import checkpoint, distributed, loop, models
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
    trainer_state, rng = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(run.run_dir),
                                                       distributed.DistInfo())
    assert trainer_state["step"] == 7 and rng is not None and "optimizer" in trainer_state
    # a different world size keeps the weights and data position but not the per-rank RNG streams
    _, rng = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(run.run_dir),
                                           distributed.DistInfo(rank=0, world_size=2))
    assert rng is None
