"""fastalign inside the trainers people already use.

- :mod:`fastalign.integrations.trl`: ``enable()`` swaps the fused LM head of TRL's trainers (DPO, GRPO, SFT, KTO,
  RLOO) for fastalign's; TRL's loss math, PEFT, FSDP and MoE handling stay TRL's.
- :mod:`fastalign.integrations.transformers`: ``patch(model)`` gives any Hugging Face causal LM a forward that
  returns the cross-entropy loss from the fused head, without logits (``fastalign.patch`` is the same function).

Neither module imports TRL, transformers or peft until it is used.
"""
