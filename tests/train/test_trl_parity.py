"""The same data files through TRL 1.16's own dataset preparation and through fastalign's: the same token ids and the
same loss masks, row by row, for every dataset type TRL's SFT, DPO, reward and GRPO trainers take, standard
(strings) and conversational (messages).

TRL's preparation runs unbound (``SFTTrainer._prepare_dataset``, ``DPOTrainer._prepare_dataset`` +
``DataCollatorForPreference``, ``RewardTrainer._prepare_dataset``, ``GRPOTrainer._tokenize_prompts``) with a
stand-in ``self`` holding the attributes it reads, on the embedded tiny tokenizer and two variants of it: one that
adds BOS to plain text (as Llama's do) and one whose generation prompt is not a prefix of the rendered reply
(as Gemma's thought block), which exercises the common-prefix rule.
"""
import copy
import json
import types

import pytest

from fastalign.train import data as D
from fastalign.train import batching as B

trl_sft = pytest.importorskip("trl.trainer.sft_trainer")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

MAX_LENGTH = 40  # some rows below are longer: truncation and drops are compared too


def _msg(role, content):
    return {"role": role, "content": content}


LONG = "What is the sum of all the numbers from one to ten, and why? " * 2
SFT_FILES = {
    "prompt_completion": [
        {"prompt": "What is 2 + 3?", "completion": " 5"},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": "Answer: ", "completion": "42</s>"},  # already ends with EOS: not appended twice
        {"prompt": "Q:", "completion": "A long answer that will not fit in the budget at all, " * 3},
        {"prompt": LONG * 2, "completion": "dropped: the prompt alone fills max_length"},
    ],
    "conversational_prompt_completion": [
        {"prompt": [_msg("user", "What is 2 + 3?")], "completion": [_msg("assistant", "5")]},
        {"prompt": [_msg("system", "Be brief."), _msg("user", "Hi"), _msg("assistant", "Hello."),
                    _msg("user", "Sky colour?")], "completion": [_msg("assistant", "Blue.")]},
        {"prompt": [_msg("user", LONG)], "completion": [_msg("assistant", "Fifty-five.")]},
    ],
    "text": [{"text": "Plain text to model."}, {"text": "Already ended.</s>"}, {"text": LONG}],
    "messages": [
        {"messages": [_msg("user", "What is 2 + 3?"), _msg("assistant", "5")]},
        {"messages": [_msg("system", "Be brief."), _msg("user", LONG), _msg("assistant", "55")]},
    ],
}
PREFERENCE_FILES = {
    "explicit": [
        {"prompt": "What is 2 + 3?", "chosen": " 5", "rejected": " 6"},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green, and it is a very long answer indeed."},
        {"prompt": LONG * 2, "chosen": " x", "rejected": " y"},
    ],
    "implicit": [
        {"chosen": "What is 2 + 3? 5", "rejected": "What is 2 + 3? 6"},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Name: Ada", "rejected": "Name: Alan"},
    ],
    "conversational_explicit": [
        {"prompt": [_msg("user", "What is 2 + 3?")], "chosen": [_msg("assistant", "5")],
         "rejected": [_msg("assistant", "6")]},
        {"prompt": [_msg("system", "Be brief."), _msg("user", "Sky?")], "chosen": [_msg("assistant", "Blue.")],
         "rejected": [_msg("assistant", LONG)]},
    ],
    "conversational_implicit": [
        {"chosen": [_msg("user", "What is 2 + 3?"), _msg("assistant", "5")],
         "rejected": [_msg("user", "What is 2 + 3?"), _msg("assistant", "6")]},
        {"chosen": [_msg("user", "Hi"), _msg("assistant", "Hello."), _msg("user", "Sky?"), _msg("assistant", "Blue.")],
         "rejected": [_msg("user", "Hi"), _msg("assistant", "Hello."), _msg("user", "Sky?"), _msg("assistant", "Red.")]},
    ],
}
RL_FILES = {
    "prompts": [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "The sky is", "answer": "blue"}],
    "conversational_prompts": [{"prompt": [_msg("user", "What is 2 + 3?")], "answer": "5"},
                               {"prompt": [_msg("system", "Be brief."), _msg("user", "Sky?")], "answer": "blue"}],
}

# a template whose generation prompt ends in an empty thought block the rendered reply drops (Gemma-4-like)
THOUGHT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n<think></think>{% endif %}"
)


