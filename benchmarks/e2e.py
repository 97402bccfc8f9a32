"""End to end: one DPO and one GRPO training step through a whole causal LM, fastalign vs TRL vs plain PyTorch.

The same model weights (random init from a config: a tiny Llama on CPU, a Qwen2.5-0.5B-shaped model on GPU,
vocab 151936), the same batch and the same hyperparameters for every row. The timed unit is one optimizer step:
loss forward + backward into every parameter, gradient clipping at 1.0, AdamW (lr 1e-6, constant schedule, no
weight decay), gradients zeroed — each trainer's own code for each of these. Every row steps its own copy of the
same initial weights, so the first call (the agreement check) of every row sees the same model.

- ``fastalign trainer step, fused ops on``: ``fastalign.train.loop.TrainLoop.step`` (what ``fastalign train dpo``
  / ``grpo`` runs per step: accumulation, clipping, NaN guard, AdamW, schedule, the metrics row) with the trainer's
  own loss (``fastalign.train.dpo.dpo_loss``, ``fastalign.train.actor.actor_loss_from_config``), ``fused=True``:
  backbone hidden states, then ``fa.linear_dpo_loss`` / ``fa.linear_policy_loss`` on the LM-head weight.
- ``fastalign trainer step, fused ops off``: the same with ``fused=False`` (full logits + log_softmax, then
  ``fa.dpo_loss`` / ``fa.ppo_policy_loss`` + ``fa.kl_penalty``).
- ``plain PyTorch``: ``model(...).logits`` -> log_softmax -> the loss formula, backward, ``clip_grad_norm_``,
  ``torch.optim.AdamW`` with torch's defaults (what a hand-written loop does; on CPU that is the per-parameter
  loop, while fastalign's trainer and transformers' Trainer, so TRL, use the fused kernel: each row's ``optimizer``
  extra names its own).
- ``TRL DPOTrainer step`` / ``TRL GRPOTrainer step``: TRL 1.16's own trainer on the same saved model, its default
  path (its chunked fused LM head): ``trainer.training_step`` (compute_loss, backward, TRL's metrics), then
  ``Trainer``'s clip, ``optimizer.step()``, ``lr_scheduler.step()``, ``model.zero_grad()``, as its inner loop
  runs them. GRPO: the rollout is given, so ``_prepare_inputs`` (generation) is bypassed.

The integration cases compare a trainer with itself plus one fastalign line, on the same model, batch and config:
``trl_dpo_step`` / ``trl_grpo_step`` (TRL's trainer step above, and the same under
``fastalign.integrations.trl.enabled()``) and ``hf_sft_step`` (``transformers.Trainer.training_step`` on the model
and on ``fastalign.patch(model)``), each beside the plain PyTorch baseline of the accuracy check.

DPO: reference log-probs precomputed (as TRL's ``precompute_ref_log_probs``), sigmoid loss, beta 0.1.
GRPO: old and reference log-probs given (current + noise), clip 0.2, k3 KL beta 0.04, TRL ``loss_type="bnpo"``
(= fastalign ``agg="token-mean"``). Agreement: the step-0 loss against the plain PyTorch path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from fastalign.train import actor, distributed
from fastalign.train.config import DPOConfig as FaDPOConfig
from fastalign.train.dpo import dpo_loss as trainer_dpo_loss
from fastalign.train.grpo import GRPOConfig as FaGRPOConfig
from fastalign.train.loop import Run, TrainLoop

from . import peers
from .logprobs import IGNORE
from .preference import DPO_BETA, dpo_truth_loss, sigmoid_dpo_loss
from .rl import CLIP, GRPO_BETA, grpo_bnpo_loss, grpo_truth_loss
from .runner import Case, Impl, Prepared

LR = 1e-6  # every row's AdamW: the same rate, constant schedule, no weight decay, gradients clipped at 1.0
MAX_GRAD_NORM = 1.0


def _fa_train_options() -> dict:
    return dict(learning_rate=LR, lr_scheduler="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=MAX_GRAD_NORM, max_steps=10**9, progress=False, save_steps=0)


# Qwen2.5-0.5B's shape (config values, no download); random init
QWEN05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=True)


def build_model(spec: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if spec["model"] == "qwen2.5-0.5b":
        cfg = Qwen2Config(**QWEN05B)
        cls = Qwen2ForCausalLM
    else:
        cfg = LlamaConfig(vocab_size=spec["v"], hidden_size=spec["d"], intermediate_size=2 * spec["d"],
                          num_hidden_layers=spec.get("layers", 2), num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=max(512, 2 * spec["t"]), tie_word_embeddings=False)
        cls = LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    with torch.device(device):  # initialise on the device: 0.5B parameters drawn on one CPU core take seconds
        model = cls(cfg)
    model = model.to(dtype=dtype)
    model.train()
    return model


def _tokenizer(vocab: int):
    """A word-level tokenizer over ids < min(vocab, 512): TRL's trainers need one to start, the batch is ours."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n = min(vocab, 512)
    words = {f"w{i}": i for i in range(n - 3)}
    words.update({"<pad>": n - 3, "<eos>": n - 2, "<unk>": n - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@contextlib.contextmanager
def _quiet():
    """TRL/transformers/datasets print progress bars and deprecation notes while a trainer starts."""
    import warnings

    levels = {n: logging.getLogger(n).level for n in ("transformers", "trl", "datasets", "accelerate")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    old = os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    for mod in ("datasets.utils.logging", "transformers.utils.logging"):
        try:
            __import__(mod, fromlist=["disable_progress_bar"]).disable_progress_bar()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)
        if old is None:
            os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)


class Shared:
    """The model, its saved copy for TRL, and the tokenizer: built once per e2e case (lazily)."""

    def __init__(self, spec: dict, device, dtype):
        self.spec, self.device, self.dtype = spec, device, dtype
        self._model = None
        self._dir = None

    @property
    def model(self):
        if self._model is None:
            self._model = build_model(self.spec, self.device, self.dtype)
        return self._model

    def saved_dir(self) -> str:
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fa-bench-e2e-")
            with _quiet():
                self.model.save_pretrained(self._tmp.name)
                _tokenizer(self.model.config.vocab_size).save_pretrained(self._tmp.name)
            self._dir = self._tmp.name
        return self._dir

    def trl_kwargs(self) -> dict:
        cpu = self.device.type != "cuda"
        return dict(use_cpu=cpu, bf16=False, fp16=False, report_to=[], save_strategy="no", logging_strategy="no",
                    model_init_kwargs={"dtype": self.dtype}, learning_rate=LR, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM)


def _params_prepared(model, step_fn) -> Prepared:
    """A loss forward + backward into every trainable parameter (the plain baseline of the integration cases)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = step_fn()
        loss.backward()
        return {"loss": loss.detach().float().reshape(())}

    return Prepared(step, grad_to_none=params)


def _own_copy(shared: "Shared"):
    """A copy of the case's model for one row: every row's optimizer steps its own weights, all from the same
    initial ones (the truth and the references are computed on the untouched original)."""
    import copy

    model = copy.deepcopy(shared.model)
    model.train()
    return model


def _plain_step(model, loss_fn) -> Prepared:
    """What a hand-written loop does per step: loss forward + backward, clip the gradient norm, AdamW, zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)

    def step():
        loss = loss_fn(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach().float().reshape(())}

    return Prepared(step, grad_to_none=params, extra={"optimizer": _optimizer_name(opt)})


