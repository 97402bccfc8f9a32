"""The fastalign CLI: --help documents every field, YAML + flag overrides reach the trainer, env, plot."""
import dataclasses

import pytest

from fastalign import cli
from fastalign.train import metrics
from fastalign.train.config import DPOConfig, SFTConfig, TrainConfig


def _help(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_train_help_documents_every_field(capsys):
    text = _help(capsys, ["train", "--help"])
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name}" in text and f.metadata["help"][:30] in text.replace("\n", " ")
    for name in ("sft", "rm", "dpo"):
        assert name in text
    for f in dataclasses.fields(DPOConfig):
        assert f.name in text, f.name
    dpo_text = _help(capsys, ["train", "dpo", "--help"])
    for f in dataclasses.fields(DPOConfig):
        assert f"--{f.name.replace('_', '-')}" in dpo_text, f.name
    assert "--config" in dpo_text and "--no-fused" in dpo_text


def test_train_from_yaml_with_flag_overrides(tmp_path, tiny_model_dir, capsys):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"model: {tiny_model_dir}\nmax_steps: 5\nbatch_size: 2\nlearning_rate: 1.0e-3\n"
                         f"dtype: float32\nmax_length: 64\noutput_dir: {tmp_path / 'ignored'}\n")
    run = tmp_path / "run"
    assert cli.main(["train", "sft", "--config", str(yaml_path), "--max-steps", "2", "--output-dir", str(run),
                     "--no-progress", "--packing"]) == 0
    rows = metrics.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["lr"] == pytest.approx(1e-3)
    saved = (run / "config.yaml").read_text()
    assert "max_steps: 2" in saved and "packing: true" in saved and "batch_size: 2" in saved
    assert not (tmp_path / "ignored").exists()
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "plots" / "curves.png").is_file() and "curves.png" in capsys.readouterr().out


def test_bad_usage_and_env(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "sft", "--beta", "0.1"])  # a DPO field is not an SFT flag
    with pytest.raises(SystemExit):
        cli.main(["train", "sft", "--max-steps", "many"])
    assert "--max-steps: max_steps must be int" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown algorithm"):
        cli.load_algorithm("nope")
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "triton:" in out and "extension fastalign._C:" in out and "torch reference: yes" in out


def test_registration_hook(tmp_path, monkeypatch):
    monkeypatch.setitem(cli.ALGORITHMS, "mysft", ("fastalign.train.sft", "SFTConfig", "train"))
    cls, fn = cli.load_algorithm("mysft")
    assert cls is SFTConfig and callable(fn)


def test_demo_and_bench_get_every_argument(monkeypatch):
    import sys
    import types

    seen = []
    for module in ("fastalign.train.demo", "fastalign.benchmarks.__main__"):
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(main=lambda argv: seen.append(argv)))
    assert cli.main(["demo", "--quick", "--seed", "3"]) == 0
    assert cli.main(["bench", "--help"]) == 0
    assert seen == [["--quick", "--seed", "3"], ["--help"]]


def test_no_model_builds_the_embedded_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTALIGN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "rm"
    assert cli.main(["train", "rm", "--max-steps", "1", "--batch-size", "2", "--output-dir", str(run),
                     "--no-progress", "--dtype", "float32"]) == 0
    assert (tmp_path / "cache" / "tiny-llama" / "config.json").is_file()
    assert (run / "final" / "model.safetensors").is_file() and len(metrics.read_metrics(run)) == 1
