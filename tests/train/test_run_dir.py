"""Run directories: an existing run is never reused silently (refused, moved aside on --overwrite, or resumed with
its algorithm and exactness-critical settings checked), and every path is checked before a model loads."""
import json
import logging

import pytest

from fastalign.train import checkpoint, dpo, loop, metrics, models, run_dir, sft
from fastalign.train.config import DPOConfig, SFTConfig


def _sft(tiny_model_dir, out, **kw):
    base = dict(model=str(tiny_model_dir), output_dir=str(out), max_steps=2, batch_size=2, max_length=48,
                progress=False, dtype="float32", save_steps=1)
    base.update(kw)
    return SFTConfig(**base)


def test_existing_run_is_refused_and_overwrite_moves_it_aside(tmp_path, tiny_model_dir, caplog):
    out = tmp_path / "run"
    sft.train(_sft(tiny_model_dir, out))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(run_dir.RunDirError, match="already holds a run .*--resume.*--overwrite"):
        sft.train(_sft(tiny_model_dir, out, max_steps=1, learning_rate=1e-3))
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    with caplog.at_level(logging.WARNING, logger="fastalign.train"):
        result = sft.train(_sft(tiny_model_dir, out, max_steps=1, overwrite=True))
    (aside,) = tmp_path.glob("run.replaced-*")
    assert f"moved the earlier run in {out} to {aside}" in caplog.text
    assert (aside / "metrics.jsonl").read_text() == before and (aside / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in metrics.read_metrics(out)] == [1] and len(result["history"]) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]


def test_run_json_and_resume_checks(tmp_path, tiny_model_dir, caplog):
    out = tmp_path / "run"
    sft.train(_sft(tiny_model_dir, out))
    record = json.loads((out / "run.json").read_text())
    assert record["algorithm"] == "sft" and record["config"]["batch_size"] == 2 and record["resumed"] == []
    with pytest.raises(run_dir.RunDirError, match="holds a 'sft' run, not 'dpo'"):
        dpo.train(DPOConfig(model=str(tiny_model_dir), output_dir=str(out), resume=True, progress=False))
    with pytest.raises(run_dir.RunDirError, match=r"changed since the run in .* started: seed 0 -> 3, batch_size 2 -> 4;"):
        sft.train(_sft(tiny_model_dir, out, resume=True, batch_size=4, seed=3))
    with caplog.at_level(logging.WARNING, logger="fastalign.train"):
        result = sft.train(_sft(tiny_model_dir, out, resume=True, max_steps=3, learning_rate=3e-5))
    assert "changed since the run started: max_steps 2 -> 3; learning_rate 2e-05 -> 3e-05" in caplog.text
    assert [h["step"] for h in result["history"]] == [3]
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["learning_rate"] == 3e-5
    assert record["resumed"][0]["changed"] == {"max_steps": [2, 3], "learning_rate": [2e-5, 3e-5]}


def test_paths_are_checked_before_training(tmp_path, tiny_model_dir, monkeypatch):
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("a model loaded"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "final").write_text("not a directory")
    for kw in (dict(resume=True), dict()):  # refused as a file either way, before any model loads
        with pytest.raises(run_dir.RunDirError, match="final' is a file"):
            sft.train(_sft(tiny_model_dir, out, **kw))
    (tmp_path / "file").write_text("x")
    with pytest.raises(run_dir.RunDirError, match="output_dir .*file' is a file"):
        sft.train(_sft(tiny_model_dir, tmp_path / "file"))
    with pytest.raises(run_dir.RunDirError, match="train_file .* is a directory"):
        sft.train(_sft(tiny_model_dir, tmp_path / "new", train_file=str(tmp_path)))
    with pytest.raises(run_dir.RunDirError, match=r"model: model path .*nowhere' is not a local directory \(it does not exist\)"):
        sft.train(_sft(tmp_path / "nowhere", tmp_path / "new"))
    with pytest.raises(run_dir.RunDirError, match="ref_model: model path"):
        dpo.train(DPOConfig(model=str(tiny_model_dir), ref_model=str(tmp_path / "nowhere"),
                            output_dir=str(tmp_path / "new"), progress=False))
    assert not loads and not (tmp_path / "new").exists()


def test_pruning_keeps_the_checkpoints_of_this_run(tmp_path, tiny_model_dir):
    """A stale checkpoint with a higher step (e.g. one a resume fell back from) never makes pruning delete the
    checkpoint just written."""
    cfg = _sft(tiny_model_dir, tmp_path / "run", save_total_limit=1, max_steps=10)
    run = loop.prepare(cfg)
    train = loop.TrainLoop(cfg, models.load_model(run.model_path, dtype="float32"), run)
    train.step_count = 7
    stale = train.save()
    train.step_count = 2
    assert train.save() == checkpoint.checkpoint_dir(run.run_dir, 2)
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000007"]
    assert stale.is_dir()


def test_resuming_a_finished_run_without_checkpoints_is_refused(tmp_path, tiny_model_dir):
    """Starting such a run from step 0 would replace its final/ with nothing gained: an error, not a restart."""
    out = tmp_path / "run"
    sft.train(_sft(tiny_model_dir, out, save_steps=0))
    before = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(run_dir.RunDirError, match="finished without checkpoints"):
        sft.train(_sft(tiny_model_dir, out, save_steps=0, resume=True, max_steps=3))
    assert (out / "final" / "model.safetensors").read_bytes() == before
