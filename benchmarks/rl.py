"""Memory-bound RL ops over [B, T]: GAE, the PPO clipped policy loss, the clipped value loss and the k3 KL
penalty (the last three forward + backward).

GAE inputs: rewards ~ N(0, 1), values ~ N(0, 1), a response mask whose last positions (random length per row)
are 0; gamma 1.0, lam 0.95 (the defaults in docs/architecture.md, *The math*). Baseline: the Python loop over T
that TRL/verl-style trainers run, with verl's masking (masked positions carry the running advantage and the next
value). Only masked-in positions are compared. torch.compile is not applied to GAE: a compiled T-step loop
unrolls T (2048-4096).

PPO inputs: logp = old + N(0, 0.1) so ratios sit near 1 and a share are clipped, per-token advantages, the same
mask; clip 0.2, token-mean. Baselines: the eager PyTorch formula and its ``torch.compile`` (the PPO target in
docs/architecture.md, *Targets*, is against it).

Floor: bytes moved / copy bandwidth measured in the same run (fp32 everywhere; GAE reads rewards, values, mask
and writes advantages and returns; PPO fwd+bwd reads logp, old, advantages, mask and writes the logp gradient).
"""
from __future__ import annotations

import torch

import fastalign as fa
from fastalign.reference import rl as reference

from . import peers
from .runner import Case, Impl, Prepared
from .timing import measure_time

GAMMA, LAM, CLIP = 1.0, 0.95, 0.2
GRPO_BETA = 0.04  # the k3 KL coefficient of the GRPO losses (linear_losses.py, e2e.py)


