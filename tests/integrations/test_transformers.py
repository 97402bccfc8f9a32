"""fastalign.patch / fastalign.integrations.transformers: the patched forward's loss against the unpatched model's
(the same call, float64 truth, the three-way rule) across model families and their logit transforms, the loss
keyword arguments, PEFT, generation, refusals; and a plain ``transformers.Trainer`` SFT run, patched and not."""
import copy

import pytest
import torch

import fastalign
from fastalign.integrations import transformers as integration
from helpers.accuracy import assert_close_3way, assert_close_3way_norm

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)


def _family(name):
    """A tiny random model of one family; the ones whose forward transforms the logits say how, in their config."""
    t = transformers
    build = {
        "llama-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL, tie_word_embeddings=True)),
        "llama-untied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL, tie_word_embeddings=False)),
        "gemma2-softcap": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL, head_dim=16,
                                                                      final_logit_softcapping=3.0)),
        "cohere-logit-scale": lambda: t.CohereForCausalLM(t.CohereConfig(**SMALL, logit_scale=0.3)),
        "granite-logits-scaling": lambda: t.GraniteForCausalLM(t.GraniteConfig(**SMALL, logits_scaling=4.0)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=211, n_embd=32, n_layer=1, n_head=2,
                                                       n_positions=64, bos_token_id=0, eos_token_id=1)),
    }[name]
    torch.manual_seed(11)
    model = build()
    with torch.no_grad():  # a realistic logit scale: random init gives a near-uniform softmax
        model.get_output_embeddings().weight.mul_(40)
    return model.eval()  # no dropout: the two forwards must see the same network


def _batch(seed=0, vocab=211):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompts
    labels[2, 12:] = -100  # padding
    return ids, torch.ones_like(ids), labels


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _three(model, backend="auto"):
    """(float64 truth, fp32 unpatched, fp32 patched) copies of one model."""
    return copy.deepcopy(model).double(), copy.deepcopy(model), fastalign.patch(copy.deepcopy(model), backend=backend)


def _check(truth_model, same_model, mine_model, **kw):
    truth, t_grads = _loss_and_grads(truth_model, **kw)
    same, s_grads = _loss_and_grads(same_model, **kw)
    mine, m_grads = _loss_and_grads(mine_model, **kw)
    assert mine.logits is None and same.logits is not None
    assert_close_3way(mine.loss.detach(), same.loss.detach(), truth.loss.detach(), torch.float32, name="loss")
    assert m_grads.keys() == t_grads.keys()
    for name in t_grads:
        assert_close_3way_norm(m_grads[name], s_grads[name], t_grads[name], torch.float32, name=name)
    return mine


@pytest.mark.parametrize("family", ["llama-tied", "llama-untied", "gemma2-softcap", "cohere-logit-scale",
                                    "granite-logits-scaling", "gpt2"])
def test_patched_loss_is_the_models_own(family):
    ids, mask, labels = _batch()
    _check(*_three(_family(family)), input_ids=ids, attention_mask=mask, labels=labels)


def test_triton_backend(device):
    ids, mask, labels = _batch(1)
    _check(*_three(_family("gemma2-softcap"), backend="triton"), input_ids=ids, attention_mask=mask, labels=labels)


def test_loss_keyword_arguments_as_transformers_honours_them():
    truth, same, mine = _three(_family("llama-untied"))
    ids, mask, labels = _batch(2)
    # num_items_in_batch: a sum over this micro-batch divided by the whole accumulated batch's token count
    _check(truth, same, mine, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(71))
    _check(truth, same, mine, input_ids=ids, labels=labels, num_items_in_batch=71)
    # pre-shifted labels (context parallelism), and another ignore_index
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    _check(truth, same, mine, input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift)
    odd = labels.masked_fill(labels == -100, -1)
    _check(truth, same, mine, input_ids=ids, labels=odd, ignore_index=-1)
    # labels passed positionally, and a tuple instead of a ModelOutput
    args = (ids, mask, None, None, None, labels)
    a, b = same(*args), mine(*args)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    loss, *_ = mine(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, a.loss, rtol=1e-5, atol=1e-6)


def test_all_ignored_is_what_transformers_returns():
    _, same, mine = _three(_family("llama-tied"))
    ids, _, labels = _batch(3)
    labels[:] = -100
    assert torch.isnan(same(input_ids=ids, labels=labels).loss) and torch.isnan(mine(input_ids=ids, labels=labels).loss)
    zero = mine(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
    zero.backward()
    assert zero.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in mine.parameters() if p.grad is not None)


def test_without_labels_the_model_is_unchanged():
    model = _family("llama-untied")
    patched = fastalign.patch(copy.deepcopy(model))
    ids, mask, _ = _batch(4)
    torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids[:, :5], **kw), model.generate(ids[:, :5], **kw))


def test_patch_in_place_twice_and_unpatch():
    model = _family("llama-tied")
    assert fastalign.patch(model) is model and integration.is_patched(model)
    patched_forward = model.forward
    assert fastalign.patch(model, backend="torch") is model and model.forward == patched_forward
    ids, _, labels = _batch(5)
    assert model(input_ids=ids, labels=labels).logits is None
    assert integration.unpatch(model) is model and not integration.is_patched(model)
    assert model(input_ids=ids, labels=labels).logits is not None
    # the signature generate() and Trainer inspect is the model's own (Trainer passes num_items_in_batch to **kwargs)
    import inspect

    fastalign.patch(model)
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))


