"""Rollouts: masks and layout, left-padding invariance, recomputed log-probs equal the sampler's."""
import pytest
import torch

from fastalign.train import generation, models, rollout


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    torch.manual_seed(0)
    return models.load_model(tiny_model_dir, dtype="float32")


def _backend(policy, tok, **kw):
    return generation.HFGenerationBackend(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)


def test_build_rollout_masks_by_hand():
    # prompt lengths 3 and 1; completions: 2 tokens ending with EOS (=2), and 3 tokens truncated
    comps = generation.Completions(token_ids=[[7, 2], [5, 6, 9]], truncated=[False, True])
    b = rollout.build_rollout([[4, 4, 4], [8]], comps, pad_token_id=0)
    assert b.input_ids.tolist() == [[4, 4, 4, 7, 2], [8, 5, 6, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.response_mask.tolist() == [[False, False, False, True, True], [False, True, True, True, False]]
    assert b.labels.tolist() == [[-100, -100, -100, 7, 2], [-100, 5, 6, 9, -100]]
    assert b.prompt_lengths.tolist() == [3, 1] and b.completion_lengths.tolist() == [2, 3]
    assert b.truncated.tolist() == [False, True]
    sub = b.select(torch.tensor([1]))  # trimmed to its own length
    assert sub.input_ids.tolist() == [[8, 5, 6, 9]] and sub.response_mask.sum() == 3


def test_backend_is_a_generation_backend(policy, tiny_tokenizer):
    assert isinstance(_backend(policy, tiny_tokenizer), generation.GenerationBackend)
    with pytest.raises(ValueError, match="temperature"):
        generation.SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generation.SamplingParams(top_p=0.0)


def test_left_padding_does_not_change_greedy_completions(policy, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = [tok("12+7=")["input_ids"], tok("The answer is 3+45=")["input_ids"], tok("9")["input_ids"]]
    assert len({len(p) for p in prompts}) == 3
    greedy = generation.SamplingParams(max_new_tokens=6, greedy=True)
    batched = _backend(policy, tok).generate(prompts, greedy)
    for p, ids, trunc in zip(prompts, batched.token_ids, batched.truncated):
        solo = _backend(policy, tok).generate([p], greedy)
        assert solo.token_ids[0] == ids and solo.truncated[0] == trunc
        assert trunc == (tok.eos_token_id not in ids) and 1 <= len(ids) <= 6


def test_completions_stop_at_eos(policy, tiny_tokenizer):
    tok = tiny_tokenizer
    torch.manual_seed(0)
    # make EOS likely so that some rows stop early and others run to the limit
    base = models.unwrap(policy)
    with torch.no_grad():
        saved = base.lm_head.weight[tok.eos_token_id].clone()
        base.lm_head.weight[tok.eos_token_id] += 0.5 * base.lm_head.weight.std() * torch.randn_like(saved)
    try:
        comps = _backend(policy, tok, batch_size=5).generate(
            [tok("1+1=")["input_ids"]] * 16, generation.SamplingParams(max_new_tokens=4, temperature=1.5))
    finally:
        with torch.no_grad():
            base.lm_head.weight[tok.eos_token_id] = saved
    assert len(comps.token_ids) == 16
    for ids, trunc in zip(comps.token_ids, comps.truncated):
        if trunc:
            assert len(ids) == 4 and tok.eos_token_id not in ids
        else:
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]


def test_recomputed_logprobs_match_the_sampler(policy, tiny_tokenizer):
    """Old log-probs come from our own forward on the right-padded layout; they must equal what generate
    (left-padded, KV cache) sampled from, at the sampling temperature, and fused == unfused."""
    tok = tiny_tokenizer
    prompts = [tok("12+7=")["input_ids"], tok("What is 30+4? ")["input_ids"]]
    base = models.unwrap(policy)
    width = max(map(len, prompts))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(1)
    out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=0.7,
                        top_k=0, top_p=1.0, output_logits=True, return_dict_in_generate=True,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    gen = out.sequences[:, width:]
    sampler_logp = (torch.stack(out.logits, 1).float() / 0.7).log_softmax(-1).gather(-1, gen[..., None])[..., 0]
    comps = generation.Completions([], [])
    for row in gen.tolist():
        cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        comps.token_ids.append(row[:cut])
        comps.truncated.append(tok.eos_token_id not in row)
    batch = rollout.build_rollout(prompts, comps, pad_token_id=tok.pad_token_id)
    fused = rollout.score_logprobs(policy, batch, temperature=0.7, fused=True)
    plain = rollout.score_logprobs(policy, batch, temperature=0.7, fused=False, micro_batch_size=1)
    assert fused.shape == batch.input_ids.shape
    assert (fused[~batch.response_mask] == 0).all()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for i in range(2):
        n = int(batch.completion_lengths[i])
        torch.testing.assert_close(fused[i][batch.response_mask[i]], sampler_logp[i, :n], atol=1e-4, rtol=1e-4)


def test_decode_strips_eos(policy, tiny_tokenizer):
    tok = tiny_tokenizer
    comps = generation.Completions([tok("19")["input_ids"] + [tok.eos_token_id]], [False])
    assert generation.decode_completions(tok, comps) == ["19"]


class _EchoBackend:
    """Returns fixed completions: 'row i' gets i + 1 copies of token 30, the last row runs out of tokens."""

    def __init__(self, eos):
        self.eos = eos

    def generate(self, prompt_ids, sampling):
        n = len(prompt_ids)
        ids = [[30] * (i + 1) + ([self.eos] if i < n - 1 else []) for i in range(n)]
        return generation.Completions(ids, [i == n - 1 for i in range(n)])

    def sync_weights(self, model):
        pass


def test_collect_repeats_prompts_and_passes_fields(tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [{"prompt": "1+1=", "prompt_ids": [5, 6], "prompt_text": "1+1=", "answer": "2", "level": 1},
                {"prompt": "2+2=", "prompt_ids": [7], "prompt_text": "2+2=", "answer": "4", "level": 3}]
    seen = {}

    def reward_fn(prompts, completions, fields):
        seen.update(prompts=prompts, fields=fields)
        return torch.arange(len(completions), dtype=torch.float32), {"spy": torch.zeros(len(completions))}

    exp = rollout.collect(_EchoBackend(tok.eos_token_id), tok, examples, group_size=3,
                          sampling=generation.SamplingParams(max_new_tokens=6), reward_fn=reward_fn)
    # rows g*G .. g*G+G-1 belong to prompt g; every non-prompt field is repeated per completion
    assert seen["prompts"] == ["1+1="] * 3 + ["2+2="] * 3
    assert seen["fields"] == {"answer": ["2"] * 3 + ["4"] * 3, "level": [1] * 3 + [3] * 3,
                              "truncated": [False] * 5 + [True]}
    b = exp.batch
    assert b.prompt_lengths.tolist() == [2, 2, 2, 1, 1, 1]
    assert b.completion_lengths.tolist() == [2, 3, 4, 5, 6, 6]
    assert b.response_mask.sum(1).tolist() == [2, 3, 4, 5, 6, 6]
    assert b.input_ids[5, :7].tolist() == [7] + [30] * 6 and b.input_ids[0, :4].tolist() == [5, 6, 30, tok.eos_token_id]
    assert exp.rewards.tolist() == [0, 1, 2, 3, 4, 5] and set(exp.reward_parts) == {"spy"}
