"""Deterministic fake backends for bookkeeping tests: real tokenizer, scripted texts and verdicts.

``ScriptedBackend(tokenizer, respond)`` decodes each prompt into its turns and asks ``respond(Turn)`` for the
completion (``Turn.occurrence`` counts identical prompts in one call, so N samples of one prompt can differ). A
reply ``(text, True)`` is returned as truncated (no EOS).
``ScriptedScorer(tokenizer, probs, labels)`` gives label k the probability ``0.5 * probs(last_user_text)[k]`` as
the next token (half the mass on the labels, as a model would spread it; other tokens: tiny).
"""
import math
import os
import re
import signal
from dataclasses import dataclass

import torch

from fastalign.feedback.engine import Completions, TextModel


@dataclass
class Turn:
    turns: list  # (role, content) of the rendered conversation (tiny chat template)
    occurrence: int
    sampling: object

    @property
    def user(self) -> str:
        return self.turns[-1][1]


def parse_turns(tokenizer, ids) -> list:
    """The (role, content) turns of a chat-templated prompt; a plain-text prompt (a string row prompt, which the
    trainers' ``auto`` rule leaves untemplated) is one user turn."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    turns = re.findall(r"<\|(user|assistant)\|>\n(.*?)</s>", text, flags=re.S)
    return turns or [("user", tokenizer.decode(ids, skip_special_tokens=True))]


def last_user(tokenizer, ids) -> str:
    return parse_turns(tokenizer, ids)[-1][1]


class ScriptedBackend:
    def __init__(self, tokenizer, respond, kill_on_call=None, crash_on_call=None):
        self.tokenizer, self.respond, self.calls = tokenizer, respond, 0
        self.kill_on_call, self.crash_on_call = kill_on_call, crash_on_call
        self.seen = []  # the Turn of every prompt

    def sync_weights(self, model):
        pass

    def generate(self, prompt_ids, sampling):
        self.calls += 1
        if self.kill_on_call is not None and self.calls == self.kill_on_call:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, mid-file, at a known point
        if self.crash_on_call is not None and self.calls == self.crash_on_call:
            raise RuntimeError("scripted crash")
        out, counts = Completions([], []), {}
        for ids in prompt_ids:
            turns = parse_turns(self.tokenizer, ids)
            key = tuple(turns)
            k = counts.get(key, 0)
            counts[key] = k + 1
            turn = Turn(turns, k, sampling)
            self.seen.append(turn)
            reply = self.respond(turn)
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


def text_model(tokenizer, respond, scorer=None, name="fake", kill_on_call=None, crash_on_call=None, **kw):
    backend = ScriptedBackend(tokenizer, respond, kill_on_call, crash_on_call)
    kw.setdefault("max_prompt_length", 1 << 16)  # a script has no context limit: it reads whole prompts
    return TextModel(backend, tokenizer, name=name, scorer=scorer, **kw)


def revise_responder(constitution):
    """The scripted model of the revise tests: the prompt's words pick what its final revision looks like."""
    critiques = {p.critique for p in constitution.principles}

    def respond(turn):
        prompt = turn.turns[0][1]
        if len(turn.turns) == 1:
            return f"draft of {prompt}"
        response = turn.turns[1][1]
        if turn.user in critiques:
            return f"critique of {response}"
        if "empty" in prompt:
            return ""
        if "trunc" in prompt:
            return f"long {response}", True
        if "same" in prompt:
            return response.upper()  # unchanged up to case
        if "dup" in prompt:
            return "same final"
        return f"better {response}"

    return respond