def test_autocast_runs_the_head_in_the_autocast_dtype():
    model = _family("llama-untied")
    patched = fastalign.patch(copy.deepcopy(model))
    ids, mask, labels = _batch(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = patched(input_ids=ids, labels=labels).loss
        hidden = patched.model(input_ids=ids).last_hidden_state
        same = model(input_ids=ids, labels=labels).loss
    shift = labels[:, 1:]
    logp = fastalign.linear_logprobs(hidden[:, :-1].bfloat16(), model.lm_head.weight.bfloat16(), shift).logprobs
    # the patched head scores the valid positions only: sum them in that order (a sum over (B, T) with zeros at the
    # ignored positions can round differently)
    valid = shift != -100
    torch.testing.assert_close(mine, -logp[valid].sum() / valid.sum(), rtol=0, atol=0)
    torch.testing.assert_close(mine, same, rtol=2e-2, atol=2e-2)  # the model's own head ran in bf16 too


# ---------------------------------------------------------------------------------------------------- PEFT

def _peft(model, **lora):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))


@pytest.mark.parametrize("lora", [dict(target_modules=["q_proj", "v_proj"]),
                                  dict(target_modules=["q_proj"], modules_to_save=["lm_head"])],
                         ids=["lora", "lora+trained-head"])
def test_peft_model(lora):
    torch.manual_seed(3)
    base = _family("llama-untied")
    truth, same, mine = (_peft(copy.deepcopy(base), **lora) for _ in range(3))
    mine.load_state_dict(same.state_dict())
    truth.load_state_dict(same.state_dict())
    truth = truth.double()
    assert fastalign.patch(mine) is mine and integration.is_patched(mine)
    ids, mask, labels = _batch(7)
    _check(truth, same, mine, input_ids=ids, attention_mask=mask, labels=labels)
    with same.disable_adapter(), mine.disable_adapter():  # the reference model of LoRA DPO
        a, b = same(input_ids=ids, labels=labels).loss, mine(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_lora_on_the_head_is_refused():
    model = _peft(_family("llama-untied"), target_modules=["q_proj", "lm_head"])
    with pytest.raises(TypeError, match="LoRA on the LM head"):
        fastalign.patch(model)
    # patched first, wrapped after: refused at the call, never scored without the adapter
    model = _peft(fastalign.patch(_family("llama-untied")), target_modules=["q_proj", "lm_head"])
    ids, _, labels = _batch(8)
    with pytest.raises(TypeError, match="LoRA on the LM head"):
        model(input_ids=ids, labels=labels)


# ------------------------------------------------------------------------------------------------ refusals

def test_unsupported_models_are_clear_errors():
    t = transformers
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastalign.patch(torch.nn.Linear(3, 4))
    classifier = t.LlamaForSequenceClassification(t.LlamaConfig(**SMALL, num_labels=3))
    with pytest.raises(TypeError, match="not a causal language model"):
        fastalign.patch(classifier)
    custom = _family("llama-tied")
    custom.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(TypeError, match="ForCausalLMLoss"):
        fastalign.patch(custom)
    with pytest.raises(ValueError, match="backend"):
        fastalign.patch(_family("llama-tied"), backend="cudnn")
    model = fastalign.patch(_family("llama-tied"))
    ids, _, labels = _batch(9)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        model(input_ids=ids, labels=labels, output_router_logits=True)


# --------------------------------------------------------------------------------------- transformers.Trainer

def _hf_sft(model_dir, tokenizer, out_dir, *, dtype, patched):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts = ["the cat sat on the mat", "one two three four five", "a a a a a a a", "hello there my friend",
             "red green blue", "b b b b b b", "up down left right", "x y z x y z", "the end"]
    ds = Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if patched:
        model = fastalign.patch(model)
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=3,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the patched forward
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    return steps, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_hf_trainer_sft_patched_matches_unpatched(tiny_dir, tiny_tokenizer, tmp_path):
    """Gradient accumulation over unequal micro-batches: the loss is right only if num_items_in_batch is honoured."""
    truth, same, mine = (_hf_sft(tiny_dir, tiny_tokenizer, tmp_path / name, dtype=dtype, patched=on)
                         for name, dtype, on in (("truth", torch.float64, False), ("hf", torch.float32, False),
                                                 ("fastalign", torch.float32, True)))
    assert len(mine[0]) == len(same[0]) == len(truth[0]) == 3
    for t, s, m in zip(truth[0], same[0], mine[0]):
        for key in ("loss", "grad_norm"):
            one = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
            assert_close_3way(one(m[key]), one(s[key]), one(t[key]), torch.float32, name=key,
                              atol=1e-5 * max(1.0, abs(t[key])))
        assert m["learning_rate"] == s["learning_rate"] and m["epoch"] == s["epoch"]
    assert mine[0][0]["loss"] != mine[0][-1]["loss"]
    for name, value in truth[1].items():
        assert_close_3way_norm(mine[1][name], same[1][name], value, torch.float32, name=name)
