"""`fastalign demo --quick` (through the CLI) runs every stage and prints held-out accuracy before and after each."""
import re

from fastalign import cli
from fastalign.train import demo


def test_demo_quick_runs_every_stage(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = re.findall(r"^\[demo\] (init|sft|dpo|grpo)\s+(\d+\.\d)%\s+(\d+\.\d)$", out, flags=re.M)
    assert [stage for stage, _, _ in table] == ["init", "sft", "dpo", "grpo"], out
    assert all(0.0 <= float(acc) <= 100.0 for _, acc, _ in table)
    assert re.search(r"^\[demo\] \d+\.\d% -> \d+\.\d% in \d+s total$", out, flags=re.M), out
    for stage in ("sft", "dpo", "grpo"):  # each stage trained and saved a loadable checkpoint
        assert (tmp_path / stage / "final" / "model.safetensors").is_file()
        assert (tmp_path / stage / "metrics.jsonl").read_text().count("\n") == getattr(demo.QUICK, f"{stage}_steps")
    # the chain: each stage starts from the previous stage's model
    assert f"model: {tmp_path / 'sft' / 'final'}" in (tmp_path / "dpo" / "config.yaml").read_text()
    assert f"model: {tmp_path / 'dpo' / 'final'}" in (tmp_path / "grpo" / "config.yaml").read_text()
    # a second demo into the same directory is refused, then runs with --overwrite (the old stages moved aside)
    assert cli.main(["demo", "--quick", "--no-progress", "--output-dir", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["demo", "--quick", "--no-progress", "--overwrite", "--output-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("sft.replaced-*"))) == 1