def rl_inputs(b: int, t: int, device, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, t // 2), t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    old = -torch.rand(b, t, generator=g) * 8
    x = {
        "rewards": torch.randn(b, t, generator=g), "values": torch.randn(b, t, generator=g), "mask": mask,
        "old_logprobs": old, "logprobs": old + 0.1 * torch.randn(b, t, generator=g),
        "advantages": torch.randn(b, t, generator=g),
    }
    return {k: v.to(device) for k, v in x.items()}


def gae_python_loop(rewards, values, mask, gamma: float = GAMMA, lam: float = LAM):
    """The usual per-timestep loop (verl-style masking): the baseline every trainer ships."""
    t_len = rewards.shape[-1]
    nextvalues = torch.zeros_like(values[:, 0])
    lastgaelam = torch.zeros_like(values[:, 0])
    adv = []
    for t in reversed(range(t_len)):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        new = delta + gamma * lam * lastgaelam
        m = mask[:, t]
        nextvalues = values[:, t] * m + (1 - m) * nextvalues
        lastgaelam = new * m + (1 - m) * lastgaelam
        adv.append(lastgaelam)
    advantages = torch.stack(adv[::-1], dim=1)
    return advantages, advantages + values


def gae_truth(x: dict) -> dict:
    hp = torch.float64
    a, r = gae_python_loop(x["rewards"].to(hp), x["values"].to(hp), x["mask"].to(hp))
    m = x["mask"].to(hp)
    return {"advantages": a * m, "returns": r * m}


def _gae_prep(gae_fn):
    """Impl.prepare for ``gae_fn(rewards, values, mask) -> (advantages, returns)``; compared where masked in."""
    def prep(x):
        m = x["mask"]

        def step():
            adv, ret = gae_fn(x["rewards"], x["values"], m)
            return {"advantages": adv * m, "returns": ret * m}

        return Prepared(step)

    return prep


def gae_impls(device) -> list[Impl]:
    impls = []
    for backend in peers.fastalign_backends(device.type, op_family="rl"):
        fn = (lambda b: (lambda r, v, m: fa.gae(r, v, m, gamma=GAMMA, lam=LAM, backend=b)))(backend)
        impls.append(Impl(peers.backend_label(backend, device.type), "fastalign", _gae_prep(fn)))
    impls.append(Impl("Python loop over T (eager torch)", "python-loop", _gae_prep(gae_python_loop),
                      is_baseline=True))
    return impls


# ------------------------------------------------------------------------------- per-token losses, fwd + bwd
# Every loss below is f(a, b, c, mask) -> scalar on the PPO input layout, differentiated w.r.t. a = logprobs:
# PPO reads (logprobs, old_logprobs, advantages), the value loss reads them as (values, old values, returns),
# the KL penalty as (logprobs, ref_logprobs) and ignores the third.

def ppo_formula(logp, old, adv, mask, clip: float = CLIP):
    ratio = torch.exp(logp - old)
    per_token = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def value_formula(values, old, returns, mask, clip: float = CLIP):
    """Clipped value loss (verl compute_value_loss / TRL PPO vf_loss), token-mean."""
    v_clipped = old + torch.clamp(values - old, -clip, clip)
    per_token = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def kl_formula(logp, ref, mask):
    """k3 = exp(ref - logp) - (ref - logp) - 1 (TRL GRPO's per_token_kl), token-mean."""
    d = ref - logp
    return ((torch.exp(d) - d - 1) * mask).sum() / mask.sum().clamp(min=1.0)


def _kl_loss(logp, ref, _unused, mask):
    return kl_formula(logp, ref, mask)


def _fastalign_loss(op: str, backend: str):
    """fastalign's public op ``op`` as f(a, b, c, mask) on the PPO layout, on one backend."""
    if op == "ppo_policy_loss":
        return lambda lp, old, adv, m: fa.ppo_policy_loss(lp, old, adv, m, clip_low=CLIP, agg="token-mean",
                                                          backend=backend)[0]
    if op == "value_loss":
        return lambda v, old, ret, m: fa.value_loss(v, old, ret, m, clip=CLIP, agg="token-mean", backend=backend)[0]
    # the fused form: the estimator and the masked token-mean in one op (the peers: the eager formula, compiled)
    return lambda lp, ref, _unused, m: fa.kl_penalty(lp, ref, kind="k3", mask=m, agg="token-mean", backend=backend)


def _scalar_truth(formula):
    """fp64 loss and its gradient w.r.t. ``a`` (the ``logprobs`` input)."""
    def truth(x: dict) -> dict:
        hp = torch.float64
        a = x["logprobs"].to(hp).requires_grad_()
        loss = formula(a, x["old_logprobs"].to(hp), x["advantages"].to(hp), x["mask"].to(hp))
        (g,) = torch.autograd.grad(loss, a)
        return {"loss": loss.detach(), "grad_logprobs": g}

    return truth


def _loss_prep(loss_fn):
    def prep(x):
        logp = x["logprobs"].detach().clone().requires_grad_()

        def step():
            loss = loss_fn(logp, x["old_logprobs"], x["advantages"], x["mask"])
            loss.backward()
            return {"loss": loss.detach().reshape(()), "grad_logprobs": logp.grad}

        return Prepared(step, grad_to_none=[logp])

    return prep


def loss_impls(device, op: str, eager, *, compile_peers: bool) -> list[Impl]:
    """Implementations of the per-token loss ``op``: fastalign on each backend, the eager formula ``eager`` (the
    same-dtype baseline) and its torch.compile."""
    impls = []
    for backend in peers.fastalign_backends(device.type, op_family="rl"):
        impls.append(Impl(peers.backend_label(backend, device.type), "fastalign",
                          _loss_prep(_fastalign_loss(op, backend))))
    impls.append(Impl("eager torch formula", "naive", _loss_prep(eager), is_baseline=True))
    if compile_peers:
        impls.append(Impl("torch.compile(eager formula)", "compile", _loss_prep(torch.compile(eager))))
    else:
        impls.append(Impl("torch.compile(eager formula)", "compile", missing="not in this preset (compile time)"))
    return impls


# --------------------------------------------------------------------------------------------- GRPO (shared)

def grpo_bnpo_loss(logp, old, ref, adv, mask, beta: float = GRPO_BETA, clip: float = CLIP):
    """TRL GRPOTrainer's loss, loss_type="bnpo", token-level ratio, k3 KL (trl/trainer/grpo_trainer.py
    `_compute_loss`): the loss the non-fastalign rows (plain PyTorch, TRL) end with.

    Equal to :func:`grpo_truth_loss` (fastalign's reference) up to rounding, without the reference's
    sanitising and stats, which cost two to three times this formula on CPU in every peer's timed step.

    Args:
        logp, old, ref: (B, T) float per-token log-probs (policy, old policy, reference); adv: (B,) or (B, T);
        mask: (B, T) 0/1 float.
    Returns:
        () loss: the token-mean over the masked-in tokens.
    """
    adv = adv[:, None] if adv.dim() == 1 else adv
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - clip, 1 + clip)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = per_token + beta * kl
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_truth_loss(logp, old, ref, adv, mask, beta: float = GRPO_BETA, clip: float = CLIP):
    """The truth's GRPO loss from fastalign's reference: ``ppo_policy_loss`` (symmetric clip, token-mean) plus
    ``beta`` times the token-mean of the k3 ``kl_penalty``; same arguments as :func:`grpo_bnpo_loss`."""
    valid = mask != 0
    pg = reference.ppo_policy_loss(logp, old, adv, mask, clip_low=clip, clip_high=clip, agg="token-mean")[0]
    kl = reference.aggregate(reference.kl_penalty(logp, ref, kind="k3"), valid, "token-mean")
    return pg + beta * kl


