"""`cai label`: order swapping and ensemble aggregation on hand cases; the stage on scripted backends, with
log-prob and text verdicts, position bias, ties, identical responses, retries, pairing, resume."""
import json
import re
from pathlib import Path

import pytest

from fakes import ScriptedScorer, text_model
from fastalign.feedback.config import LabelConfig
from fastalign.feedback.io import row_id
from fastalign.feedback.label import Vote, _parts, aggregate, label

# --------------------------------------------------------------------------------------------- hand cases


def test_aggregate_order_average_then_ensemble():
    # principle a: i first -> P(i) 0.8, i second -> P(i) 0.6; principle b: 0.4 and 0.7
    # p_a = 0.7, p_b = 0.55, p = 0.625; per order over the ensemble: 0.6 and 0.65, both prefer i: consistent
    out = aggregate([Vote("a", 0.8, 0.6), Vote("b", 0.4, 0.7)])
    assert out["p"] == pytest.approx(0.625, abs=1e-15) and out["consistent"] is True


def test_aggregate_position_bias_is_averaged_out_and_flagged():
    # the judge prefers whatever is shown first: P(i) 0.9 when i is first, 0.2 when second
    out = aggregate([Vote("a", 0.9, 0.2)])
    assert out["p"] == pytest.approx(0.55, abs=1e-15) and out["consistent"] is False
    # a true preference of 0.6 plus a first-position bonus of 0.05 in each order: averaging recovers 0.6
    out = aggregate([Vote("a", 0.6 + 0.05, 0.6 - 0.05)])
    assert out["p"] == pytest.approx(0.6, abs=1e-15) and out["consistent"] is True


def test_aggregate_skips_incomplete_votes():
    out = aggregate([Vote("a", 0.8, None), Vote("b", 0.3, 0.4)])  # a lost one order: left out, not guessed
    assert out["p"] == pytest.approx(0.35, abs=1e-15) and out["consistent"] is True
    assert aggregate([Vote("a", None, 0.4), Vote("b", None, None)]) is None


def test_parts_are_probabilities_of_the_chosen_response():
    # j chosen: in the backward order j was shown first, P(j) = 1 - 0.4; in the forward order, 1 - 0.3
    (part,) = _parts([Vote("b", 0.3, 0.4)], i_is_chosen=False)
    assert part["p_chosen_first"] == pytest.approx(0.6) and part["p_chosen_second"] == pytest.approx(0.7)
    assert part["p"] == pytest.approx(0.65) and part["consistent"] is True
    (part,) = _parts([Vote("b", 0.3, None)], i_is_chosen=True)
    assert part["p"] is None


# ------------------------------------------------------------------------------------- scripted stage

QUALITY = {"good": 1.0, "ok": 0.5, "bad": 0.0}


def _replies(user: str):
    m = re.search(r"Request:\n(.*?)\n\nReply A:\n(.*?)\n\nReply B:\n(.*?)\n\n", user, flags=re.S)
    return m.group(1), m.group(2), m.group(3)


def p_first(user: str) -> float:
    """P(reply A is better): 0.1 per unit of quality difference, plus a first-position bias."""
    prompt, a, b = _replies(user)
    bias = 0.3 if "biased" in prompt else 0.05
    return 0.5 + 0.1 * (QUALITY[a.split()[0]] - QUALITY[b.split()[0]]) + bias


def policy(turn):
    """Responses: the prompt's words say which quality each sample has."""
    prompt = turn.turns[0][1]
    if len(turn.turns) == 1 and not prompt.startswith("Below is"):
        if "same" in prompt:
            return "good same answer"
        order = {"q-reversed": ["bad", "good"], "q-tie": ["good", "good"], "q-three": ["good", "bad", "ok"]}
        quality = next((v for k, v in order.items() if k in prompt), ["good", "bad"])[turn.occurrence]
        return f"{quality} answer {turn.occurrence} to {prompt}"
    prompt, a, b = _replies(turn.user)  # a text verdict (turns[0] is the few-shot demonstration)
    if "hopeless" in prompt:
        return "no idea"
    if "garbled" in prompt and turn.sampling.greedy:
        return "hmm, let me think"  # the first (greedy) attempt fails; the retry parses
    return "A" if QUALITY[a.split()[0]] >= QUALITY[b.split()[0]] else "[[B]]"


def _run(tmp_path, tiny_tokenizer, prompts, name="prefs", method="logprobs", **kw):
    path = tmp_path / f"{name}.prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = LabelConfig(prompts=str(path), out=str(tmp_path / name / "prefs.jsonl"), batch_size=2, seed=1,
                      label_method=method, **kw)
    scorer = ScriptedScorer(tiny_tokenizer, lambda u: [p_first(u), 1 - p_first(u)])
    model = text_model(tiny_tokenizer, policy, scorer=scorer)
    summary = label(cfg, feedback=model, policy=model)
    rows = [json.loads(x) for x in Path(cfg.out).read_text().splitlines()] if Path(cfg.out).exists() else []
    rejected = Path(cfg.out).with_name("prefs.rejected.jsonl")
    dropped = [json.loads(x) for x in rejected.read_text().splitlines()] if rejected.exists() else []
    return summary, rows, dropped, model


