"""The plain-PyTorch LM head of the accuracy rule's same-dtype baseline: what a user would write."""
import torch

import fastalign as fa


def plain_logits(h, w, *, bias=None, softcap=None, logit_scale=1.0):
    """The model's logits in the inputs' dtype: h W^T (+ bias), times logit_scale, then the softcap."""
    logits = h @ w.T
    if bias is not None:
        logits = logits + bias
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def plain_torch(h, w, labels, *, bias=None, temperature=1.0, softcap=None, logit_scale=1.0, return_entropy=False):
    """Logits in the inputs' dtype, the softmax in fp32: (logprobs, entropy or None)."""
    logits = plain_logits(h, w, bias=bias, softcap=softcap, logit_scale=logit_scale)
    out = fa.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=return_entropy)
    return out.logprobs, out.entropy
