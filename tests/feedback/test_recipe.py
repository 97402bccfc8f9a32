"""The recipe of docs/feedback.md, run as written on the embedded tiny model (real HF backend): prompts ->
revised SFT set -> SFT -> AI-labelled pairs -> DPO -> answers -> judge report. The texts are nonsense at this
size; the test checks the files, their formats and that every number in them adds up."""
import json
import re
import shlex
from pathlib import Path

import torch

from fastalign import cli
from fastalign.train import data

DOC = Path(__file__).resolve().parents[2] / "docs" / "feedback.md"


def recipe_commands() -> list[list[str]]:
    block = re.search(r"<!-- recipe -->\n```bash\n(.*?)```\n<!-- /recipe -->", DOC.read_text(), flags=re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_recipe_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTALIGN_CACHE", str(tmp_path / "cache"))  # the embedded model, built here
    commands = recipe_commands()
    assert [c[:3] for c in commands] == [
        ["fastalign", "cai", "revise"], ["fastalign", "train", "sft"], ["fastalign", "cai", "label"],
        ["fastalign", "train", "dpo"], ["fastalign", "judge", "answer"], ["fastalign", "judge", "answer"],
        ["fastalign", "judge", "pairwise"], ["fastalign", "judge", "single"]]
    for argv in commands:
        assert cli.main(argv[1:]) == 0, argv
    capsys.readouterr()

    # 1. the revised SFT set: every row has its round, and the summary adds up
    sft = _rows("cai/sft.jsonl")
    summary = json.loads(Path("cai/sft.summary.json").read_text())
    assert summary["unique_prompts"] == 16 and summary["kept"] == len(sft) > 0
    assert summary["kept"] + sum(summary["rejected"].values()) == 16
    assert all(len(r["provenance"]["rounds"]) == 1 and r["completion"] == r["provenance"]["rounds"][0]["revision"]
               for r in sft)
    assert len(data.load_rows("cai/sft.jsonl", "sft")) == len(sft)  # the trainer's loader reads it as is
    # 2. SFT trained on it; 3. labelled pairs from the SFT policy, log-prob verdicts
    assert len(_rows("runs/sft/metrics.jsonl")) == 10 and Path("runs/sft/final/config.json").is_file()
    prefs = _rows("cai/prefs.jsonl")
    lsum = json.loads(Path("cai/prefs.summary.json").read_text())
    assert lsum["kept_pairs"] == len(prefs) > 0 and lsum["label_method"] == "logprobs"
    assert lsum["policy"] == "runs/sft/final" and lsum["failed_votes"] == 0
    for r in prefs:
        assert 0.5 < r["label"] <= 1 and len(r["label_parts"]) == 2 and r["chosen"] != r["rejected"]
        assert abs(r["label"] - sum(p["p"] for p in r["label_parts"]) / 2) < 1e-12
        for p in r["label_parts"]:
            assert abs(p["p"] - (p["p_chosen_first"] + p["p_chosen_second"]) / 2) < 1e-12
    assert lsum["label_mean"] == sum(r["label"] for r in prefs) / len(prefs)
    # 4. DPO on the soft labels: the first step's loss is log 2 (policy = reference), the rest finite
    dpo = _rows("runs/dpo/metrics.jsonl")
    assert len(dpo) == 10 and abs(dpo[0]["loss"] - 0.6931472) < 1e-5
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in dpo)
    # 5. answers and the judge report
    answers = {m: _rows(f"judge/{m}.jsonl") for m in ("sft", "dpo")}
    assert [len(v) for v in answers.values()] == [8, 8] and answers["dpo"][0]["model"] == "runs/dpo/final"
    report = json.loads(Path("judge/dpo-vs-sft/summary.json").read_text())
    verdicts = _rows("judge/dpo-vs-sft/verdicts.jsonl")
    assert report["model_a"] == "runs/dpo/final" and report["method"] == "logprobs" and len(verdicts) == 8
    assert report["n"] + report["unparseable"] == 8
    assert report["wins_a"] + report["wins_b"] + report["ties"] == report["n"]
    judged = [v for v in verdicts if v["winner"] is not None]
    assert abs(report["win_rate_a"] - sum(v["score_a"] for v in judged) / len(judged)) < 1e-12
    assert report["ci_a"][0] <= report["win_rate_a"] <= report["ci_a"][1]
    assert sum(c["n"] for c in report["categories"].values()) == report["n"]
    for v in verdicts:
        for order in v["orders"]:
            assert abs(sum(order["probs"].values()) - 1) < 1e-9 and 0 < order["mass"] < 1
    grades = json.loads(Path("judge/grades/summary.json").read_text())
    assert set(grades["models"]) == {"runs/dpo/final", "runs/sft/final"}
    assert all(m["n"] + m["unparseable"] == 8 for m in grades["models"].values())
    for name in ("judge/dpo-vs-sft/chart.png", "judge/grades/chart.png"):
        assert Path(name).read_bytes()[:4] == b"\x89PNG"
