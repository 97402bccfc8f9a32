"""`judge answer|pairwise|single` on scripted backends: both orders mapped back to the models, ties and position
bias, unparseable verdicts retried once then counted, grades from text and from label probabilities, files."""
import json
import re
from pathlib import Path

import pytest
import yaml

from fakes import ScriptedScorer, text_model
from fastalign.feedback.config import AnswerConfig, PairwiseConfig, SingleConfig
from fastalign.feedback.constitution import DEFAULT_RUBRIC
from fastalign.feedback.io import FeedbackError
from fastalign.feedback.judge import answer, pairwise, single

PNG = b"\x89PNG\r\n\x1a\n"


def _answers(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({**r, "model": name}) + "\n" for r in rows))
    return str(path)


def _pair(user):
    m = re.search(r"Request:\n(.*?)\n\nAnswer A:\n(.*?)\n\nAnswer B:\n(.*?)\n\nGive", user, flags=re.S)
    return m.group(1), m.group(2), m.group(3)


def judge_probs(user):
    """P(A), P(B), P(tie): prefers the 'strong' answer; on 'biased' prompts always the first shown; 'even' ties."""
    prompt, a, b = _pair(user)
    if "biased" in prompt:
        return [0.6, 0.3, 0.1]
    if "even" in prompt:
        return [0.2, 0.2, 0.6]
    return [0.7, 0.2, 0.1] if "strong" in a else [0.2, 0.7, 0.1]


def judge_text(turn):
    if "Answer A:" not in turn.user:
        return "7" if "strong" in turn.user else ("hmm" if "hopeless" in turn.user else "3")
    prompt, a, b = _pair(turn.user)
    if "hopeless" in prompt or ("garbled" in prompt and turn.sampling.greedy):
        return "Both have merits."
    return "A" if "strong" in a else "B. Answer B is better [[B]]"


PROMPTS = [("p1", "strong one", "weak one", "x"), ("p-biased", "strong two", "strong too", "x"),
           ("p-even", "fine", "fine as well", "y"), ("p-loss", "weak three", "strong three", "y")]


def _files(tmp_path, prompts=PROMPTS):
    extra = [{"id": "only-a", "prompt": "?", "completion": "."}]  # B has no answer to it
    a = _answers(tmp_path, "model-a", [{"id": p, "prompt": f"{p}?", "completion": ca, "category": c}
                                       for p, ca, _, c in prompts] + extra)
    b = _answers(tmp_path, "model-b", [{"id": p, "prompt": f"{p}?", "completion": cb} for p, _, cb, _ in prompts])
    return a, b


def test_pairwise_from_logprobs(tmp_path, tiny_tokenizer):
    a, b = _files(tmp_path)
    model = text_model(tiny_tokenizer, judge_text, name="judge",
                       scorer=ScriptedScorer(tiny_tokenizer, judge_probs, labels=("A", "B", "C")))
    cfg = PairwiseConfig(a=a, b=b, out_dir=str(tmp_path / "report"), bootstrap=200, batch_size=3)
    s = pairwise(cfg, model=model)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "report" / "verdicts.jsonl").read_text().splitlines())}
    assert [rows[k]["winner"] for k in ("p1", "p-biased", "p-even", "p-loss")] == ["a", "tie", "tie", "b"]
    assert [rows[k]["consistent"] for k in ("p1", "p-biased", "p-even", "p-loss")] == [True, False, True, True]
    o1, o2 = rows["p1"]["orders"]
    assert (o1["first"], o1["verdict"], o2["first"], o2["verdict"]) == ("a", "a", "b", "a")
    # order 2 showed b first: P(label A) = 0.2 belongs to b, P(label B) = 0.7 to a
    assert o2["probs"] == pytest.approx({"a": 0.7, "b": 0.2, "tie": 0.1})
    assert rows["p1"]["soft_score_a"] == pytest.approx(0.75) and rows["p1"]["method"] == "logprobs"
    assert rows["p1"]["len_a"] == len("strong one") and rows["p1"]["category"] == "x"
    assert (s["n"], s["wins_a"], s["wins_b"], s["ties"], s["unparseable"]) == (4, 1, 1, 2, 0)
    assert s["win_rate_a"] == pytest.approx(0.5) and s["position_bias_rate"] == pytest.approx(0.25)
    assert s["unmatched_a"] == 1 and s["unmatched_b"] == 0 and s["model_a"] == "model-a" and s["judge"] == "judge"
    assert s["categories"]["x"]["win_rate_a"] == pytest.approx(0.75) and s["categories"]["y"]["ties"] == 1
    assert json.loads((tmp_path / "report" / "summary.json").read_text()) == s
    assert (tmp_path / "report" / "chart.png").read_bytes()[:8] == PNG
    again = pairwise(cfg, model=model)  # resumed: nothing left to judge
    assert model.backend.calls == 0 and again["n"] == 4


