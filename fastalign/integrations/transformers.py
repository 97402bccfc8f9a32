"""Any Hugging Face causal LM, patched: ``fastalign.patch(model)`` makes ``model(input_ids, labels=labels)`` return the
cross-entropy loss computed by fastalign's fused head, without ever building the ``[tokens x vocab]`` logits.

The patched forward, when ``labels`` are given, runs the model's backbone (``model.base_model``), then
:func:`fastalign.linear_logprobs` on the last hidden states and the head's weight (``get_output_embeddings()``), and
returns ``CausalLMOutputWithPast(loss=..., logits=None, ...)`` with the loss transformers' ``ForCausalLMLoss``
computes for the same call::

    shift = labels[:, 1:] padded with ignore_index (or the given shift_labels)
    loss = -sum(logp over shift != ignore_index) / (num_items_in_batch or the count of those tokens)

(an all-ignored batch without ``num_items_in_batch`` is 0 / 0 = nan, as transformers gives). Without ``labels``
the model's own forward runs, so ``generate`` and evaluation logits are unchanged. The model-side logit transforms
are read from the config as TRL's fused head reads them: Gemma's ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``1 / logits_scaling`` (HyperCLOVA X multiplies), Falcon-H1's ``lm_head_multiplier``.
Under autocast the head runs in the autocast dtype, as the model's ``lm_head`` would. Tied embeddings need nothing
(the head's weight is the embedding matrix, and its gradient adds up); PEFT models (LoRA on the backbone, the head in
``modules_to_save``) are patched through ``get_base_model()`` and keep working when adapters are disabled.

Refused, with an error naming the model, never a silent no-op: a model that is not a causal LM, has no backbone
distinct from itself, a head that is not a ``torch.nn.Linear`` (a LoRA layer or a quantized head would be skipped by
reading its weight), a custom loss function, and at call time ``logits_to_keep`` with labels or MoE router logits
(their auxiliary loss is not added here).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch

from fastalign._backend import BACKENDS
from fastalign.integrations._common import autocast_dtype, cast
from fastalign.ops.logprobs import linear_logprobs

OP = "fastalign.patch"
_ORIGINAL = "_fastalign_original_forward"  # the instance attribute that marks a patched model
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def logit_transform(config) -> tuple[float | None, float]:
    """(softcap, logit_scale) of a model's logits, from its (text) config, the way TRL's fused head reads them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)


def _peft_base(model):
    """The transformers model inside a PEFT wrapper (``model`` itself when it is not one)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def _head_params(model):
    """(weight, bias) of the LM head, read on each call (PEFT and FSDP may replace the module after patching)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = type(model).__name__
    if head is None:
        raise TypeError(f"{OP}: {name} has no output embeddings (get_output_embeddings() is None): not a causal LM "
                        "with a linear head")
    modules = [head]
    if type(head).__name__ == "ModulesToSaveWrapper":  # peft: the head trained in full beside the adapters
        modules = [head.original_module, *head.modules_to_save.values()]
    for module in modules:
        if not isinstance(module, torch.nn.Linear):
            hint = " (LoRA on the LM head is not supported: keep lm_head out of target_modules)" \
                if type(module).__module__.startswith("peft") else ""
            raise TypeError(f"{OP}: the LM head of {name} is a {type(module).__module__}.{type(module).__name__}; "
                            f"the fused head reads its weight directly and needs a torch.nn.Linear{hint}")
    weight, bias = head.weight, getattr(head, "bias", None)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{OP}: the LM head of {name} holds {weight.dtype} weights (quantized?); the fused head "
                        "needs floating-point ones")
    try:  # FSDP2 shards parameters as DTensors; the backbone's output is a plain tensor
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


def _check_supported(model) -> None:
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{OP}: expected a transformers PreTrainedModel (or a PEFT model around one), got {name}")
    if name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() and not name.endswith("ForCausalLM"):
        raise TypeError(f"{OP}: {name} is not a causal language model (not in transformers' causal-LM mapping)")
    if model.base_model is model:
        raise TypeError(f"{OP}: {name} has no backbone distinct from itself (base_model_prefix "
                        f"{model.base_model_prefix!r} not found), so its last hidden state cannot be read")
    _head_params(model)
    if model.loss_function is not ForCausalLMLoss:
        raise TypeError(f"{OP}: {name} computes its loss with {getattr(model.loss_function, '__name__', 'a custom')} "
                        "loss function, not transformers' ForCausalLMLoss; the fused head would compute another one")


