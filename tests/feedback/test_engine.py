"""TextModel on the real HF backend with the tiny model: choice-token probabilities equal a hand computation from
the model's own logits; generation is seeded without touching the caller's RNG; label checks."""
import importlib.util

import pytest
import torch

from fastalign.feedback.engine import SamplingParams, load_text_model
from fastalign.feedback.io import FeedbackError
from fastalign.train import models


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_text_model(tiny_model_dir, device="cpu", dtype="float32", batch_size=3)


CONVERSATIONS = [
    [{"role": "user", "content": "Which reply is better? Answer A or B."}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "an answer of a few words"},
     {"role": "user", "content": "Is it good? A for yes, B for no."}],
    [{"role": "user", "content": "Short."}],
    [{"role": "user", "content": "A much longer question about weather, climate and the many words between them."}],
]


def test_choice_probs_match_hand_computation_from_logits(tiny, tiny_model_dir):
    labels = ["A", "B", "C"]
    got = tiny.choice_probs(CONVERSATIONS, labels)  # batched (3 per forward), right-padded
    model = models.load_model(tiny_model_dir, dtype="float32")
    tok = tiny.tokenizer
    ids_abc = [tok.convert_tokens_to_ids(x) for x in labels]
    for row, conv in enumerate(CONVERSATIONS):
        ids = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()  # (V,) the prompt alone, the HF forward
        # by hand: the softmax over the choice tokens' logits only (float64), and their share of all the mass
        chosen = logits[ids_abc]
        expected = torch.exp(chosen - torch.logsumexp(chosen, 0))
        mass = torch.exp(torch.logsumexp(chosen, 0) - torch.logsumexp(logits, 0))
        torch.testing.assert_close(got.probs[row], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.mass[row], mass, rtol=1e-5, atol=0)
    assert got.probs.dtype == torch.float64 and not torch.allclose(got.probs[0], got.probs[1])
    torch.testing.assert_close(got.probs.sum(1), torch.ones(4, dtype=torch.float64))


def test_choice_labels_must_be_single_tokens(tiny):
    with pytest.raises(FeedbackError, match=r"choice label ' A' is not a single token"):
        tiny.choice_probs(CONVERSATIONS[:1], [" A", "B"])
    with pytest.raises(FeedbackError, match=r"choice label '10' is not a single token"):
        tiny.choice_probs(CONVERSATIONS[:1], ["1", "10"])


def test_generate_is_seeded_and_leaves_caller_rng_alone(tiny):
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    one = tiny.generate(CONVERSATIONS, sampling, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    two = tiny.generate(CONVERSATIONS, sampling, seed=5)
    other = tiny.generate(CONVERSATIONS, sampling, seed=6)
    assert [g.text for g in one] == [g.text for g in two]
    assert [g.text for g in one] != [g.text for g in other]
    assert all(isinstance(g.truncated, bool) for g in one)


def test_long_prompts_keep_their_end(tiny_model_dir):
    short = load_text_model(tiny_model_dir, device="cpu", dtype="float32", max_prompt_length=12)
    conv = [{"role": "user", "content": "word " * 40}]
    ids = short.encode(conv)
    full = short.tokenizer(short.render(conv), add_special_tokens=False)["input_ids"]
    assert ids == full[-12:] and short.truncated_prompts == 1


def test_missing_model_and_unknown_backend(tmp_path):
    with pytest.raises(FeedbackError, match="is not a local directory"):
        load_text_model(tmp_path / "nope")
    with pytest.raises(FeedbackError, match=r"unknown --generation-backend 'mlx'; registered: \['hf', 'openai', "
                                            r"'vllm'\]"):
        load_text_model(tmp_path, backend="mlx")
    with pytest.raises(FeedbackError, match=r"--generation-backend openai needs --base-url"):
        load_text_model(None, backend="openai")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the error where vLLM is absent")
def test_vllm_backend_without_vllm_says_how_to_install(tiny_model_dir):
    with pytest.raises(ImportError, match=r"--generation-backend vllm needs vLLM: pip install 'fastalign\[vllm\]'"):
        load_text_model(tiny_model_dir, backend="vllm")


def test_row_prompts_are_encoded_as_the_trainers_encode_them(tiny_model_dir):
    from fastalign.train import data

    messages = [{"role": "user", "content": "Name a colour."}]
    for mode in ("auto", "on", "off"):
        model = load_text_model(tiny_model_dir, device="cpu", dtype="float32", chat_template=mode)
        tok = model.tokenizer
        for prompt in ("Name a colour.", messages):
            if mode == "off" and isinstance(prompt, list):
                with pytest.raises(data.DataError, match=r"^p.jsonl: the row with id 'x' is conversational .*"
                                                         r"chat_template='off'"):
                    model.encode_row_prompt(prompt, where="p.jsonl: the row with id 'x'")
                continue
            # what fastalign train's prompt-only rows get (data.tokenize_prompts), under the same mode
            (row,) = data.tokenize_prompts([{"prompt": prompt}], tok, max_prompt_length=384, chat_template=mode)
            assert model.encode_row_prompt(prompt) == row["prompt_ids"]
        templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        plain = tok.decode(model.encode_row_prompt("Name a colour."), skip_special_tokens=False)
        # auto (TRL's convention): a string prompt is plain text; on: wrapped as a user turn
        assert (plain.endswith(templated) if mode == "on" else "<|user|>" not in plain)