def test_label_from_logprobs(tmp_path, tiny_tokenizer):
    prompts = ["q1 kettles", "q-reversed pans", "q-biased cups", "q-same forks", "q-tie plates"]
    summary, rows, dropped, _ = _run(tmp_path, tiny_tokenizer, prompts)
    by = {r["prompt"]: r for r in rows}
    assert list(by) == ["q1 kettles", "q-reversed pans", "q-biased cups"]
    for r in rows:  # the true preference 0.6, whatever the position bias
        assert r["label"] == pytest.approx(0.6, abs=1e-9) and r["chosen"].startswith("good")
        assert r["rejected"].startswith("bad") and len(r["label_parts"]) == 2
        assert all(p["p"] == pytest.approx(0.6, abs=1e-9) for p in r["label_parts"])
        assert r["label_method"] == "logprobs" and r["policy"] == "fake" and r["seed"] == 1
    first = by["q1 kettles"]
    assert first["id"] == f"{row_id('q1 kettles')}:0-1" and first["chosen_index"] == 0 and first["consistent"]
    assert first["label_parts"][0]["p_chosen_first"] == pytest.approx(0.65)  # 0.6 + 0.05 shown first
    assert first["label_parts"][0]["p_chosen_second"] == pytest.approx(0.55)
    assert by["q-reversed pans"]["chosen_index"] == 1 and by["q-reversed pans"]["rejected_index"] == 0
    assert by["q-biased cups"]["consistent"] is False  # 0.9 vs 0.3: each order prefers the first shown
    assert {d["reason"] for d in dropped} == {"identical_responses", "tie"}
    assert summary["kept_pairs"] == 3 and summary["kept_inconsistent"] == 1
    assert summary["rejected"] == {"identical_responses": 1, "unparseable": 0, "tie": 1, "inconsistent": 0,
                                   "low_label": 0}
    assert summary["label_mean"] == pytest.approx(0.6) and summary["failed_votes"] == 0


def test_inconsistent_drop_and_min_label(tmp_path, tiny_tokenizer):
    summary, rows, dropped, _ = _run(tmp_path, tiny_tokenizer, ["q1 kettles", "q-biased cups"], name="drop",
                                     inconsistent="drop")
    assert [r["prompt"] for r in rows] == ["q1 kettles"] and [d["reason"] for d in dropped] == ["inconsistent"]
    summary, rows, dropped, _ = _run(tmp_path, tiny_tokenizer, ["q1 kettles"], name="min", min_label=0.7)
    assert rows == [] and [d["reason"] for d in dropped] == ["low_label"]


def test_label_from_text_with_retries(tmp_path, tiny_tokenizer):
    summary, rows, dropped, model = _run(tmp_path, tiny_tokenizer, ["q1 kettles", "q-garbled mugs",
                                                                    "q-hopeless jars"], name="text", method="text")
    assert [r["prompt"] for r in rows] == ["q1 kettles", "q-garbled mugs"]
    assert all(r["label"] == 1.0 and r["consistent"] and r["label_method"] == "text" for r in rows)
    assert [d["reason"] for d in dropped] == ["unparseable"]
    assert summary["failed_votes"] == 2  # the hopeless pair's two principles, after one retry each
    retries = [t for t in model.backend.seen if t.user.startswith("Below is") and not t.sampling.greedy]
    assert len(retries) == 2 * 2 + 2 * 2  # garbled and hopeless: 2 principles x 2 orders, retried once each
    assert all(t.sampling.temperature == 1.0 for t in retries)
    demo, answer = retries[0].turns[0], retries[0].turns[1]  # the constitution's comparison few-shot comes first
    assert "What is the capital of Australia?" in demo[1] and answer == ("assistant", "A")


def test_more_responses_all_pairs_or_extremes(tmp_path, tiny_tokenizer):
    _, rows, _, _ = _run(tmp_path, tiny_tokenizer, ["q-three bowls"], name="all", num_responses=3)
    pid = row_id("q-three bowls")
    assert [r["id"] for r in rows] == [f"{pid}:0-1", f"{pid}:0-2", f"{pid}:1-2"]
    assert [round(r["label"], 9) for r in rows] == [0.6, 0.55, 0.55]  # good>bad, good>ok, ok>bad
    _, rows, _, _ = _run(tmp_path, tiny_tokenizer, ["q-three bowls"], name="ext", num_responses=3,
                         pairing="extremes")
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == [(0, 1)]


def test_rerun_skips_labelled_prompts(tmp_path, tiny_tokenizer):
    prompts = ["q1 kettles", "q-same forks", "q-biased cups"]
    first, rows, dropped, _ = _run(tmp_path, tiny_tokenizer, prompts, name="again")
    second, rows2, dropped2, model = _run(tmp_path, tiny_tokenizer, prompts, name="again")
    assert rows2 == rows and dropped2 == dropped and model.backend.calls == 0
    assert second["done_before"] == 3 and second["kept_pairs"] == first["kept_pairs"]


def test_too_many_principles_per_pair(tmp_path, tiny_tokenizer):
    from fastalign.feedback.io import FeedbackError

    with pytest.raises(FeedbackError, match="principles_per_pair 3 is more than the 2 principles"):
        _run(tmp_path, tiny_tokenizer, ["q1"], principles=["clear", "useful"], principles_per_pair=3)
