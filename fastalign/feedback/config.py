"""Options of the feedback verbs: one dataclass each, with the trainer's machinery (YAML via ``--config``, flags
override it, ``--help`` shows every field, bad values name the field)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastalign.feedback.engine import SamplingParams

from fastalign.train.config_parsing import from_dict, load_yaml, option, validate

METHODS = ("auto", "logprobs", "text")


@dataclass
class ModelOptions:
    """Which model answers, and how prompts reach it."""

    model: str | None = option(None, "local checkpoint directory (openai: the served model's tokenizer); none: the "
                                     "embedded tiny model")
    generation_backend: str = option("hf", "hf (the checkpoint's own generate and forward), vllm (an in-process "
                                           "vLLM engine; pip install 'fastalign[vllm]'), openai (an "
                                           "OpenAI-compatible server at --base-url), or a name registered in "
                                           "fastalign.feedback.engine.BACKENDS")
    base_url: str | None = option(None, "openai: the server's API root, e.g. http://127.0.0.1:8000/v1")
    served_model: str | None = option(None, "openai: the model name the server serves; none: the first it lists")
    request_timeout: float = option(120.0, "openai: seconds per HTTP request before it is retried")
    request_retries: int = option(3, "openai: retries of a failed or timed-out request")
    top_logprobs: int = option(20, "openai, vllm: top next tokens asked for when reading verdicts from log-probs "
                                   "(a label outside them: that verdict from parsed text); a vLLM server allows "
                                   "20 unless started with --max-logprobs")
    vllm_kv_cache_gb: float | None = option(None, "vllm: KV cache size in GiB (what sizes it on a CPU)")
    vllm_enforce_eager: bool = option(False, "vllm: no CUDA graphs / torch.compile (faster start)")
    device: str = option("auto", "auto = cuda when available, else cpu")
    dtype: str = option("auto", "weights dtype; auto = bf16 on a GPU with bf16, else fp32",
                        choices=("auto", "float32", "bfloat16", "float16"))
    chat_template: str = option("auto", "render conversations with the tokenizer's chat template: auto = when it "
                                        "has one; off: plain 'User:' / 'Assistant:' blocks",
                                choices=("auto", "on", "off"))
    max_prompt_length: int = option(384, "max prompt tokens (longer prompts keep their end; counted)")
    batch_size: int = option(8, "rows per batch; every batch is written (and fsynced) before the next starts")
    generation_batch_size: int | None = option(None, "sequences per generate / scoring call; none: all")
    seed: int = option(0, "seed of every draw (responses, principles); a resumed run draws what a full run would")
    max_rows: int | None = option(None, "use at most this many input rows")

    def __post_init__(self):
        validate(self)
        cls = type(self).__name__
        for name in ("max_prompt_length", "generation_batch_size", "top_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{cls}: {name} must be >= 1, got {getattr(self, name)}")
        if self.generation_backend == "openai" and not self.base_url:
            raise ValueError(f"{cls}: --generation-backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if self.generation_backend != "openai" and (self.base_url or self.served_model):
            raise ValueError(f"{cls}: --base-url and --served-model are only used by --generation-backend openai "
                             f"(got {self.generation_backend!r})")
        if self.request_timeout <= 0 or self.request_retries < 0:
            raise ValueError(f"{cls}: request_timeout must be > 0 and request_retries >= 0")
        if self.vllm_kv_cache_gb is not None and self.vllm_kv_cache_gb <= 0:
            raise ValueError(f"{cls}: vllm_kv_cache_gb must be > 0, got {self.vllm_kv_cache_gb}")

    def load_options(self, *, policy: bool = False) -> dict:
        """Keyword arguments of ``engine.load_text_model`` (``policy``: for ``cai label``'s policy)."""
        options = {"base_url": self.base_url, "served_model": self.served_model,
                   "request_timeout": self.request_timeout, "request_retries": self.request_retries,
                   "top_logprobs": self.top_logprobs, "vllm_kv_cache_gb": self.vllm_kv_cache_gb,
                   "vllm_enforce_eager": self.vllm_enforce_eager, "seed": self.seed,
                   "max_model_len": self._max_model_len()}
        if policy:
            options.update(base_url=getattr(self, "policy_base_url", None) or self.base_url,
                           served_model=getattr(self, "policy_served_model", None))
        return dict(backend=self.generation_backend, device=self.device, dtype=self.dtype,
                    chat_template=self.chat_template, max_prompt_length=self.max_prompt_length,
                    batch_size=self.generation_batch_size, backend_options=options)

    def _max_model_len(self) -> int:
        return self.max_prompt_length + max(getattr(self, "max_new_tokens", 0),
                                            getattr(self, "verdict_max_new_tokens", 0), 1)


@dataclass
class SampledOptions(ModelOptions):
    """Plus how responses are sampled."""

    max_new_tokens: int = option(128, "max tokens of each generated text (initial response, critique, revision)")
    temperature: float = option(0.8, "sampling temperature")
    top_p: float = option(0.95, "nucleus sampling threshold")
    top_k: int = option(0, "top-k sampling (0: off)")
    greedy: bool = option(False, "greedy decoding (ignores temperature, top_p, top_k)")

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, greedy=self.greedy)

    def __post_init__(self):
        super().__post_init__()
        try:
            self.sampling()
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None


