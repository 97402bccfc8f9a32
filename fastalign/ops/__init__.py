"""Public autograd-aware ops, one module per family."""
from fastalign.ops.logprobs import LogprobsOutput, linear_logprobs, logprobs_from_logits  # noqa: F401

__all__ = ["LogprobsOutput", "linear_logprobs", "logprobs_from_logits"]