def _optimizer_name(opt) -> str:
    group = opt.param_groups[0] if opt.param_groups else {}
    how = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "torch default"
    return f"{type(opt).__name__} ({how})"


def _trl_step(trainer, model, inputs) -> Prepared:
    """TRL's trainer step as ``Trainer``'s inner loop runs it: ``trainer.training_step`` (compute_loss and
    backward, TRL's own metrics), gradient clipping, the optimizer and schedule steps, ``model.zero_grad()``."""
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop; we call its step
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = trainer.training_step(model, dict(inputs), None)
        grad_norm = trainer._clip_grad_norm(model)
        trainer._get_grad_norm(model, grad_norm=grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return {"loss": loss.detach().float().reshape(())}

    return Prepared(step, grad_to_none=params, extra={"optimizer": _optimizer_name(trainer.optimizer)})


def _fastalign_step(shared: "Shared", cfg, loss_fn, weight_fn, micro_batch: dict, loss_path: str) -> Prepared:
    """fastalign's trainer step: ``TrainLoop.step`` (accumulate, clip, NaN guard, AdamW, schedule, metrics row in
    RUN_DIR/metrics.jsonl) on one micro-batch, on this row's own copy of the model."""
    model = _own_copy(shared)
    tmp = tempfile.TemporaryDirectory(prefix="fa-bench-loop-")
    run = Run(info=distributed.DistInfo(device=torch.device(shared.device)), model_path=Path(tmp.name),
              tokenizer=None, run_dir=Path(tmp.name))
    loop = TrainLoop(cfg, model, run)

    def step(_run_dir=tmp):  # the run directory lives as long as the row
        out = loop.step([micro_batch], lambda mb: loss_fn(loop.model, mb, cfg), weight_fn=weight_fn)
        return {"loss": torch.tensor(out["loss"])}

    prepared = Prepared(step, grad_to_none=list(loop.params), extra={"optimizer": _optimizer_name(loop.optimizer)})
    prepared.extra["path"] = f"fastalign.train.loop.TrainLoop.step + {loss_path}"
    return prepared


def _trainer_impls(shared: Shared, make_cfg, loss_fn, loss_path: str, weight_fn, batch_of, fused_ops: str,
                   unfused_ops: str) -> list[Impl]:
    """The two fastalign rows of an e2e case: the trainer's step with its loss function ``loss_fn`` and its
    ``fused`` switch on and off. ``make_cfg(fused)`` is the trainer config; ``batch_of(inputs)`` lays the batch
    out as the trainer's micro-batch (outside the timed step)."""
    def prepare(fused_on: bool):
        return lambda inputs: _fastalign_step(shared, make_cfg(fused_on), loss_fn, weight_fn, batch_of(inputs),
                                              loss_path)

    return [Impl(f"fastalign trainer step, fused ops on ({fused_ops})", "fastalign", prepare(True)),
            Impl(f"fastalign trainer step, fused ops off ({unfused_ops})", "fastalign", prepare(False))]


# -------------------------------------------------------------------------------------------------------- DPO

def dpo_batch(spec: dict, vocab: int, device) -> dict:
    pairs, t = spec["pairs"], spec["t"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, min(vocab, 512) - 3, (2 * pairs, t), generator=g)
    prompt = max(1, t // 4)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]  # chosen and rejected share the prompt
    completion_mask = torch.zeros(2 * pairs, t, dtype=torch.long)
    completion_mask[:, prompt:] = 1
    labels = ids.masked_fill(completion_mask == 0, IGNORE)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "completion_mask": completion_mask.to(device), "labels": labels.to(device)}


def _plain_seq_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    y = batch["labels"][:, 1:]
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != IGNORE)
    return logp.sum(-1)