@dataclass
class ReviseConfig(SampledOptions):
    """Constitutional AI, supervised stage: response -> R x (critique, revision) -> an SFT file."""

    prompts: str | None = option(None, "prompts (.jsonl/.json, field 'prompt'); none: the shipped prompts")
    out: str = option("cai/sft.jsonl", "SFT output (prompt, completion, provenance); OUT.rejected.jsonl and "
                                       "OUT.summary.json are written next to it")
    constitution: str | None = option(None, "constitution YAML/JSON; none: the shipped default")
    principles: list[str] = option([], "use only these principle ids (comma-separated); empty: all")
    rounds: int = option(1, "critique-revision rounds per prompt, each with a freshly drawn principle")
    few_shot: int | None = option(None, "few-shot examples of the constitution to show; none: all")
    filters: list[str] = option(["empty", "truncated", "unchanged", "duplicate"],
                                "drop final revisions that are empty, truncated, unchanged from the initial "
                                "response, or duplicates of a kept one (each counted); 'none': keep all")

    def __post_init__(self):
        super().__post_init__()
        self.filters = [f for f in self.filters if f.strip() and f.lower() != "none"]
        bad = sorted(set(self.filters) - {"empty", "truncated", "unchanged", "duplicate"})
        if bad:
            raise ValueError(f"ReviseConfig: filters: unknown filter {bad[0]!r} (empty, truncated, unchanged, "
                             "duplicate, or none)")
        if self.rounds < 1:
            raise ValueError(f"ReviseConfig: rounds must be >= 1, got {self.rounds}")


@dataclass
class LabelConfig(SampledOptions):
    """RLAIF: sample responses from a policy, judge pairs against principles in both orders -> a DPO/RM file."""

    prompts: str | None = option(None, "prompts (.jsonl/.json, field 'prompt'); none: the shipped prompts")
    out: str = option("cai/preferences.jsonl", "preference output (prompt, chosen, rejected, label, label_parts)")
    constitution: str | None = option(None, "constitution YAML/JSON; none: the shipped default")
    policy: str | None = option(None, "checkpoint that samples the responses; none: the feedback model (--model). "
                                      "With --generation-backend openai: the policy's tokenizer directory, its "
                                      "server at --policy-base-url")
    policy_base_url: str | None = option(None, "openai: the server of the policy, when it is not the feedback "
                                               "model's; none: --model answers (or --base-url serves --policy)")
    policy_served_model: str | None = option(None, "openai: the model name --policy-base-url serves; none: its "
                                                   "first")
    principles: list[str] = option([], "draw only from these principle ids; empty: all")
    num_responses: int = option(2, "responses sampled per prompt (every pair of distinct ones is judged)")
    principles_per_pair: int = option(2, "principles each pair is judged by (the ensemble), drawn per pair")
    few_shot: int | None = option(None, "comparison few-shot examples to show; none: all")
    label_method: str = option("auto", "read verdicts from the choice tokens' log-probs, or parse generated text; "
                                       "auto: log-probs when the backend can score tokens", choices=METHODS)
    pairing: str = option("all", "with more than 2 responses: one row per judged pair (all), or only the "
                                 "best against the worst by mean win probability (extremes)",
                          choices=("all", "extremes"))
    inconsistent: str = option("mark", "pairs whose two orders prefer different responses: keep them with "
                                       "consistent=false (mark), or drop them (drop)", choices=("mark", "drop"))
    min_label: float = option(0.5, "drop pairs whose label p(chosen) is below this (0.5: keep all but ties)")
    verdict_max_new_tokens: int = option(16, "max tokens of a generated verdict (label_method text)")
    retry_temperature: float = option(1.0, "temperature of the one retry of an unparseable verdict")

    def __post_init__(self):
        super().__post_init__()
        if self.num_responses < 2 or self.principles_per_pair < 1:
            raise ValueError("LabelConfig: num_responses must be >= 2 and principles_per_pair >= 1")
        if self.generation_backend == "openai" and self.policy not in (None, self.model) \
                and self.policy_base_url is None:
            raise ValueError("LabelConfig: --policy with --generation-backend openai needs --policy-base-url (the "
                             "server at --base-url serves the feedback model, not the policy)")
        if self.generation_backend != "openai" and (self.policy_base_url or self.policy_served_model):
            raise ValueError("LabelConfig: --policy-base-url and --policy-served-model are only used by "
                             "--generation-backend openai")
        if not 0.5 <= self.min_label <= 1:
            raise ValueError(f"LabelConfig: min_label must lie in [0.5, 1], got {self.min_label}")
        _verdict_options(self, "verdict_max_new_tokens")