# ----------------------------------------------------------------------------------------------------- cases

def copy_bandwidth(device: torch.device, nbytes: int, timer: str) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure_time(lambda: dst.copy_(src), device, budget_s=0.5, max_reps=20, timer=timer)
    del src, dst
    return 2 * nbytes / (t.min_ms / 1000.0)


def _bytes_floor(nbytes: int, device, bw_cache: dict, timer: str) -> dict:
    if "bw" not in bw_cache:  # the best copy rate seen: a floor must not be inflated by a noisy neighbour
        size = 1 << 30 if device.type == "cuda" else 1 << 27
        bw_cache["bw"] = copy_bandwidth(device, size, timer)
    bw = bw_cache["bw"]
    return {"ms": 1000.0 * nbytes / bw, "what": f"{nbytes / 2**20:.1f} MiB moved / measured copy bandwidth "
                                                 f"{bw / 1e9:.1f} GB/s", "bandwidth_gbs": bw / 1e9}


def cases(gae_specs: list[dict], ppo_specs: list[dict], device, *, compile_peers: bool,
          value_specs: list[dict] | None = None, kl_specs: list[dict] | None = None) -> list[Case]:
    bw_cache: dict = {}

    def case(name: str, spec: dict, truth, impls: list[Impl], arrays: int, notes: tuple[str, ...] = ()) -> Case:
        """``arrays``: the fp32 [B, T] arrays read or written, for the bytes floor."""
        b, t = spec["b"], spec["t"]
        return Case(suite="ops", name=name, params={"B": b, "T": t, "dtype": "float32"}, device=device,
                    dtype=torch.float32, tokens=b * t, make_inputs=lambda: rl_inputs(b, t, device), truth=truth,
                    impls=impls, floor=lambda x, timer: _bytes_floor(b * t * 4 * arrays, device, bw_cache, timer),
                    notes=list(notes))

    def losses(op: str, eager) -> tuple:
        return _scalar_truth(eager), loss_impls(device, op, eager, compile_peers=compile_peers)

    out = [case("gae", s, gae_truth, gae_impls(device), 5,
                ("torch.compile not applied: a compiled T-step loop unrolls T",)) for s in gae_specs]
    out += [case("ppo_policy_loss.fwd_bwd", s, *losses("ppo_policy_loss", ppo_formula), 5) for s in ppo_specs]
    out += [case("value_loss.fwd_bwd", s, *losses("value_loss", value_formula), 5,
                 ("clip 0.2, token-mean; reads values, old values, returns, mask, writes the values' gradient",))
            for s in value_specs or ()]
    out += [case("kl_penalty.fwd_bwd", s, *losses("kl_penalty", _kl_loss), 4,
                 ("k3 estimator, masked token-mean (fastalign: kl_penalty(mask=, agg='token-mean'), one fused op)",))
            for s in kl_specs or ()]
    return out