def _fp32_head_logits(model, input_ids, attention_mask):
    """The truth's logits: the model's own backbone, then the LM head in fp32 (bf16 logits are themselves off by
    ~1e-2, which summed over a sequence would make the plain path a poor reference)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    return F.linear(hidden.float(), head.weight.float(), bias)


def _truth_seq_logps(model, batch):
    logits = _fp32_head_logits(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    y = batch["labels"][:, 1:]
    return (logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != IGNORE)).sum(-1)


def dpo_case(spec: dict, device, dtype) -> Case:
    shared = Shared(spec, device, dtype)

    def make_inputs():
        model = shared.model
        batch = dpo_batch(spec, model.config.vocab_size, device)
        with torch.no_grad():  # the reference is the same initial model: precomputed, + noise so margins vary
            ref = _plain_seq_logps(model, batch)
            ref = ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(4)).to(ref) * 0.5
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.chunk(2)
        return batch

    def truth(b):
        with torch.no_grad():
            return {"loss": dpo_truth_loss(_truth_seq_logps(shared.model, b),
                                           torch.cat([b["ref_chosen_logps"], b["ref_rejected_logps"]]))}

    def make_cfg(fused_on: bool):
        return FaDPOConfig(beta=DPO_BETA, loss_type="sigmoid", fused=fused_on, **_fa_train_options())

    def batch_of(b):
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"],
                "ref_chosen": b["ref_chosen_logps"], "ref_rejected": b["ref_rejected_logps"]}

    def plain(b):
        ref = torch.cat([b["ref_chosen_logps"], b["ref_rejected_logps"]])
        return _plain_step(_own_copy(shared), lambda m: sigmoid_dpo_loss(_plain_seq_logps(m, b), ref))

    trainers, why_trl = peers.load("trl.trainers")

    def trl(b):
        from datasets import Dataset

        DPOConfig, DPOTrainer, _, _ = trainers
        with _quiet():
            args = DPOConfig(output_dir=os.path.join(shared.saved_dir(), "trl-dpo"), beta=DPO_BETA,
                             loss_type="sigmoid", per_device_train_batch_size=spec["pairs"], **shared.trl_kwargs())
            ds = Dataset.from_dict({"prompt": ["w1 w2"] * 2, "chosen": [" w3"] * 2, "rejected": [" w4"] * 2})
            trainer = DPOTrainer(model=shared.saved_dir(), args=args, train_dataset=ds,
                                 processing_class=_tokenizer(shared.model.config.vocab_size))
        trainer.precompute_ref_logps = True  # the batch carries ref_chosen_logps / ref_rejected_logps
        trainer.ref_model = None
        model = trainer.model
        model.train()
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "completion_mask", "ref_chosen_logps",
                                    "ref_rejected_logps")}
        prepared = _trl_step(trainer, model, inputs)
        prepared.extra["trainer_model_dtype"] = str(next(model.parameters()).dtype)
        prepared.extra["path"] = "trl.DPOTrainer.training_step + clip + optimizer/scheduler step"
        return prepared

    impls = [
        *_trainer_impls(shared, make_cfg, trainer_dpo_loss, "fastalign.train.dpo.dpo_loss",
                        lambda mb: mb["input_ids"].shape[0] // 2, batch_of,
                        "linear_dpo_loss", "logits + dpo_loss"),
        Impl("plain PyTorch (model logits -> log_softmax)", "naive", plain, is_baseline=True),
        Impl("TRL DPOTrainer step", "trl", trl if trainers else None, missing=why_trl),
    ]
    tokens = 2 * spec["pairs"] * spec["t"]
    return Case(suite="e2e", name="dpo_step", params={"model": spec["model"], "pairs": spec["pairs"], "T": spec["t"],
                                                    "dtype": str(dtype).replace("torch.", "")},
                device=device, dtype=dtype, tokens=tokens, make_inputs=make_inputs, truth=truth, impls=impls,
                notes=["one optimizer step through the whole model (loss forward + backward, gradient clipping, "
                       "AdamW, zero_grad); reference log-probs precomputed; every row steps its own copy of the same "
                       "initial weights"])


# ------------------------------------------------------------------------------------------------------- GRPO

def grpo_case(spec: dict, device, dtype) -> Case:
    shared = Shared(spec, device, dtype)
    b_size, t, prompt = spec["b"], spec["t"], spec.get("prompt", max(1, spec["t"] // 8))

    def ids_mask(x):
        return (torch.cat([x["prompt_ids"], x["completion_ids"]], 1),
                torch.cat([x["prompt_mask"], x["completion_mask"]], 1))

    def plain_logp(model, x):
        ids, mask = ids_mask(x)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, prompt - 1:-1]
        return logits.float().log_softmax(-1).gather(-1, x["completion_ids"][..., None])[..., 0]

    def make_inputs():
        model = shared.model
        g = torch.Generator().manual_seed(5)
        hi = min(model.config.vocab_size, 512) - 3
        lengths = torch.randint(max(1, t // 2), t + 1, (b_size,), generator=g)
        cmask = (torch.arange(t)[None] < lengths[:, None]).long()
        x = {"prompt_ids": torch.randint(0, hi, (b_size, prompt), generator=g),
             "prompt_mask": torch.ones(b_size, prompt, dtype=torch.long),
             "completion_ids": torch.randint(0, hi, (b_size, t), generator=g), "completion_mask": cmask}
        r = torch.randn(b_size, generator=g).view(-1, min(8, b_size))
        x["advantages"] = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)).reshape(-1)
        x = {k: v.to(device) for k, v in x.items()}
        with torch.no_grad():
            cur = plain_logp(model, x)
        m = x["completion_mask"].float()
        x["old_per_token_logps"] = (cur + 0.05 * torch.randn(cur.shape, generator=g).to(cur)) * m
        x["ref_per_token_logps"] = (cur + 0.05 * torch.randn(cur.shape, generator=g).to(cur)) * m
        return x

    def formula(loss_fn, logp, x):
        return loss_fn(logp, x["old_per_token_logps"], x["ref_per_token_logps"], x["advantages"],
                       x["completion_mask"].float())

    def truth(x):
        ids, mask = ids_mask(x)
        with torch.no_grad():
            logits = _fp32_head_logits(shared.model, ids, mask)[:, prompt - 1:-1]
            logp = logits.log_softmax(-1).gather(-1, x["completion_ids"][..., None])[..., 0]
            return {"loss": formula(grpo_truth_loss, logp, x)}

    def trainer_batch(x):
        """The trainer's micro-batch layout: token columns aligned with input_ids (column t scores token t)."""
        ids, mask = ids_mask(x)
        labels = torch.full_like(ids, IGNORE)
        labels[:, prompt:] = x["completion_ids"].masked_fill(x["completion_mask"] == 0, IGNORE)
        pad = torch.zeros(b_size, prompt, device=ids.device)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "response_mask": labels != IGNORE,
                "old_logprobs": torch.cat([pad, x["old_per_token_logps"]], 1),
                "ref_logprobs": torch.cat([pad, x["ref_per_token_logps"]], 1), "advantages": x["advantages"]}

    def make_cfg(fused_on: bool):
        return FaGRPOConfig(kl_coef=GRPO_BETA, kl_kind="k3", clip_low=CLIP, clip_high=CLIP, agg="token-mean",
                            fused=fused_on, num_generations=min(8, b_size), **_fa_train_options())

    def grpo_loss_fn(model, mb, cfg):
        return actor.actor_loss_from_config(model, mb, cfg, kl_coef=cfg.kl_coef)

    def plain(x):
        return _plain_step(_own_copy(shared), lambda m: formula(grpo_bnpo_loss, plain_logp(m, x), x))

    trainers, why_trl = peers.load("trl.trainers")

    def trl(x):
        from datasets import Dataset

        _, _, GRPOConfig, GRPOTrainer = trainers
        with _quiet():
            args = GRPOConfig(output_dir=os.path.join(shared.saved_dir(), "trl-grpo"), beta=GRPO_BETA,
                              loss_type="bnpo", epsilon=CLIP, per_device_train_batch_size=b_size,
                              num_generations=min(8, b_size), max_completion_length=t, **shared.trl_kwargs())
            trainer = GRPOTrainer(model=shared.saved_dir(), reward_funcs=lambda completions, **kw: [0.0] * len(
                completions), args=args, train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * b_size}),
                processing_class=_tokenizer(shared.model.config.vocab_size))
        # the rollout is given (no generation): TRL's training_step runs its compute_loss on it as it is
        trainer._prepare_inputs = lambda inputs: inputs
        model = trainer.model
        model.train()
        prepared = _trl_step(trainer, model, x)
        prepared.extra["path"] = "trl.GRPOTrainer.training_step (generation bypassed) + clip + optimizer/scheduler step"
        return prepared

    impls = [
        *_trainer_impls(shared, make_cfg, grpo_loss_fn, "fastalign.train.actor.actor_loss_from_config",
                        lambda mb: actor.loss_weight(mb, "token-mean"),
                        trainer_batch, "linear_policy_loss", "logits + ppo_policy_loss"),
        Impl("plain PyTorch (model logits -> log_softmax)", "naive", plain, is_baseline=True),
        Impl("TRL GRPOTrainer step", "trl", trl if trainers else None, missing=why_trl),
    ]
    return Case(suite="e2e", name="grpo_step",
                params={"model": spec["model"], "B": b_size, "T": t, "prompt": prompt,
                        "dtype": str(dtype).replace("torch.", "")},
                device=device, dtype=dtype, tokens=b_size * t, make_inputs=make_inputs, truth=truth, impls=impls,
                notes=["one optimizer step through the whole model on given rollouts (no generation): loss forward "
                       "+ backward, gradient clipping, AdamW, zero_grad; every row steps its own copy of the same "
                       "initial weights"])


