"""``plain`` role == ``torch.optim.AdamW(foreach=False)`` (docs/algorithm.md §1)."""

from __future__ import annotations

import pytest
import torch

from gorp_ds.optim import GORP

SHAPES = [(7,), (5, 3), (3, 8), (2, 3, 4)]


def _loss(params, x):
    # a coupled non-quadratic loss so that the gradients depend on the trajectory
    total = 0.0
    for p in params:
        flat = p.reshape(-1)
        total = total + (torch.tanh(flat * x[: flat.numel()]) ** 2).sum() + 0.3 * (flat**3).sum().abs()
    return total


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.95)])
def test_plain_equals_torch_adamw(weight_decay, betas):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    lr, eps = 3e-2, 1e-8
    opt = GORP([{"params": ours, "names": [f"p{i}" for i in range(len(ours))], "role": "plain"}],
               lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ref = torch.optim.AdamW(theirs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    for step in range(20):
        x = torch.randn(64, generator=torch.Generator().manual_seed(step))
        for params, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _loss(params, x).backward()
            o.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)  # addcdiv vs div+add: ~1 ulp
    # the parameters really moved (a no-op optimizer would fail above only if AdamW also did nothing)
    assert all((a.detach() - t).abs().max() > 0.1 for a, t in zip(ours, init, strict=True))
    # and the moments are AdamW's too (gradients are taken at parameters that differ by ~1 ulp)
    for i, b in enumerate(theirs):
        for key in ("exp_avg", "exp_avg_sq"):
            expected = ref.state[b][key]
            torch.testing.assert_close(opt.state[f"p{i}"][key], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        assert int(opt.state[f"p{i}"]["step"]) == 20
