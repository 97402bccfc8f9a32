"""The policy's current weights as (checkpoint name, full tensor) pairs, one parameter at a time: what an inference
engine holding its own copy (vLLM) loads after each optimizer step, with no trip through the disk.

    for name, tensor in policy_weights(model):   # names as save_pretrained writes them ("model.layers.0....")
        engine_param(name).copy_(tensor)

- **FSDP2**: a sharded parameter (a DTensor) is gathered on its own (``full_tensor()``), in module order, so at most
  one parameter (and the engine's one layer of buffering) is ever whole at once, never the model. Every rank must
  iterate (the gather is collective) and each feeds its own colocated engine.
- **LoRA** (peft): a wrapped linear layer yields its merged weight ``W + scaling * B @ A`` under the base layer's
  name; the adapter tensors themselves are not yielded, and the policy is not modified (peft's merge/unmerge
  would round W twice and perturb training).
- Tied weights are yielded once (``named_parameters`` drops the duplicate; engines re-tie the head).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from fastalign.train import models

_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter, detached. Collective for a DTensor."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_layers(hf: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer (a module with ``base_layer`` and ``lora_A``)."""
    return {name: m for name, m in hf.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}


def _lora_delta(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """sum over active adapters of scaling * B @ A, shaped like the base layer's weight (fp32 accumulation)."""
    delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(name, False):
            raise NotImplementedError("weight sync of DoRA adapters is not supported; use plain LoRA")
        if not isinstance(layer.lora_A[name], nn.Linear):
            raise NotImplementedError(f"weight sync of LoRA on {type(layer.base_layer).__name__} is not supported")
        a = full_tensor(layer.lora_A[name].weight).float()  # (r, in)
        b = full_tensor(layer.lora_B[name].weight).float()  # (out, r)
        d = (b @ a) * layer.scaling[name]
        delta += d.T if getattr(layer, "fan_in_fan_out", False) else d
    return delta


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight of the policy as its checkpoint names it: gathered under FSDP2,
    LoRA merged. Tensors keep the policy's dtype and device; the caller copies them where they go."""
    hf = models.unwrap(model)  # the transformers model, peft's LoRA layers still injected
    lora = _lora_layers(hf)
    if any(".modules_to_save." in n or ".original_module." in n for n, _ in hf.named_parameters()):
        raise NotImplementedError("weight sync of peft modules_to_save is not supported")
    for name, param in hf.named_parameters():
        if any(part in name for part in _LORA_PARTS):
            continue  # folded into the base weight below
        owner, sep, leaf = name.rpartition(".base_layer.")
        tensor = full_tensor(param)
        if sep and owner in lora:
            layer = lora[owner]
            if leaf == "weight" and not layer.merged:
                tensor = (tensor.float() + _lora_delta(layer, tensor)).to(tensor.dtype)
            name = f"{owner}.{leaf}"
        yield name, tensor