# ------------------------------------------------------------------- fastalign inside TRL and the HF Trainer

def _with_trl_integration(prepare):
    """The TRL row's preparation, its step run with ``fastalign.integrations.trl`` swapped in: the same trainer,
    model, batch and config, only the fused LM head differs."""
    def prep(inputs):
        from fastalign.integrations import trl as integration

        with integration.enabled():  # checks the installed TRL first: an unknown one is this row's error
            pass
        prepared = prepare(inputs)
        inner = prepared.step

        def step():
            with integration.enabled():
                return inner()

        prepared.step = step
        prepared.extra["path"] = "fastalign.integrations.trl.enabled()"
        return prepared

    return prep


def trl_integration_case(base: Case, name: str) -> Case:
    """``base`` (the DPO or GRPO step case) reduced to its TRL trainer row, the same row under
    ``fastalign.integrations.trl``, and the plain PyTorch baseline the agreement check measures against."""
    trl_row = next(i for i in base.impls if i.family == "trl")
    plain = next(i for i in base.impls if i.is_baseline)
    impls = [
        Impl(f"TRL default ({trl_row.name.removeprefix('TRL ')})", "trl", trl_row.prepare, missing=trl_row.missing),
        Impl("TRL + fastalign.integrations.trl", "fastalign",
             _with_trl_integration(trl_row.prepare) if trl_row.prepare else None, missing=trl_row.missing),
        plain,
    ]
    notes = [*base.notes, "TRL's own trainer and loss on the same saved model; the second row only swaps TRL's "
             "fused LM head (trl.trainer.utils._ChunkedLogProbFunction) for fastalign's"]
    return dataclasses.replace(base, name=name, impls=impls, notes=notes)


