"""Model loading, hidden states / LM head, and fused vs unfused token log-probs on the tiny checkpoint."""
import pytest
import torch

from fastalign.train import models as M
from fastalign.train.tiny import build_tiny_tokenizer


def _batch(tokenizer):
    texts = ["What is 3 + 14? The answer is 17.", "Hello"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing' is not a local directory \(it does not exist\)$"):  # an absolute path is no hub id
        M.load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="hub id"):
        M.load_model("Qwen/Qwen2.5-0.5B")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"is not a local directory \(it is a file"):
        M.load_model(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.load_model(tmp_path)


def test_tiny_tokenizer_offline_and_deterministic(tiny_tokenizer):
    again = build_tiny_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(tiny_tokenizer, name) is not None
    ids = tiny_tokenizer("12 + 345 = 357", add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == "12 + 345 = 357"
    digits = [t for t in tiny_tokenizer.convert_ids_to_tokens(ids) if t.strip("Ġ").isdigit()]
    assert all(len(t.strip("Ġ")) == 1 for t in digits)  # one digit per token
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    prompt = tiny_tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full = tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert full.startswith(prompt)


def test_tied_head_and_hidden(tiny_model_dir, tiny_tokenizer):
    model = M.load_model(tiny_model_dir, dtype="float32")
    weight, bias = M.lm_head_weight(model)
    assert weight is model.get_input_embeddings().weight and bias is None
    ids, mask, _ = _batch(tiny_tokenizer)
    hidden = M.backbone_hidden(model, ids, mask)
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    torch.testing.assert_close(hidden @ weight.T, model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_fused_equals_unfused_and_model_logits(tiny_model_dir, tiny_tokenizer, lora_r):
    model = M.load_model(tiny_model_dir, dtype="float32", lora_r=lora_r)
    ids, mask, labels = _batch(tiny_tokenizer)
    fused = M.token_logprobs(model, ids, mask, labels, return_entropy=True)
    plain = M.token_logprobs(model, ids, mask, labels, fused=False, return_entropy=True)
    assert fused.logprobs.shape == ids.shape and (fused.logprobs[:, 0] == 0).all()
    assert (fused.logprobs[mask == 0] == 0).all()
    torch.testing.assert_close(fused.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.entropy, plain.entropy, atol=1e-5, rtol=1e-5)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    truth = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100)
    torch.testing.assert_close(fused.logprobs[:, 1:], truth, atol=1e-5, rtol=1e-5)
    # gradients agree too
    g_f = torch.autograd.grad(fused.logprobs.sum(), M.trainable_parameters(model))
    g_p = torch.autograd.grad(plain.logprobs.sum(), M.trainable_parameters(model))
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if lora_r:
        assert all("lora" in n for n, p in model.named_parameters() if p.requires_grad)


def test_bf16_gradient_checkpointing_and_score_head(tiny_model_dir, tiny_tokenizer):
    model = M.load_model(tiny_model_dir, dtype="bfloat16", gradient_checkpointing=True)
    model.train()
    ids, mask, labels = _batch(tiny_tokenizer)
    out = M.token_logprobs(model, ids, mask, labels)
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.logprobs).all()
    out.logprobs.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    scorer = M.load_model(tiny_model_dir, kind="score", dtype="float32")
    scores = M.sequence_scores(scorer, ids, mask)
    values = M.token_values(scorer, ids, mask)
    assert scores.shape == (2,)
    torch.testing.assert_close(scores[1], values[1, mask[1].sum() - 1])
    # matches transformers' own pooling for right padding
    torch.testing.assert_close(scores, scorer(input_ids=ids, attention_mask=mask).logits[:, 0].float())