def test_pairwise_from_text_retries_then_counts(tmp_path, tiny_tokenizer):
    prompts = PROMPTS[:1] + [("p-garbled", "strong", "weak", "x"), ("p-hopeless", "strong", "weak", "x")]
    a, b = _files(tmp_path, prompts)
    model = text_model(tiny_tokenizer, judge_text, name="judge")  # no scorer: auto picks text
    s = pairwise(PairwiseConfig(a=a, b=b, out_dir=str(tmp_path / "r"), bootstrap=100), model=model)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "r" / "verdicts.jsonl").read_text().splitlines())}
    assert rows["p1"]["winner"] == "a" and rows["p1"]["orders"][1]["raw"] == "B. Answer B is better [[B]]"
    assert rows["p-garbled"]["winner"] == "a" and [o["attempts"] for o in rows["p-garbled"]["orders"]] == [2, 2]
    assert rows["p-hopeless"]["winner"] is None and rows["p-hopeless"]["score_a"] is None
    assert s["n"] == 2 and s["unparseable"] == 1 and s["method"] == "text" and s["win_rate_a"] == 1.0


def test_pairwise_prompt_mismatch_is_an_error(tmp_path):
    a = _answers(tmp_path, "a", [{"id": "1", "prompt": "x", "completion": "y"}])
    b = _answers(tmp_path, "b", [{"id": "1", "prompt": "other", "completion": "y"}])
    with pytest.raises(FeedbackError, match=r"b.jsonl:line 1: id '1' has a different prompt"):
        pairwise(PairwiseConfig(a=a, b=b, out_dir=str(tmp_path / "r")))


def test_single_grades_from_text_and_from_label_probabilities(tmp_path, tiny_tokenizer):
    a = _answers(tmp_path, "m1", [{"id": "1", "prompt": "q", "completion": "strong"},
                                  {"id": "2", "prompt": "r", "completion": "weak", "category": "c"},
                                  {"id": "3", "prompt": "s", "completion": "hopeless"}])
    model = text_model(tiny_tokenizer, judge_text, name="judge",
                       scorer=ScriptedScorer(tiny_tokenizer, lambda u: [0.2, 0.8], labels=("1", "2")))
    # 1..10: "10" is two tokens for this tokenizer, so auto falls back to parsed text
    s = single(SingleConfig(answers=[a], out_dir=str(tmp_path / "text"), bootstrap=100), model=model)
    m = s["models"]["m1"]
    assert s["method"] == "text" and m["n"] == 2 and m["unparseable"] == 1 and m["mean"] == 5.0
    assert m["counts"]["7"] == 1 and m["counts"]["3"] == 1 and m["categories"]["c"]["mean"] == 3
    assert (tmp_path / "text" / "chart.png").read_bytes()[:8] == PNG
    # a 1..5 rubric: every grade is one token, so grades are expectations under the label probabilities
    doc = yaml.safe_load(DEFAULT_RUBRIC.read_text())
    doc["scale"] = [1, 5]
    rubric = tmp_path / "rubric5.yaml"
    rubric.write_text(yaml.safe_dump(doc))
    probs = [0.1, 0.2, 0.3, 0.25, 0.15]
    model = text_model(tiny_tokenizer, judge_text, name="judge",
                       scorer=ScriptedScorer(tiny_tokenizer, lambda u: probs, labels=("1", "2", "3", "4", "5")))
    s = single(SingleConfig(answers=[a], rubric=str(rubric), out_dir=str(tmp_path / "lp"), bootstrap=100), model=model)
    expected = sum((k + 1) * p for k, p in enumerate(probs))  # 3.15
    assert s["method"] == "logprobs" and s["models"]["m1"]["mean"] == pytest.approx(expected)
    assert model.backend.calls == 0  # no generation at all


def test_answer_writes_resumable_answers(tmp_path, tiny_tokenizer):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "q1", "category": "c"}\n{"prompt": "q2"}\n{"prompt": "q1"}\n')
    model = text_model(tiny_tokenizer, lambda t: f"answer to {t.user}", name="m")
    cfg = AnswerConfig(prompts=str(prompts), out=str(tmp_path / "a.jsonl"))
    s = answer(cfg, model=model)
    rows = [json.loads(x) for x in Path(cfg.out).read_text().splitlines()]
    assert s["answers"] == 2 and s["duplicate_prompts"] == 1
    assert [r["completion"] for r in rows] == ["answer to q1", "answer to q2"] and rows[0]["category"] == "c"
    assert rows[0]["sampling"]["greedy"] is True and rows[0]["model"] == "m"
    answer(cfg, model=model)
    assert model.backend.calls == 1
