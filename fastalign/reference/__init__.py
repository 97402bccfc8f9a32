"""Pure-PyTorch references: the spec for every fused op, and the CPU path. One module per op family (logprobs,
rl, preference, linear_losses)."""
from fastalign.reference.logprobs import (  # noqa: F401
    linear_logprobs_backward,
    linear_logprobs_forward,
    linear_logprobs_naive,
    logprobs_from_logits,
)
