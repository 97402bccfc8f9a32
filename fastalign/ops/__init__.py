"""Public autograd-aware ops, one module per family."""
from fastalign.ops.logprobs import (  # noqa: F401
    HeadPlan,
    LogprobsOutput,
    last_head_plan,
    linear_logprobs,
    logprobs_from_logits,
)
from fastalign.ops.rl import gae, group_advantages, kl_penalty, ppo_policy_loss, value_loss  # noqa: F401
from fastalign.ops.preference import dpo_loss, reward_loss, sequence_logprobs  # noqa: F401
from fastalign.ops.linear_losses import (  # noqa: F401
    linear_dpo_loss,
    linear_policy_loss,
    linear_sequence_logprobs,
)

__all__ = ["HeadPlan", "LogprobsOutput", "last_head_plan", "linear_logprobs", "logprobs_from_logits"]
__all__ += ["gae", "group_advantages", "kl_penalty", "ppo_policy_loss", "value_loss"]
__all__ += ["dpo_loss", "reward_loss", "sequence_logprobs"]
__all__ += ["linear_dpo_loss", "linear_policy_loss", "linear_sequence_logprobs"]
