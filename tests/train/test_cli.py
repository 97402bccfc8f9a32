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
    assert cli.main(["train", "sft", "--max-steps", "many"]) == 2
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


def _fails_in_one_line(capsys, argv, *needles):
    """The command exits 2 and prints exactly one error line (no traceback) that contains every needle."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastalign: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def test_user_errors_are_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from fastalign.train import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("beta: [0.1\nloss_type: ipo\n")
    out = ["--output-dir", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--no-progress"]
    _fails_in_one_line(capsys, ["train", "dpo", "--config", str(bad_yaml)], str(bad_yaml), "invalid YAML", "line 2")
    _fails_in_one_line(capsys, ["train", "sft", "--learning-rate", "nan", *out], "learning_rate", "finite")
    _fails_in_one_line(capsys, ["train", "sft", "--learning-rate=-1e-5", *out], "learning_rate must be > 0")
    _fails_in_one_line(capsys, ["train", "grpo", "--num-generations", "0", *out], "num_generations must be >= 1")
    _fails_in_one_line(capsys, ["train", "dpo", "--beta", "0", *out], "beta must be > 0")
    _fails_in_one_line(capsys, ["train", "grpo", "--kl-coef", "-1", *out], "kl_coef must be >= 0")
    _fails_in_one_line(capsys, ["train", "grpo", "--entropy-coef", "-0.1", *out], "entropy_coef must be >= 0")
    _fails_in_one_line(capsys, ["train", "grpo", "--clip-low", "1", *out], "clip_low must lie in (0, 1)")
    _fails_in_one_line(capsys, ["train", "dpo", "--label-smoothing", "0.7", *out], "label_smoothing")
    _fails_in_one_line(capsys, ["train", "sft", "--train-file", str(tmp_path), *out], "train_file", "is a directory")
    _fails_in_one_line(capsys, ["train", "sft", "--model", str(tmp_path / "gone"), "--output-dir",
                                str(tmp_path / "run")], "gone' is not a local directory (it does not exist)")
    _fails_in_one_line(capsys, ["train", "sft", "--max-steps", "many"], "--max-steps: max_steps must be int")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: the same one-line format
        cli.main(["train", "sft", "--beta", "0.1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "fastalign: error: unrecognized arguments: --beta 0.1 (see `fastalign train sft --help`)"]
    _fails_in_one_line(capsys, ["plot", str(tmp_path / "nothing")], "metrics.jsonl not found")
    assert not (tmp_path / "run").exists()


def test_data_errors_and_run_dir_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    args = ["train", "sft", "--model", str(tiny_model_dir), "--no-progress", "--dtype", "float32", "--max-steps", "1",
            "--batch-size", "1", "--max-length", "32"]
    _fails_in_one_line(capsys, [*args, "--train-file", str(data), "--output-dir", str(tmp_path / "a")],
                       f"{data}:line 2: missing field 'completion'")
    assert cli.main([*args, "--output-dir", str(tmp_path / "b")]) == 0
    _fails_in_one_line(capsys, [*args, "--output-dir", str(tmp_path / "b")], "already holds a run", "--resume",
                       "--overwrite")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("beta: [0.1\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        cli.main(["train", "dpo", "--debug", "--config", str(bad_yaml)])
    monkeypatch.setenv("FASTALIGN_DEBUG", "1")
    with pytest.raises(ValueError, match="invalid YAML"):
        cli.main(["train", "dpo", "--config", str(bad_yaml)])


def test_the_console_command_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FASTALIGN_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "sft", "--learning-rate", "-1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fastalign: error: SFTConfig: learning_rate must be > 0, got -1.0"]
    proc = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "sft", "--learning-rate", "-1"],
                          capture_output=True, text=True, env={**env, "FASTALIGN_DEBUG": "1"}, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "learning_rate must be > 0" in proc.stderr
