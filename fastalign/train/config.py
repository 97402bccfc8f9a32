"""Training configs: one dataclass per algorithm on a shared base (GRPO and PPO add theirs, on :class:`RLConfig`,
in their own modules). Loading from YAML and flags is ``fastalign.train.config_parsing``::

    cfg = parse_config(DPOConfig, ["--config", "c.yaml", "--beta", "0.05"])

An algorithm adds its own config in its own module: ``@dataclass class GRPOConfig(RLConfig): ...`` with
:func:`option` fields; everything (YAML, flags, help, validation) works on it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fastalign.ops.preference import check_dpo_options
from fastalign.reference.preference import DISCOPOP_TAU, LOSS_TYPES as DPO_LOSS_TYPES, SMOOTHED as DPO_SMOOTHED
from fastalign.reference.preference import needs_reference
from fastalign.reference.rl import AGG_MODES
from fastalign.train.config_parsing import option, require, validate

DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention projections of Llama-likes
RUN_DIR_HELP = "run directory: run.json, config.yaml, metrics.jsonl, checkpoints/, final/"
LEARNING_RATE_HELP = "peak learning rate (AdamW)"


@dataclass
class TrainConfig:
    """Fields every algorithm shares."""

    # model
    model: str | None = option(None, "local checkpoint directory (transformers, safetensors); none: the "
                                     "embedded tiny Llama built on the fly")
    dtype: str = option("auto", "weights dtype; auto = bf16 on a GPU with bf16, else fp32",
                        choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = option("auto", "attention kernel; auto = flash_attention_2 if installed on a GPU, "
                                              "else sdpa", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    lora_r: int = option(0, "LoRA rank (peft); 0 trains all weights")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: list[str] = option(list(DEFAULT_LORA_TARGET_MODULES), "modules LoRA adapts")
    fused: bool = option(True, "compute log-probs/losses from hidden states with fastalign's fused ops (no "
                               "[B, T, V] logits); --no-fused runs the plain-logits reference path")
    backend: str = option("auto", "fastalign op backend", choices=("auto", "torch", "triton", "cuda", "cpp"))
    # data
    train_file: str | None = option(None, "local .jsonl/.json/.parquet training data; none: the shipped tiny "
                                          "data set for this algorithm")
    max_samples: int | None = option(None, "use at most this many training rows")
    max_length: int = option(512, "max tokens per sequence (prompt + completion); longer rows are truncated "
                                  "(counted in the log)")
    max_prompt_length: int = option(256, "max prompt tokens (prompts are truncated from the left)")
    chat_template: str = option("auto", "the tokenizer's chat template: auto = for conversational (message-list) "
                                        "rows only, strings stay plain text (TRL's convention); on = every row, "
                                        "strings as user/assistant messages; off = never",
                                choices=("auto", "on", "off"))
    # optimisation
    seed: int = option(0, "seed for init, data order and sampling")
    max_steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "sequences (or pairs, or prompts) per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(1e-5, LEARNING_RATE_HELP)
    lr_scheduler: str = option("cosine", "learning-rate schedule after warmup",
                               choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(0, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this; none: no clipping")
    max_bad_steps: int = option(10, "abort after this many steps skipped for a NaN/inf loss or gradient")
    # runtime, checkpoints, logging
    device: str = option("auto", "auto = cuda when available (the local rank's GPU under torchrun), else cpu")
    parallelism: str = option("auto", "under torchrun: auto = FSDP2 on GPUs, DDP on CPU; or force fsdp / ddp",
                              choices=("auto", "fsdp", "ddp"))
    output_dir: str = option("runs/run", RUN_DIR_HELP)
    save_steps: int = option(0, "save a checkpoint every N steps (0: only at the end)")
    save_total_limit: int = option(2, "keep at most this many step checkpoints (0: keep all)")
    resume: bool = option(False, "continue the run in output_dir from its newest verified checkpoint, bit-for-bit")
    overwrite: bool = option(False, "output_dir holds a run: move it aside (to a timestamped sibling) and start anew")
    progress: bool = option(True, "show a progress bar")
    # monitors: a warning is logged when a value crosses its threshold (none: never)
    warn_kl: float | None = option(10.0, "warn when KL to the reference (nats per sequence) exceeds this")
    warn_entropy: float | None = option(0.05, "warn when mean token entropy falls below this (collapse)")
    warn_clip_frac: float | None = option(0.3, "warn when the PPO/GRPO clip fraction exceeds this")
    warn_reward_length_corr: float | None = option(0.8, "warn when |corr(reward, response length)| exceeds this")

    def __post_init__(self):
        validate(self)
        if self.resume and self.overwrite:
            raise ValueError(f"{type(self).__name__}: resume and overwrite exclude each other (resume continues the "
                             "run in output_dir, overwrite moves it aside)")
        require(self, "learning_rate", 0, low_open=True)
        require(self, "max_grad_norm", 0, low_open=True)
        require(self, "lora_alpha", 0, low_open=True)
        for name in ("weight_decay", "warmup_steps", "save_steps", "save_total_limit", "max_bad_steps", "lora_r"):
            require(self, name, 0)
        for name in ("max_samples", "max_prompt_length"):
            require(self, name, 1)
        for name in ("adam_beta1", "adam_beta2", "lora_dropout"):
            require(self, name, 0, 1, high_open=True)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: token-level NLL on completions (or whole conversations)."""

    output_dir: str = option("runs/sft", RUN_DIR_HELP)
    learning_rate: float = option(2e-5, LEARNING_RATE_HELP)
    packing: bool = option(False, "pack several examples into each max_length row (attention stays causal "
                                  "across the packed examples, as TRL's default packing does)")
    completion_only_loss: bool = option(True, "train only on completion/assistant tokens; off: on every token")


