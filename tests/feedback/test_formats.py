"""Constitutions, rubrics and rows: the shipped files validate; bad ones fail with the file, line and field."""
import json
import re

import pytest
import yaml

from fastalign.feedback.constitution import DEFAULT_CONSTITUTION, load_constitution, load_rubric
from fastalign.feedback.io import FeedbackError, load_prompts
from fastalign.feedback.judge import load_answers
from fastalign.train import data


def test_shipped_constitution_and_rubric():
    c = load_constitution()
    assert c.name == "fastalign-default" and c.choices == ("A", "B")
    assert len(c.principles) == 8 and len({p.id for p in c.principles}) == 8
    for p in c.principles:
        assert p.critique.strip() and p.revision.strip() and p.comparison.endswith("?")
    assert c.few_shot and c.few_shot[0]["principle"] in {p.id for p in c.principles}
    assert [p.id for p in c.subset(["clear", "useful"]).principles] == ["clear", "useful"]
    r = load_rubric()
    assert r.scale == (1, 10) and r.tie == "C" and [cid for cid, _ in r.criteria][:2] == ["helpfulness", "accuracy"]


def _write(tmp_path, mutate, name="c.yaml"):
    doc = yaml.safe_load(DEFAULT_CONSTITUTION.read_text())
    mutate(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
    return path


def _drop(key):
    return lambda d: d.pop(key)


BAD_CONSTITUTIONS = [
    (lambda d: d["principles"][1].pop("critique"), "principles[1].critique", "must be a non-empty string"),
    (lambda d: d["principles"][2].update(revision=""), "principles[2].revision", "non-empty string"),
    (lambda d: d["principles"][3].update(comparison=7), "principles[3].comparison", "got int"),
    (lambda d: d["principles"][1].update(id=d["principles"][0]["id"]), "principles[1].id", "duplicate"),
    (lambda d: d["principles"][0].update(id="Not OK"), "principles[0].id", "must match"),
    (lambda d: d["principles"][0].update(weight=2), "principles[0].weight", "unknown field"),
    (lambda d: d.update(principles=[]), "principles", "non-empty list"),
    (lambda d: d.update(principles=["just text"]), "principles[0]", "must be a mapping"),
    (_drop("comparison_template"), "comparison_template", "non-empty string"),
    (lambda d: d.update(comparison_template="{prompt} {response_a} {response_b}"), "comparison_template",
     "missing placeholder {question}"),
    (lambda d: d.update(comparison_template=d["comparison_template"] + "{answer}"), "comparison_template",
     "unknown placeholder {answer}"),
    (lambda d: d.update(comparison_template=d["comparison_template"] + "{"), "comparison_template",
     "bad template"),
    (lambda d: d.update(choices=["A"]), "choices", "list of 2 distinct"),
    (lambda d: d.update(choices=["A", "A"]), "choices", "list of 2 distinct"),
    (lambda d: d.update(choices=[" A", "B"]), "choices", "without surrounding spaces"),
    (lambda d: d["few_shot"][0].update(principle="kind"), "few_shot[0].principle", "unknown principle 'kind'"),
    (lambda d: d["few_shot"][0].pop("revision"), "few_shot[0].revision", "non-empty string"),
    (lambda d: d["comparison_few_shot"][0].update(answer="C"), "comparison_few_shot[0].answer",
     "one of the choices"),
    (lambda d: d.update(extra=1), "extra", "unknown field"),
]


@pytest.mark.parametrize("mutate,field,message", BAD_CONSTITUTIONS)
def test_bad_constitution_names_file_and_field(tmp_path, mutate, field, message):
    path = _write(tmp_path, mutate)
    with pytest.raises(FeedbackError) as err:
        load_constitution(path)
    text = str(err.value)
    assert text.startswith(f"{path}: field '{field}'"), text
    assert message in text


def test_constitution_as_json_and_broken_files(tmp_path):
    path = _write(tmp_path, lambda d: None, name="c.json")
    assert load_constitution(path).principles == load_constitution().principles
    (tmp_path / "broken.yaml").write_text("principles: [unclosed\n")
    with pytest.raises(FeedbackError, match=r"broken.yaml: not valid YAML"):
        load_constitution(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(FeedbackError, match=r"list.yaml: a constitution must be a mapping"):
        load_constitution(tmp_path / "list.yaml")
    with pytest.raises(FeedbackError, match=r"nope.yaml: no such constitution file"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(FeedbackError, match=r"no principle 'kind'"):
        load_constitution().subset(["kind"])


@pytest.mark.parametrize("key,value,field,message", [
    ("tie", "A", "tie", "distinct from the choices"),
    ("scale", [5, 1], "scale", "min < max"),
    ("scale", [1, 2.5], "scale", "integers"),
    ("single_template", "{prompt}", "single_template", "missing placeholder {response}"),
    ("criteria", [{"id": "x"}], "criteria[0].description", "non-empty string"),
])
def test_bad_rubric(tmp_path, key, value, field, message):
    from fastalign.feedback.constitution import DEFAULT_RUBRIC

    doc = yaml.safe_load(DEFAULT_RUBRIC.read_text())
    doc[key] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(FeedbackError) as err:
        load_rubric(path)
    assert str(err.value).startswith(f"{path}: field '{field}'") and message in str(err.value)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": 5}', "field 'prompt' must be a string or a list of {role, content} messages, got int"),
    ('{"question": "hi"}', "missing field 'prompt'"),
    ('{"prompt": "   "}', "field 'prompt' is empty"),
    ('{"prompt": "x", "category": 3}', "field 'category' must be a string, got int"),
    ('{"prompt": "x", "id": [1]}', "field 'id' must be a string or an integer"),
    ('{"prompt": "x", "id": "p1"}', "field 'id' 'p1' is used by an earlier row"),
    ('{"prompt": "x"', "invalid JSON"),
    ('["prompt"]', "expected a JSON object, got list"),
])
def test_bad_prompt_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "first", "id": "p1"}\n\n' + line + "\n")
    with pytest.raises(FeedbackError) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}:line 3: ") and message in str(err.value), str(err.value)