@dataclass
class AnswerConfig(SampledOptions):
    """Answers of one model to a prompt set, for the judge (greedy by default)."""

    prompts: str | None = option(None, "prompts (.jsonl/.json, field 'prompt', optional 'category'); none: the "
                                       "shipped held-out prompts (not the ones cai revise/label use)")
    out: str = option("judge/answers.jsonl", "answers output (id, prompt, completion, category, model)")
    greedy: bool = option(True, "greedy decoding (ignores temperature, top_p, top_k)")


@dataclass
class JudgeOptions(ModelOptions):
    """The judge model and the report."""

    rubric: str | None = option(None, "judge rubric YAML/JSON; none: the shipped default")
    out_dir: str = option("judge/report", "verdicts.jsonl, summary.json and chart.png go here")
    method: str = option("auto", "read verdicts from the label tokens' log-probs, or parse generated text; auto: "
                                 "log-probs when the backend can score tokens and the labels are single tokens",
                         choices=METHODS)
    max_new_tokens: int = option(32, "max tokens of a generated verdict (method text)")
    retry_temperature: float = option(1.0, "temperature of the one retry of an unparseable verdict")
    bootstrap: int = option(2000, "bootstrap resamples for the confidence intervals")
    confidence: float = option(0.95, "confidence level of the intervals")

    def __post_init__(self):
        super().__post_init__()
        if self.bootstrap < 10 or not 0 < self.confidence < 1:
            raise ValueError(f"{type(self).__name__}: bootstrap must be >= 10 and confidence in (0, 1)")
        _verdict_options(self, "max_new_tokens")


@dataclass
class PairwiseConfig(JudgeOptions):
    """LLM-as-judge, pairwise: answers A vs answers B on the same prompts, both orders, ties allowed."""

    a: str = option("", "answers of model A (.jsonl: id or prompt, completion, optional category, model)")
    b: str = option("", "answers of model B, same format; rows are matched by id")
    name_a: str | None = option(None, "name of model A in the report; none: its answers' 'model' field")
    name_b: str | None = option(None, "name of model B in the report; none: its answers' 'model' field")
    out_dir: str = option("judge/pairwise", "verdicts.jsonl, summary.json and chart.png go here")

    def __post_init__(self):
        super().__post_init__()
        if not self.a or not self.b:
            raise ValueError("PairwiseConfig: give both answer files, --a and --b")


@dataclass
class SingleConfig(JudgeOptions):
    """LLM-as-judge, single answer: a rubric grade for every answer of one or more models."""

    answers: list[str] = option([], "answer files to grade (comma-separated), one per model")
    out_dir: str = option("judge/single", "verdicts.jsonl, summary.json and chart.png go here")

    def __post_init__(self):
        super().__post_init__()
        if not self.answers:
            raise ValueError("SingleConfig: give at least one answers file, --answers")


def _verdict_options(cfg, tokens_field: str) -> None:
    if getattr(cfg, tokens_field) < 1:
        raise ValueError(f"{type(cfg).__name__}: {tokens_field} must be >= 1, got {getattr(cfg, tokens_field)}")
    if cfg.retry_temperature <= 0:
        raise ValueError(f"{type(cfg).__name__}: retry_temperature must be > 0, got {cfg.retry_temperature}")


def from_namespace(cls, ns):
    """``cls`` from a parsed namespace: defaults < ``--config`` YAML < flags, checked once as a whole (so a field
    required by a check may come from either)."""
    names = {f.name for f in dataclasses.fields(cls)}
    data = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    flags = {k: v for k, v in vars(ns).items() if k in names}
    return from_dict(cls, {**data, **flags}, where=str(ns.config) if getattr(ns, "config", None) else "options")