@pytest.fixture(params=["tiny", "tiny+bos", "tiny+thought-template"])
def tokenizer(request, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    if request.param == "tiny+bos":
        from tokenizers.processors import TemplateProcessing

        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token,
                                                                                          tok.bos_token_id)])
        assert tok("x")["input_ids"][0] == tok.bos_token_id
    elif request.param == "tiny+thought-template":
        tok.chat_template = THOUGHT_TEMPLATE
    return tok


def _file(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trl_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def _args(**kw):
    return types.SimpleNamespace(dataset_num_proc=None, max_length=MAX_LENGTH, truncation_mode="keep_start", **kw)


@pytest.mark.parametrize("name", list(SFT_FILES))
def test_sft_tokens_and_masks_match_trl(tmp_path, tokenizer, name):
    rows = SFT_FILES[name]
    stub = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None,
                                 completion_only_loss="prompt" in rows[0])  # TRL's default choice
    args = _args(dataset_text_field="text", assistant_only_loss=False, shuffle_dataset=False)
    want = trl_sft.SFTTrainer._prepare_dataset(stub, _trl_dataset(rows), tokenizer, args, packing=False,
                                               formatting_func=None, dataset_name="train")
    got = D.tokenize_sft(D.load_rows(_file(tmp_path, name, rows), "sft", tokenizer=tokenizer), tokenizer,
                         max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH)
    assert len(got) == len(want) > 0
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["input_ids"] == w["input_ids"], f"{name} row {i}"
        assert g["labels"] == w["labels"], f"{name} row {i}"


@pytest.mark.parametrize("name", list(PREFERENCE_FILES))
def test_dpo_tokens_and_masks_match_trl(tmp_path, tokenizer, name):
    rows = PREFERENCE_FILES[name]
    stub = types.SimpleNamespace(_tokenizer=tokenizer)
    prepared = trl_dpo.DPOTrainer._prepare_dataset(stub, _trl_dataset(rows), tokenizer, _args(), "train")
    collate = trl_dpo.DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=MAX_LENGTH)
    got = D.tokenize_preference(D.load_rows(_file(tmp_path, name, rows), "preference", tokenizer=tokenizer),
                                tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH)
    assert len(got) == len(prepared) > 0
    for i, (g, w) in enumerate(zip(got, prepared)):
        want = collate([{k: w[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        ours = B.collate_preference([g], tokenizer.pad_token_id)
        for row in range(2):  # chosen, then rejected
            n = int(want["attention_mask"][row].sum())
            assert int(ours["attention_mask"][row].sum()) == n, f"{name} pair {i} row {row}"
            assert ours["input_ids"][row, :n].tolist() == want["input_ids"][row, :n].tolist(), f"{name} pair {i}"
            trained = (ours["labels"][row, :n] != D.IGNORE).long().tolist()
            assert trained == want["completion_mask"][row, :n].tolist(), f"{name} pair {i} row {row}"


@pytest.mark.parametrize("name", list(PREFERENCE_FILES))
def test_reward_model_sequences_match_trl(tmp_path, tokenizer, name):
    rows = PREFERENCE_FILES[name]
    args = _args()
    args.max_length = 4096  # TRL's RewardTrainer drops long pairs where fastalign truncates: compare untruncated
    want = trl_reward.RewardTrainer._prepare_dataset(types.SimpleNamespace(), _trl_dataset(rows), tokenizer, args,
                                                     "train")
    got = D.tokenize_preference(D.load_rows(_file(tmp_path, name, rows), "preference", tokenizer=tokenizer),
                                tokenizer, max_length=4096, max_prompt_length=4096)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["prompt_ids"] + g["chosen_ids"] == w["chosen_ids"]
        assert g["prompt_ids"] + g["rejected_ids"] == w["rejected_ids"]


@pytest.mark.parametrize("name", list(RL_FILES))
def test_rl_prompt_ids_match_trl(tmp_path, tokenizer, name):
    rows = RL_FILES[name]
    stub = types.SimpleNamespace(processing_class=tokenizer, _is_vlm=False, environment_factories=None, tools=None,
                                 chat_template=None, chat_template_kwargs={})
    want, _, _ = trl_grpo.GRPOTrainer._tokenize_prompts(stub, [r["prompt"] for r in rows])
    got = D.tokenize_prompts(D.load_rows(_file(tmp_path, name, rows), "rl", tokenizer=tokenizer), tokenizer,
                             max_prompt_length=4096)
    assert [g["prompt_ids"] for g in got] == [list(w) for w in want]