@dataclass
class RMConfig(TrainConfig):
    """Reward model: Bradley-Terry on a scalar head over chosen/rejected pairs."""

    output_dir: str = option("runs/rm", RUN_DIR_HELP)
    margin_column: str | None = option(None, "data column with a per-pair margin for the loss")
    center_rewards_coef: float = option(0.0, "add coef * mean((r_chosen + r_rejected)^2) to keep rewards centred")

    def __post_init__(self):
        super().__post_init__()
        require(self, "center_rewards_coef", 0)


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation against a frozen reference model."""

    output_dir: str = option("runs/dpo", RUN_DIR_HELP)
    learning_rate: float = option(1e-6, LEARNING_RATE_HELP)
    beta: float = option(0.1, "DPO temperature beta (strength of the KL constraint)")
    loss_type: list[str] = option(["sigmoid"], "preference loss (fa.dpo_loss); several, comma-separated, are summed "
                                               "with loss_weights (TRL's list loss_type): " + ", ".join(DPO_LOSS_TYPES))
    loss_weights: list[float] = option([], "one weight per loss_type (TRL's loss_weights, e.g. MPO's 0.8,0.2,1.0); "
                                           "empty: all 1")
    label_smoothing: float = option(0.0, "label smoothing eps (sigmoid: cDPO; robust, exo_pair, aot, aot_unpaired, "
                                         "simpo)")
    discopop_tau: float = option(0.05, "DiscoPOP temperature tau (discopop only)")
    simpo_gamma: float = option(0.0, "SimPO target reward margin gamma (simpo only)")
    ref_model: str | None = option(None, "reference checkpoint; none: the initial policy (with LoRA: adapters "
                                         "disabled)")
    precompute_ref: bool = option(True, "score the reference once in a no-grad pass before training (the "
                                         "reference is then freed); off: score it every step")

    def __post_init__(self):
        super().__post_init__()
        require(self, "beta", 0, low_open=True)
        unknown = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if not self.loss_type or unknown:
            raise ValueError(f"DPOConfig: loss_type must be one of {DPO_LOSS_TYPES} (or a comma-separated list of "
                             f"them), got {unknown[0] if unknown else self.loss_type!r}")
        if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"DPOConfig: loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} "
                             f"loss types {self.loss_type}")
        # the same rules as fa.dpo_loss, checked before any model loads; eps > 0.5 would flip every preference
        types = self.loss_type
        shown = repr(types[0]) if len(types) == 1 else repr(types)
        if self.label_smoothing != 0 and not set(types) & set(DPO_SMOOTHED):
            raise ValueError(f"DPOConfig: label_smoothing must be 0 for loss_type={shown} (it applies to "
                             f"{', '.join(DPO_SMOOTHED)}), got {self.label_smoothing}")
        if "robust" in types and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig: label_smoothing must lie in [0, 0.5) for loss_type='robust', "
                             f"got {self.label_smoothing}")
        require(self, "label_smoothing", 0, 0.5)
        if "simpo" not in types and self.simpo_gamma != 0:
            raise ValueError(f"DPOConfig: simpo_gamma only applies to loss_type='simpo', got {self.simpo_gamma}")
        if "discopop" not in types and self.discopop_tau != DISCOPOP_TAU:
            raise ValueError(f"DPOConfig: discopop_tau only applies to loss_type='discopop', got {self.discopop_tau}")
        # the remaining combination rules (exo_pair's eps > 0, simpo not combined with reference types, ...)
        check_dpo_options("DPOConfig", beta=self.beta, loss_type=types, label_smoothing=self.label_smoothing,
                          gamma=self.simpo_gamma, has_reference=needs_reference(types),
                          loss_weights=self.loss_weights or None,
                          discopop_tau=self.discopop_tau if "discopop" in types else None)


@dataclass
class RLConfig(TrainConfig):
    """Fields shared by the on-policy RL trainers (GRPO, PPO): sampling, rewards, the clipped policy loss."""

    train_file: str | None = option(None, "RL prompts (.jsonl/.json/.parquet, field 'prompt' + fields for the "
                                          "reward functions); none: the shipped addition task's rl.jsonl")
    learning_rate: float = option(1e-6, LEARNING_RATE_HELP)
    batch_size: int = option(8, "prompts per micro-batch, per process")
    num_generations: int = option(1, "completions sampled per prompt")
    max_new_tokens: int = option(64, "max completion tokens; generation also stops at EOS")
    temperature: float = option(1.0, "sampling temperature (log-probs are taken at the same temperature)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    top_k: int = option(0, "top-k sampling (0: off)")
    generation_batch_size: int | None = option(None, "sequences per generate call (openai: per request); none: all")
    generation_backend: str = option("hf", "sampler: hf (the policy's own generate), vllm (an in-process vLLM "
                                           "engine, weights pushed after each step; pip install "
                                           "'fastalign[vllm]'), openai (an OpenAI-compatible server at --base-url, "
                                           "no weight sync)", choices=("hf", "vllm", "openai"))
    base_url: str | None = option(None, "openai backend: the server's URL, e.g. http://127.0.0.1:8000/v1")
    served_model: str | None = option(None, "openai backend: the model name the server serves; none: its first")
    request_timeout: float = option(120.0, "openai backend: seconds per HTTP request before it is retried")
    request_retries: int = option(3, "openai backend: retries of a failed or timed-out request")
    allow_stale_weights: bool = option(False, "openai backend: keep sampling from the server's fixed weights after "
                                              "optimizer steps (off-policy; see --sampler-is-cap); off: the "
                                              "first weight sync raises")
    vllm_gpu_memory_utilization: float = option(0.3, "vllm: fraction of the GPU the engine (weights + KV cache) "
                                                     "may take; the trainer shares the card")
    vllm_kv_cache_gb: float | None = option(None, "vllm: KV cache size in GiB (instead of the utilization "
                                                  "fraction; what sizes it on a CPU)")
    vllm_sleep: bool = option(False, "vllm: release the engine's weights and KV cache while the trainer runs "
                                     "(sleep level 2, woken by the weight sync; needs a GPU)")
    vllm_enforce_eager: bool = option(False, "vllm: no CUDA graphs / torch.compile (faster start, slower decode)")
    sampler_is_cap: float | None = option(None, "truncated importance sampling: weight each token's policy loss "
                                                "by min(pi_old / pi_sampler, C) (needs sampler log-probs: vllm, "
                                                "openai); none: off")
    reward_funcs: list[str] = option(["exact_match"], "reward functions: registered names (exact_match, format, "
                                                      "numeric_closeness) or 'package.module:function'")
    reward_weights: list[float] = option([], "one weight per reward function; empty: all 1")
    reward_model: str | None = option(None, "reward-model checkpoint (RUN_DIR/final of `fastalign train rm`), "
                                            "added to the reward functions")
    reward_model_weight: float = option(1.0, "weight of the reward model's score")
    agg: str = option("token-mean", "loss aggregation over response tokens", choices=AGG_MODES)
    clip_low: float = option(0.2, "ratio clip below: 1 - clip_low")
    clip_high: float | None = option(None, "ratio clip above: 1 + clip_high (DAPO clip-higher, e.g. 0.28); "
                                           "none: clip_low")
    dual_clip: float | None = option(None, "dual-clip constant c > 1 for negative advantages; none: off")
    kl_coef: float = option(0.0, "KL weight (0: no reference model needed)")
    kl_kind: str = option("k3", "KL estimator", choices=("k1", "k2", "k3"))
    ref_model: str | None = option(None, "reference checkpoint; none: the initial policy (LoRA: adapters off)")
    entropy_coef: float = option(0.0, "entropy bonus weight")
    num_iterations: int = option(1, "optimizer steps per rollout batch; > 1 makes the clip active")

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        for field in ("num_generations", "num_iterations", "max_new_tokens", "generation_batch_size"):
            require(self, field, 1)
        for field in ("kl_coef", "entropy_coef", "top_k"):
            require(self, field, 0)
        for field in ("temperature", "clip_high"):
            require(self, field, 0, low_open=True)
        require(self, "top_p", 0, 1, low_open=True)
        require(self, "clip_low", 0, 1, low_open=True, high_open=True)
        require(self, "dual_clip", 1, low_open=True)
        names = reward_function_names(self.reward_funcs)
        if not names and not self.reward_model:
            raise ValueError(f"{name}: give reward_funcs and/or reward_model")
        if self.reward_weights and len(self.reward_weights) != len(names):
            raise ValueError(f"{name}: reward_weights has {len(self.reward_weights)} values for {len(names)} reward "
                             f"function(s) {names}")
        _check_generation(self, name)


def _check_generation(cfg: RLConfig, name: str) -> None:
    """Errors name the flag: the backend's own options need that backend, and the IS cap needs sampler log-probs."""
    backend = cfg.generation_backend
    if backend == "openai":
        if not cfg.base_url:
            raise ValueError(f"{name}: --generation-backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not cfg.allow_stale_weights:
            raise ValueError(f"{name}: --generation-backend openai samples from the server's weights, which do not "
                             "follow the policy after an optimizer step; pass --allow-stale-weights to train "
                             "off-policy against them, or use --generation-backend vllm")
    elif cfg.base_url:
        raise ValueError(f"{name}: --base-url is only used by --generation-backend openai (got {backend!r})")
    if cfg.request_timeout <= 0 or cfg.request_retries < 0:
        raise ValueError(f"{name}: --request-timeout must be > 0 and --request-retries >= 0")
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise ValueError(f"{name}: --vllm-gpu-memory-utilization must be in (0, 1], "
                         f"got {cfg.vllm_gpu_memory_utilization}")
    if cfg.vllm_kv_cache_gb is not None and cfg.vllm_kv_cache_gb <= 0:
        raise ValueError(f"{name}: --vllm-kv-cache-gb must be > 0, got {cfg.vllm_kv_cache_gb}")
    if cfg.sampler_is_cap is not None:
        if cfg.sampler_is_cap <= 0:
            raise ValueError(f"{name}: --sampler-is-cap must be > 0 (e.g. 2), got {cfg.sampler_is_cap}")
        if backend == "hf":
            raise ValueError(f"{name}: --sampler-is-cap needs the sampler's log-probs, which --generation-backend "
                             "hf does not report; use vllm or openai")


def reward_function_names(names: Sequence[str]) -> list[str]:
    """``reward_funcs`` without blanks and the CLI's ``none`` (``--reward-funcs none``: a reward model alone)."""
    return [n.strip() for n in names if n.strip() and n.strip().lower() != "none"]
