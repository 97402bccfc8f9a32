"""The trainer's optimizer: AdamW with torch's fused kernel where it applies, the same updates as the loop."""
import copy

import torch
from torch import nn

from fastalign.train.config import SFTConfig
from fastalign.train.optim import build_optimizer, fused_adam_ok


def test_fused_adamw_on_plain_cpu_parameters_only():
    model = nn.Linear(4, 3)
    opt = build_optimizer(list(model.parameters()), SFTConfig(weight_decay=0.1))
    assert all(g["fused"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices decay, the bias does not
    assert not fused_adam_ok([])
    assert not fused_adam_ok([nn.Parameter(torch.zeros(2, device="meta"))])  # no fused kernel for that device


def test_fused_adamw_steps_as_the_per_parameter_loop_does():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    b = copy.deepcopy(a)
    cfg = SFTConfig(learning_rate=1e-2, weight_decay=0.01)
    fused = build_optimizer(list(a.parameters()), cfg)
    loop = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.01},
                              {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-2, foreach=False)
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((a, fused), (b, loop)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
