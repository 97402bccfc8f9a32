"""`fastalign cai ...` / `fastalign judge ...`: flags and YAML reach the configs; bad input is one line
`fastalign: error: ...` and exit code 2, never a traceback."""
import argparse
import json

import pytest
import yaml

from fastalign import cli
from fastalign.feedback import cli as feedback_cli
from fastalign.feedback.config import LabelConfig, ReviseConfig, from_namespace
from fastalign.feedback.constitution import DEFAULT_CONSTITUTION


def _fails(capsys, argv) -> str:
    assert cli.main(argv) == 2
    text = capsys.readouterr().err
    err = [line for line in text.strip().splitlines() if not line.startswith("[fastalign] ")]  # progress logs
    assert len(err) == 1 and err[0].startswith("fastalign: error: ") and "Traceback" not in text, text
    return err[0][len("fastalign: error: "):]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": ["not", "messages"]}\n')
    assert _fails(capsys, ["cai", "revise", "--prompts", str(tmp_path / "missing.jsonl")]) == (
        f"{tmp_path / 'missing.jsonl'}: no such file")
    message = _fails(capsys, ["cai", "label", "--prompts", str(prompts)])
    assert message.startswith(f"{prompts}:line 2: field 'prompt' must be a string or a list")
    bad = yaml.safe_load(DEFAULT_CONSTITUTION.read_text())
    del bad["principles"][0]["revision"]
    constitution = tmp_path / "c.yaml"
    constitution.write_text(yaml.safe_dump(bad))
    assert _fails(capsys, ["cai", "revise", "--constitution", str(constitution)]) == (
        f"{constitution}: field 'principles[0].revision': must be a non-empty string (missing)")
    assert "temperature must be > 0" in _fails(capsys, ["cai", "revise", "--temperature", "-1"])
    assert _fails(capsys, ["cai", "revise", "--rounds", "many"]) == "options: rounds must be int, got 'many'"
    assert "unknown filter 'short'" in _fails(capsys, ["cai", "revise", "--filters", "empty,short"])
    assert "give both answer files" in _fails(capsys, ["judge", "pairwise", "--a", "x.jsonl"])
    assert "retry_temperature must be > 0" in _fails(capsys, ["judge", "pairwise", "--a", "x", "--b", "y",
                                                             "--retry-temperature", "0"])
    (tmp_path / "bad.yaml").write_text("rounds: [1\n")
    assert "while parsing" in _fails(capsys, ["cai", "revise", "--config", str(tmp_path / "bad.yaml")])
    prompts.write_text('{"prompt": "ok"}\n')
    assert "is not a local directory" in _fails(capsys, ["cai", "revise", "--prompts", str(prompts), "--model",
                                                         str(tmp_path / "no-model"), "--out", str(tmp_path / "o.jsonl")])
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"prompt": "q"}\n')
    assert _fails(capsys, ["judge", "single", "--answers", str(answers)]) == (
        f"{answers}:line 1: missing field 'completion' (has ['prompt'])")


def test_help_and_missing_verb(capsys):
    assert cli.main(["cai"]) == 2
    assert "revise" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["judge", "pairwise", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--a", "--b", "--rubric", "--method", "--bootstrap", "--out-dir", "--config"):
        assert flag in out


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "label.yaml"
    path.write_text("num_responses: 3\nprinciples: [clear, useful]\ninconsistent: drop\ntemperature: 0.5\n")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    feedback_cli.add_commands(sub)
    ns = parser.parse_args(["cai", "label", "--config", str(path), "--temperature", "0.9", "--min-label", "0.6"])
    cfg = from_namespace(LabelConfig, ns)
    assert (cfg.num_responses, cfg.principles, cfg.inconsistent) == (3, ["clear", "useful"], "drop")
    assert cfg.temperature == 0.9 and cfg.min_label == 0.6 and cfg.batch_size == 8
    path.write_text("rounds: 2\nnot_a_field: 1\n")
    ns = parser.parse_args(["cai", "revise", "--config", str(path)])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['not_a_field'\] for ReviseConfig"):
        from_namespace(ReviseConfig, ns)


def test_a_verb_runs_and_prints_its_summary(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"prompt": "What now?"}\n')
    assert cli.main(["judge", "answer", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                     "--max-new-tokens", "4", "--out", "answers.jsonl"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["answers"] == 2 and summary["model"] == str(tiny_model_dir)
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2
