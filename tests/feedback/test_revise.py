"""`cai revise` bookkeeping on a scripted backend: rounds and provenance, every filter counted, deduplication,
resuming after a torn last line and after a real SIGKILL mid-file (the result equals an uninterrupted run)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fakes import revise_responder, text_model
from fastalign.feedback.config import ReviseConfig
from fastalign.feedback.constitution import load_constitution
from fastalign.feedback.io import row_id
from fastalign.feedback.prompts import sample_principles
from fastalign.feedback.revise import revise

PROMPTS = ["p-normal one", "p-empty two", "p-trunc three", "P-NORMAL  one", "p-same four", "p-dup five",
           "p-dup six", "p-normal seven"]


def _prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "category": "c"}) + "\n" for p in PROMPTS))
    return path


def _cfg(tmp_path, out_dir="out", **kw):
    base = dict(prompts=str(_prompts(tmp_path)), out=str(tmp_path / out_dir / "sft.jsonl"), rounds=2, batch_size=2,
                few_shot=0, max_new_tokens=16, seed=3)
    return ReviseConfig(**{**base, **kw})


def _files(cfg):
    out = Path(cfg.out)
    return out.read_bytes(), out.with_name("sft.rejected.jsonl").read_bytes()


def test_rounds_provenance_and_filters(tmp_path, tiny_tokenizer):
    c = load_constitution()
    cfg = _cfg(tmp_path)
    model = text_model(tiny_tokenizer, revise_responder(c), name="scripted")
    summary = revise(cfg, model=model)
    assert summary["duplicate_prompts"] == 1 and summary["unique_prompts"] == 7
    assert summary["kept"] == 3 and summary["rejected"] == {"empty": 1, "truncated": 1, "unchanged": 1,
                                                             "duplicate": 1}
    assert summary["model"] == "scripted" and summary["sampling"]["max_new_tokens"] == 16 and summary["seed"] == 3
    rows = [json.loads(x) for x in Path(cfg.out).read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["p-normal one", "p-dup five", "p-normal seven"]
    first = rows[0]
    assert first["completion"] == "better better draft of p-normal one" and first["category"] == "c"
    prov = first["provenance"]
    assert prov["initial"] == "draft of p-normal one"
    assert [r["critique"] for r in prov["rounds"]] == ["critique of draft of p-normal one",
                                                       "critique of better draft of p-normal one"]
    assert [r["revision"] for r in prov["rounds"]] == ["better draft of p-normal one",
                                                       "better better draft of p-normal one"]
    expected = [sample_principles(c, 1, 3, row_id("p-normal one"), k)[0].id for k in range(2)]
    assert prov["principles"] == expected == [r["principle"] for r in prov["rounds"]]
    assert prov["model"] == "scripted" and prov["seed"] == 3 and prov["sampling"]["temperature"] == 0.8
    rejected = {json.loads(x)["prompt"]: json.loads(x)["reason"]
                for x in Path(cfg.out).with_name("sft.rejected.jsonl").read_text().splitlines()}
    assert rejected == {"p-empty two": "empty", "p-trunc three": "truncated", "p-same four": "unchanged",
                        "p-dup six": "duplicate"}
    # what the model was asked: the critique request of the drawn principle, after the current response
    critique_turns = [t for t in model.backend.seen if t.user == c.principle(expected[1]).critique
                      and t.turns[0][1] == "p-normal one"]
    assert [t.turns[1][1] for t in critique_turns] == ["better draft of p-normal one"]
    written = json.loads(Path(cfg.out).with_name("sft.summary.json").read_text())
    assert written == summary


def test_filters_can_be_turned_off(tmp_path, tiny_tokenizer):
    cfg = _cfg(tmp_path, filters=["none"])
    summary = revise(cfg, model=text_model(tiny_tokenizer, revise_responder(load_constitution())))
    assert summary["kept"] == 7 and sum(summary["rejected"].values()) == 0


def test_rerun_skips_finished_rows_without_loading_a_model(tmp_path, tiny_tokenizer):
    cfg = _cfg(tmp_path)
    first = revise(cfg, model=text_model(tiny_tokenizer, revise_responder(load_constitution())))
    before = _files(cfg)
    again = revise(_cfg(tmp_path, model=str(tmp_path / "no-such-model")))  # would fail if it loaded one
    assert _files(cfg) == before and again["done_before"] == 7 and again["processed"] == 0
    assert again["kept"] == first["kept"] and again["rejected"] == first["rejected"]


def test_resume_after_a_torn_last_line(tmp_path, tiny_tokenizer):
    c = load_constitution()
    full_cfg = _cfg(tmp_path, "full")
    revise(full_cfg, model=text_model(tiny_tokenizer, revise_responder(c)))
    cfg = _cfg(tmp_path, "torn")
    with pytest.raises(RuntimeError, match="scripted crash"):  # batch 1 = calls 1-5; dies as batch 2 starts
        revise(cfg, model=text_model(tiny_tokenizer, revise_responder(c), crash_on_call=6))
    kept = Path(cfg.out).read_text()
    assert len(kept.splitlines()) == 1  # batch 1: "p-normal one" kept, "p-empty two" rejected
    torn = json.dumps({"id": "x", "prompt": "p-trunc three", "completion": "half"})[:25]
    with open(cfg.out, "a") as fh:
        fh.write(torn)  # the start of a line whose write was cut short
    summary = revise(cfg, model=text_model(tiny_tokenizer, revise_responder(c)))
    assert summary["torn_bytes_cut"] == 25 and summary["done_before"] == 2 and summary["processed"] == 5
    assert _files(cfg) == _files(full_cfg)


def test_corrupt_middle_line_is_an_error(tmp_path, tiny_tokenizer):
    from fastalign.feedback.io import FeedbackError

    cfg = _cfg(tmp_path)
    Path(cfg.out).parent.mkdir(parents=True)
    Path(cfg.out).write_text('{"id": "a", "completion": "x"}\n{not json\n{"id": "b", "completion": "y"}\n')
    with pytest.raises(FeedbackError, match=r"sft.jsonl:line 2: corrupt row"):
        revise(cfg, model=text_model(tiny_tokenizer, revise_responder(load_constitution())))


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from fakes import revise_responder, text_model
    from fastalign.feedback.config import ReviseConfig
    from fastalign.feedback.constitution import load_constitution
    from fastalign.feedback.revise import revise
    from fastalign.train.models import load_tokenizer

    cfg = ReviseConfig(prompts=sys.argv[3], out=sys.argv[4], rounds=2, batch_size=2, few_shot=0, max_new_tokens=16,
                       seed=3)
    model = text_model(load_tokenizer(sys.argv[2]), revise_responder(load_constitution()), kill_on_call=8)
    revise(cfg, model=model)
""")


def test_resume_after_sigkill_mid_file(tmp_path, tiny_tokenizer, tiny_model_dir):
    c = load_constitution()
    full_cfg = _cfg(tmp_path, "full")
    revise(full_cfg, model=text_model(tiny_tokenizer, revise_responder(c)))
    cfg = _cfg(tmp_path, "killed")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(tiny_model_dir),
                           cfg.prompts, cfg.out], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # killed inside batch 2 (call 8 of 5 per batch): batch 1 is on disk, complete, and nothing else
    assert [json.loads(x)["prompt"] for x in Path(cfg.out).read_text().splitlines()] == ["p-normal one"]
    summary = revise(cfg, model=text_model(tiny_tokenizer, revise_responder(c)))
    assert summary["done_before"] == 2 and summary["torn_bytes_cut"] == 0
    assert _files(cfg) == _files(full_cfg)