def _output(backbone_out, loss):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
    rest = {k: v for k, v in backbone_out.items() if k in fields} if hasattr(backbone_out, "items") else {}
    return CausalLMOutputWithPast(loss=loss, logits=None, **rest)


def patch(model, *, backend: str = "auto"):
    """Give a Hugging Face causal LM a forward that computes the training loss with fastalign's fused head.

    ``model(input_ids, attention_mask=..., labels=labels)`` then returns the token-mean cross-entropy of the labels
    (shifted inside, ``-100`` ignored, ``num_items_in_batch`` and ``shift_labels`` honoured as transformers does)
    with ``logits=None``; without labels the model's own forward runs. The instance is patched in place and
    returned, so ``model = fastalign.patch(model)`` and ``fastalign.patch(model)`` both work; patching twice only
    updates ``backend``. :func:`unpatch` restores the original forward.

    Args:
        model: a transformers causal LM (``*ForCausalLM``), or a PEFT model around one.
        backend: the head's backend, as in :func:`fastalign.linear_logprobs`.

    Raises:
        TypeError: the model is not a supported causal LM (see the module docstring for what is refused).
        ValueError: an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {BACKENDS}, got {backend!r}")
    target = _peft_base(model)
    _check_supported(target)
    if getattr(target, _ORIGINAL, None) is not None:
        target._fastalign_backend = backend
        return model
    original = target.forward
    signature = inspect.signature(type(target).forward)
    softcap, logit_scale = logit_transform(target.config)
    text_config = target.config.get_text_config()

    # the class's signature is kept: generate() and Trainer inspect it (Trainer passes num_items_in_batch
    # only to a forward that takes **kwargs)
    @functools.wraps(type(target).forward)
    def forward(self, *args, **kwargs):
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        arguments.pop("self", None)
        for param in signature.parameters.values():  # flatten **kwargs
            if param.kind == inspect.Parameter.VAR_KEYWORD and param.name in arguments:
                arguments.update(arguments.pop(param.name))
        labels = arguments.pop("labels", None)
        if labels is None and arguments.get("shift_labels") is None:
            return original(*args, **kwargs)
        loss_kwargs = {k: arguments.pop(k) for k in _LOSS_KWARGS if k in arguments}
        keep = arguments.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise ValueError(f"{OP}: logits_to_keep={keep!r} with labels: the fused loss scores every position")
        if arguments.get("output_router_logits", getattr(text_config, "output_router_logits", False)):
            raise NotImplementedError(f"{OP}: output_router_logits (an MoE auxiliary loss) is not added by the fused "
                                      "loss; pass output_router_logits=False or use the unpatched model")
        return_dict = arguments.pop("return_dict", None)
        out = self.base_model(**arguments)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, D)
        ignore_index = loss_kwargs.get("ignore_index", -100)
        shift = loss_kwargs.get("shift_labels")
        if shift is None:  # position t predicts labels[:, t + 1]; the last position predicts nothing
            shift = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
        weight, bias = _head_params(self)
        shift = shift.to(weight.device)
        valid = shift != ignore_index
        # only the scored positions reach the head: prompt and padding tokens cost nothing
        hidden = hidden.to(weight.device)[valid]
        dtype = autocast_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            logp = linear_logprobs(cast(hidden, dtype), cast(weight, dtype), shift[valid], bias=cast(bias, dtype),
                                   softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                                   backend=self._fastalign_backend).logprobs
        num_items = loss_kwargs.get("num_items_in_batch")
        if num_items is None:
            loss = -logp.sum() / valid.sum()  # the mean over scored tokens (nan when there are none, as in torch)
        else:
            loss = -logp.sum() / (num_items.to(logp.device) if torch.is_tensor(num_items) else num_items)
        result = _output(out, loss)
        return result if return_dict is not False else result.to_tuple()

    setattr(target, _ORIGINAL, original)
    target._fastalign_backend = backend
    target.forward = types.MethodType(forward, target)
    return model


def is_patched(model) -> bool:
    return getattr(_peft_base(model), _ORIGINAL, None) is not None


def unpatch(model):
    """Restore the forward :func:`patch` replaced (a no-op on an unpatched model). Returns the model."""
    target = _peft_base(model)
    if getattr(target, _ORIGINAL, None) is not None:
        del target.forward  # the instance attribute: the class's forward shows through again
        delattr(target, _ORIGINAL)
        del target._fastalign_backend
    return model
