"""Deterministic fake backends for bookkeeping tests: real tokenizer, scripted texts and verdicts.

``ScriptedBackend(tokenizer, respond)`` decodes each prompt, finds the last user turn and asks
``respond(last_user_text, occurrence, sampling)`` for the completion (``occurrence`` counts identical prompts in
one call, so N samples of one prompt can differ). A reply ``(text, True)`` is returned as truncated (no EOS).
``ScriptedScorer(tokenizer, probs, labels)`` gives label k the probability ``0.5 * probs(last_user_text)[k]`` as
the next token (half the mass on the labels, as a model would spread it; other tokens: tiny).
"""
import math
import os
import signal

import torch

from fastalign.feedback.engine import Completions, TextModel


def last_user(tokenizer, ids) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    part = text.rsplit("<|user|>\n", 1)[-1]
    return part.split("</s>", 1)[0]


class ScriptedBackend:
    def __init__(self, tokenizer, respond, kill_on_call=None):
        self.tokenizer, self.respond, self.calls, self.kill_on_call = tokenizer, respond, 0, kill_on_call
        self.seen = []  # (last user text, sampling) of every prompt

    def sync_weights(self, model):
        pass

    def generate(self, prompt_ids, sampling):
        self.calls += 1
        if self.kill_on_call is not None and self.calls == self.kill_on_call:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, mid-file, at a known point
        out, counts = Completions([], []), {}
        for ids in prompt_ids:
            user = last_user(self.tokenizer, ids)
            k = counts.get(user, 0)
            counts[user] = k + 1
            self.seen.append((user, sampling))
            reply = self.respond(user, k, sampling)
            text, truncated = reply if isinstance(reply, tuple) else (reply, False)
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.token_ids.append(tokens + ([] if truncated else [self.tokenizer.eos_token_id]))
            out.truncated.append(truncated)
        return out


class ScriptedScorer:
    def __init__(self, tokenizer, probs, labels=("A", "B")):
        self.tokenizer, self.probs = tokenizer, probs
        self.ids = [tokenizer.convert_tokens_to_ids(label) for label in labels]

    def next_token_logprobs(self, prompt_ids, token_ids):
        rows = []
        for ids in prompt_ids:
            probs = dict(zip(self.ids, self.probs(last_user(self.tokenizer, ids))))
            rows.append([math.log(0.5 * probs[t]) if t in probs else math.log(1e-6) for t in token_ids])
        return torch.tensor(rows, dtype=torch.float64)


def text_model(tokenizer, respond, scorer=None, name="fake", kill_on_call=None, **kw):
    return TextModel(ScriptedBackend(tokenizer, respond, kill_on_call), tokenizer, name=name, scorer=scorer, **kw)