def sft_batch(spec: dict, vocab: int, device) -> dict:
    """Right-padded rows of unequal length; the first quarter of each row is a prompt (labels -100)."""
    b_size, t = spec["b"], spec["t"]
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, min(vocab, 512) - 3, (b_size, t), generator=g)
    lengths = torch.randint(max(2, t // 2), t + 1, (b_size,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, : max(1, t // 4)] = IGNORE
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def hf_sft_case(spec: dict, device, dtype) -> Case:
    shared = Shared(spec, device, dtype)
    out_dir = tempfile.TemporaryDirectory(prefix="fa-bench-hf-")

    def make_inputs():
        return sft_batch(spec, shared.model.config.vocab_size, device)

    def truth(b):
        with torch.no_grad():
            logits = _fp32_head_logits(shared.model, b["input_ids"], b["attention_mask"])[:, :-1]
            y = b["labels"][:, 1:]
            return {"loss": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                            ignore_index=IGNORE)}

    def trainer_row(patched: bool):
        def prep(b):
            import copy

            from transformers import Trainer, TrainingArguments

            import fastalign

            model = fastalign.patch(copy.deepcopy(shared.model)) if patched else shared.model
            with _quiet():
                args = TrainingArguments(output_dir=out_dir.name, use_cpu=device.type != "cuda", bf16=False,
                                         fp16=False, report_to=[], save_strategy="no", logging_strategy="no",
                                         per_device_train_batch_size=spec["b"])
                trainer = Trainer(model=model, args=args)
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop; we call one step
            model.train()
            prepared = Prepared(lambda: {"loss": trainer.training_step(model, dict(b)).float().reshape(())},
                                grad_to_none=[p for p in model.parameters() if p.requires_grad])
            prepared.extra["path"] = "transformers.Trainer.training_step" + (" on fastalign.patch(model)"
                                                                             if patched else "")
            return prepared

        return prep

    def plain(b):
        return _params_prepared(shared.model, lambda: shared.model(**b, use_cache=False).loss)

    impls = [
        Impl("HF Trainer (training_step)", "hf", trainer_row(False)),
        Impl("HF Trainer + fastalign.patch", "fastalign", trainer_row(True)),
        Impl("plain PyTorch (model(..., labels=labels).loss)", "naive", plain, is_baseline=True),
    ]
    return Case(suite="e2e", name="hf_sft_step",
                params={"model": spec["model"], "B": spec["b"], "T": spec["t"],
                        "dtype": str(dtype).replace("torch.", "")},
                device=device, dtype=dtype, tokens=spec["b"] * spec["t"], make_inputs=make_inputs, truth=truth,
                impls=impls, notes=["SFT cross-entropy forward+backward through the whole model (Trainer's "
                                    "training_step without the optimizer step); right padding and prompt tokens "
                                    "ignored"])


def cases(dpo_specs: list[dict], grpo_specs: list[dict], device) -> list[Case]:
    out = []
    for s in dpo_specs:
        out.append(dpo_case(s, device, s["dtype"]))
    for s in grpo_specs:
        out.append(grpo_case(s, device, s["dtype"]))
    return out


def integration_cases(dpo_specs: list[dict], grpo_specs: list[dict], sft_specs: list[dict], device) -> list[Case]:
    """TRL default vs TRL + fastalign.integrations.trl (DPO, GRPO), HF Trainer vs HF Trainer + fastalign.patch (SFT)."""
    out = [trl_integration_case(dpo_case(s, device, s["dtype"]), "trl_dpo_step") for s in dpo_specs]
    out += [trl_integration_case(grpo_case(s, device, s["dtype"]), "trl_grpo_step") for s in grpo_specs]
    out += [hf_sft_case(s, device, s["dtype"]) for s in sft_specs]
    return out
