"""Models for the trainer: load local Hugging Face checkpoints, get last hidden states and the LM head, and
compute per-token log-probs with the fused op (``fa.linear_logprobs``) so no step materializes [B, T, V] logits.
"""
from __future__ import annotations

import importlib.util
import os
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import fastalign as fa
from fastalign.ops.logprobs import LogprobsOutput
from fastalign.reference.logprobs import logprobs_from_logits
from fastalign.train.config import DEFAULT_LORA_TARGET_MODULES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------------ loading

def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` is bf16 on a CUDA device that supports it, fp32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_local_path(path: str | os.PathLike) -> Path:
    """A local checkpoint directory with a config.json, or a clear error (no hub look-ups, ever)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        text = str(path)
        hub_like = text.count("/") == 1 and not text.startswith((".", "~", "/")) and not p.parent.exists()
        if p.exists():
            problem = " (it is a file, not a checkpoint directory)"
        elif hub_like:
            problem = (". It looks like a hub id; fastalign only loads local directories: download it first "
                       "(e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR.")
        else:
            problem = " (it does not exist)"
        raise FileNotFoundError(f"model path {text!r} is not a local directory{problem}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(p)!r} has no config.json: not a transformers checkpoint")
    return p


def attn_implementation(requested: str = "auto", dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cuda") -> str:
    """``"auto"``: flash-attn 2 when installed, on a GPU, in bf16/fp16 (all it supports); otherwise PyTorch SDPA."""
    if requested != "auto":
        return requested
    on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if on_gpu and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(check_local_path(path)), local_files_only=True)
    if tok.pad_token is None:  # many base checkpoints ship none; padding is masked out everywhere
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | os.PathLike,
    *,
    kind: str = "causal",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    attn: str = "auto",
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | None = None,
) -> nn.Module:
    """Load a local checkpoint directory (safetensors) as a causal LM (``kind="causal"``) or a scalar-head
    model (``kind="score"``: AutoModelForSequenceClassification with one label, for reward and value models).

    LoRA (``lora_r > 0``) wraps the model with peft; only adapter (and, for ``score``, head) weights train.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = check_local_path(path)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = dict(dtype=torch_dtype, local_files_only=True,
                  attn_implementation=attn_implementation(attn, torch_dtype, device))
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    elif kind == "score":
        model = AutoModelForSequenceClassification.from_pretrained(str(p), num_labels=1, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
    else:
        raise ValueError(f"kind must be 'causal' or 'score', got {kind!r}")
    model.to(device)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules or list(DEFAULT_LORA_TARGET_MODULES)
        modules_to_save = ["score"] if kind == "score" else None
        lcfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                          modules_to_save=modules_to_save, task_type="SEQ_CLS" if kind == "score" else "CAUSAL_LM")
        if gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lcfg)
    return model


def load_trainable(path: str | os.PathLike, cfg, *, device: str | torch.device, kind: str = "causal") -> nn.Module:
    """:func:`load_model` with a trainer config's dtype, attention, gradient-checkpointing and LoRA settings."""
    return load_model(path, kind=kind, dtype=cfg.dtype, device=device, attn=cfg.attn_implementation,
                      gradient_checkpointing=cfg.gradient_checkpointing, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules)


# ----------------------------------------------------------------------------------------- hidden states, head

def unwrap(model: nn.Module, *, keep_peft: bool = False) -> nn.Module:
    """The transformers model under the DDP/FSDP and HeadForward wrappers, and under peft's unless ``keep_peft``
    (peft's LoRA layers stay injected either way; keep the peft model to save adapters or disable them)."""
    while True:
        if isinstance(model, HeadForward):
            model = model.model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP
            model = model.module
        elif not keep_peft and hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def backbone_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Last hidden states (B, T, D) of the base model (after its final norm), without running the LM head."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def lm_head_weight(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, D), bias (V,) or None) of the LM head; for tied models the weight *is* the embedding."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (LM head)")
    if hasattr(head, "base_layer"):  # a peft-wrapped head: its merged weight is not a plain tensor
        raise NotImplementedError("LoRA on the LM head is not supported by the fused path; leave lm_head out")
    return head.weight, getattr(head, "bias", None)


def logit_softcap(model: nn.Module) -> float | None:
    return getattr(unwrap(model).config, "final_logit_softcapping", None) or None


class HeadForward(nn.Module):
    """``forward(input_ids, attention_mask, fn) = fn(model, hidden)`` with ``hidden`` the last hidden states.

    DDP and FSDP2 hook a module's ``forward``; wrapping this (not the HF model) keeps the use of the LM-head
    weight (or a value head) inside that forward, so a fused loss that takes (hidden, weight) sees gathered
    weights and its gradients are reduced.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, fn: Callable):
        return _run(self.model, input_ids, attention_mask, fn)


def _run(model, input_ids, attention_mask, fn):
    return fn(model, backbone_hidden(model, input_ids, attention_mask))


def is_wrapped(model: nn.Module) -> bool:
    """True for HeadForward and the DDP/FSDP wrappers around it, whose forward takes (ids, mask, fn)."""
    return isinstance(model, HeadForward) or isinstance(getattr(model, "module", None), HeadForward)


def forward_head(model: nn.Module, input_ids, attention_mask, fn: Callable):
    """``fn(model, hidden)``, run through a distributed wrapper's forward when there is one."""
    if is_wrapped(model):
        return model(input_ids, attention_mask, fn)
    return _run(model, input_ids, attention_mask, fn)


def _shifted_logprobs(model, hidden, *, labels, fused, temperature, ignore_index, return_entropy,
                      softcap, backend):
    weight, bias = lm_head_weight(model)
    # position t predicts labels[:, t] from tokens < t: drop the last hidden state and the first label
    h, y = hidden[:, :-1], labels[:, 1:]
    if fused:
        out = fa.linear_logprobs(h, weight, y, bias=bias, temperature=temperature, softcap=softcap,
                                 ignore_index=ignore_index, return_entropy=return_entropy, backend=backend)
        logp, ent = out.logprobs, out.entropy
    else:  # the unfused reference: full logits, as the model's own forward computes them
        logits = torch.nn.functional.linear(h, weight, bias).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        logp, ent = logprobs_from_logits(logits, y, temperature=temperature, ignore_index=ignore_index,
                                         return_entropy=return_entropy)
    pad = hidden.new_zeros(hidden.shape[0], 1, dtype=torch.float32)
    logp = torch.cat([pad, logp], dim=1)
    ent = torch.cat([pad, ent], dim=1) if ent is not None else None
    return LogprobsOutput(logp, ent)


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    fused: bool = True,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Per-token log-probs aligned with ``labels``: out[:, t] = log p(labels[:, t] | input_ids[:, :t]).

    Args:
        input_ids, attention_mask: (B, T) int.
        labels: (B, T) int; ``ignore_index`` where no log-prob is wanted (prompt, padding). Column 0 is
            always ignored (nothing predicts the first token).
        fused: True -> ``fa.linear_logprobs`` from hidden states (no [B, T, V] logits); False -> the plain
            logits + log_softmax reference.
    Returns:
        LogprobsOutput(logprobs (B, T) fp32, entropy (B, T) fp32 or None); 0 at ignored positions.
    """
    fn = partial(_shifted_logprobs, labels=labels, fused=fused, temperature=temperature, ignore_index=ignore_index,
                 return_entropy=return_entropy, softcap=logit_softcap(model), backend=backend)
    return forward_head(model, input_ids, attention_mask, fn)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last attended position, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def token_values(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """(B, T) fp32 scalar head output at every position of a ``kind="score"`` model (value model)."""
    return forward_head(model, input_ids, attention_mask, _score_all)


def _score_all(model, hidden):
    return unwrap(model).score(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """(B,) fp32 score at each sequence's last attended token (a reward model's output)."""
    values = token_values(model, input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask)[:, None])[:, 0]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