def test_prompts_deduplicated_and_ids_stable(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "Why is the sky blue?"}, {"prompt": "why  is the SKY blue? "},
            {"prompt": [{"role": "user", "content": "Hi"}], "category": "chat"}, {"prompt": "Other", "id": 7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, duplicates = load_prompts(path)
    assert duplicates == 1 and [r["prompt"] for r in out] == [rows[0]["prompt"], rows[2]["prompt"], "Other"]
    assert re.fullmatch(r"[0-9a-f]{16}", out[0]["id"]) and out[2]["id"] == "7" and out[1]["category"] == "chat"
    assert load_prompts(path)[0] == out and len(load_prompts(path, max_rows=2)[0]) == 2


def test_answers_rows(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"prompt": "q", "completion": "a", "model": "m"}\n{"prompt": "r"}\n')
    with pytest.raises(FeedbackError, match=re.escape(f"{path}:line 2: missing field 'completion'")):
        load_answers(path)


@pytest.mark.parametrize("value,ok", [(0.8, True), (1, True), (0, True), (None, True), (1.5, False), (-0.1, False),
                                      (True, False), ("0.9", False), (float("nan"), False)])
def test_preference_label_field(tmp_path, value, ok):
    path = tmp_path / "prefs.jsonl"
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "label": value}
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + json.dumps(row) + "\n")
    if ok:
        rows = data.load_rows(path, "preference")
        assert rows.column_names[-1] == "label"
        return
    with pytest.raises(data.DataError) as err:
        data.load_rows(path, "preference")
    assert str(err.value).startswith(f"{path}:line 2: field 'label' must be a number in [0, 1]")
