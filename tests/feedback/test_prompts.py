"""Prompt rendering: exact strings for a fixed seed (chat template and plain), seeded draws, verdict parsing."""
import pytest

from fastalign.feedback.constitution import load_constitution, load_rubric
from fastalign.feedback.engine import TextModel
from fastalign.feedback.prompts import (comparison_messages, critique_messages, derive_seed, pairwise_messages,
                                        parse_choice, parse_score, revision_messages, sample_principles,
                                        single_messages)

USEFUL_CRITIQUE = ("Look at the reply above as the person who asked. Which parts of the request does it leave "
                   "unanswered, answer only vaguely, or bury under material they did not ask for?")
USEFUL_REVISION = ("Write a new reply that answers every part of the request directly and drops what does not help "
                   "the person who asked.")


def test_seeded_draws_are_pinned():
    c = load_constitution()
    # the values are pinned: a change here changes every resumed run's draws, so it must be deliberate
    assert derive_seed(0, "initial", "a", "b") == 5809341063647940041
    assert [p.id for p in sample_principles(c, 1, 0, "p1", 0)] == ["useful"]
    assert [p.id for p in sample_principles(c, 1, 0, "p1", 1)] == ["expert-help"]
    assert [p.id for p in sample_principles(c, 3, 7, "p1", 0, 1)] == ["truthful", "expert-help", "useful"]
    assert derive_seed(0, "initial", "a", "b") != derive_seed(0, "initial", "ab")  # parts are separated
    many = [sample_principles(c, 1, 0, f"row{i}", 0)[0].id for i in range(400)]
    assert set(many) == {p.id for p in c.principles}  # every principle gets drawn
    with pytest.raises(ValueError):
        sample_principles(c, 9, 0)


def test_revision_prompt_exact_string_chat_template(tiny_tokenizer):
    c = load_constitution()
    model = TextModel(None, tiny_tokenizer, name="t")
    principle = sample_principles(c, 1, 0, "p1", 0)[0]  # "useful", pinned above
    text = model.render(revision_messages(c, "Hi?", "Hello.", principle, "Too short.", few_shot=0))
    assert text == ("<s><|user|>\nHi?</s>\n<|assistant|>\nHello.</s>\n<|user|>\n" + USEFUL_CRITIQUE
                    + "</s>\n<|assistant|>\nToo short.</s>\n<|user|>\n" + USEFUL_REVISION + "</s>\n<|assistant|>\n")


def test_critique_prompt_exact_string_plain_with_few_shot(tiny_tokenizer):
    c = load_constitution()
    model = TextModel(None, tiny_tokenizer, name="t", chat_template="off")
    principle = c.principle("useful")
    ex = c.few_shot[0]
    truthful = c.principle("truthful")
    text = model.render(critique_messages(c, "Hi?", "Hello.", principle))
    assert text == (f"User: {ex['prompt']}\n\nAssistant: {ex['response']}\n\nUser: {truthful.critique}\n\n"
                    f"Assistant: {ex['critique']}\n\nUser: {truthful.revision}\n\nAssistant: {ex['revision']}\n\n"
                    f"User: Hi?\n\nAssistant: Hello.\n\nUser: {USEFUL_CRITIQUE}\n\nAssistant:")


def test_comparison_and_judge_prompts_exact(tiny_tokenizer):
    c = load_constitution()
    model = TextModel(None, tiny_tokenizer, name="t")
    text = model.render(comparison_messages(c, [{"role": "user", "content": "Hi?"}], "Hello.", "Go away.",
                                            c.principle("useful"), few_shot=0))
    assert text == ("<s><|user|>\nBelow is a request followed by two candidate replies.\n\nRequest:\nuser: Hi?\n\n"
                    "Reply A:\nHello.\n\nReply B:\nGo away.\n\nWhich reply does more to give the person what they "
                    "actually asked for? Give only the letter of the better reply, A or B.</s>\n<|assistant|>\n")
    r = load_rubric()
    pair = pairwise_messages(r, "Q", "a1", "b1")[0]["content"]
    assert "Answer A:\na1\n\nAnswer B:\nb1\n\n" in pair and pair.endswith("e.g. [[A]].")
    assert "- accuracy: states only what is correct, and flags uncertainty\n" in pair
    single = single_messages(r, "Q", "a1")[0]["content"]
    assert single.startswith("You are grading an answer to a request on a scale from 1 (useless or harmful) to 10")
    assert "Answer:\na1\n\n" in single and single.endswith("e.g. [[1]].")


@pytest.mark.parametrize("text,expected", [
    ("A", "A"), ("B.", "B"), (" B \n because", "B"), ("A) it is kinder", "A"), ("[[B]]", "B"),
    ("I think [[A]], clearly [[A]]", "A"), ("C", "C"),
    ("A good reply would be ...", None),  # an article is not a verdict
    ("[[A]] or maybe [[B]]", None), ("B. On reflection [[A]]", None), ("A, as in [[A]]", "A"), ("AB", None),
    ("", None), ("Both are fine", None), ("Atlas", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text, ["A", "B", "C"]) == expected


@pytest.mark.parametrize("text,expected", [
    ("7", 7), ("7/10", 7), ("10. Clear.", 10), ("[[3]]", 3), ("ok [[4]] so [[4]]", 4),
    ("7 apples", None), ("11", None), ("0", None), ("[[3]] [[5]]", None), ("seven", None),
])
def test_parse_score(text, expected):
    assert parse_score(text, 1, 10) == expected
