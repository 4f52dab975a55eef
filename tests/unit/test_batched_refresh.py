"""Projector refreshes of same-shape ``full`` targets on the projected path, batched across layers.

A residual stack of four blocks whose four up-projections (20 × 12, right projection) are ``full``
targets, trained on one process by :class:`LowRankTargets` (the owner the ZeRO distributors install) and,
as the reference, by the single-process GORP fed with the full gradients ``G`` of an identical model.
Every refresh mode must follow the reference step for step (refresh steps 0, 3, 6 and a task
boundary included), and the batching must be real: one ``refresh_members`` call per chunk of layers
instead of one per layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gorp_ds.optim import GORP
from gorp_ds.zero.lowrank_targets import LowRankTargets, claim_targets

LAYERS, WIDTH, HIDDEN, STEPS, GAP, TASK_END = 4, 12, 20, 8, 3, 4
G_MIB = HIDDEN * WIDTH * 4 / 2**20  # one fp32 G


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = nn.ModuleList(nn.Linear(WIDTH, HIDDEN, bias=False) for _ in range(LAYERS))
        self.down = nn.ModuleList(nn.Linear(HIDDEN, WIDTH, bias=False) for _ in range(LAYERS))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.down.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(WIDTH))  # a plain tensor, as LoRA factors would be

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, down in zip(self.up, self.down):
            x = x + down(torch.tanh(up(x)))
        return x * self.scale


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, WIDTH, generator=g), torch.randn(16, WIDTH, generator=g)


def optimizer(model: Stack) -> GORP:
    names = [f"up.{i}" for i in range(LAYERS)]
    return GORP([{"params": [model.scale], "names": ["scale"], "role": "plain", "lr": 1e-2},
                 {"params": [m.weight for m in model.up], "names": names, "role": "full", "lr": 5e-2, "rank": 3,
                  "update_gap": GAP, "scale": 0.5, "projector": "randomized"}], shared_threshold=0.9)


def weights(model: Stack) -> torch.Tensor:
    return torch.cat([m.weight.detach().reshape(-1) for m in model.up] + [model.scale.detach()])


def train(model: Stack, opt: GORP, targets: LowRankTargets | None = None) -> list[torch.Tensor]:
    """The weights after each step; with ``targets``, the ``full`` tensors step through them."""
    trajectory = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(step)
        (model(x) - y).pow(2).mean().backward()
        if targets is not None:
            targets.reduce_()
            targets.step_(0.0)
        opt.step()
        if targets is not None:
            targets.reset()
        if step + 1 == TASK_END:
            opt.end_task()
        trajectory.append(weights(model))
    return trajectory


def reference() -> list[torch.Tensor]:
    """The single-process GORP fed with the full gradients G."""
    model = Stack()
    return train(model, optimizer(model))


def projected(refresh_from: str, memory_mib: float) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The trajectory through LowRankTargets, and the members of every ``refresh_members`` call."""
    model = Stack()
    opt = optimizer(model)
    owned = opt.detach_groups("full")
    targets = LowRankTargets(opt, claim_targets(owned, model), rank=0, world=1, all_reduce=lambda t: None,
                             is_boundary=lambda: True, accumulation=1, refresh_from=refresh_from,
                             refresh_memory_mib=memory_mib)
    calls: list[list[int]] = []
    original = opt.refresh_members

    def counting(names, index, grads, cfg, products=None):
        calls.append(list(index))
        return original(names, index, grads, cfg, products)

    opt.refresh_members = counting
    trajectory = train(model, opt, targets)
    targets.remove()
    return trajectory, calls


@pytest.fixture(scope="module")
def expected() -> list[torch.Tensor]:
    return reference()


# (refresh_from, budget in MiB, the refresh_members calls of one refresh step)
MODES = [
    ("gradient", 1024.0, [[0, 1, 2, 3]]),  # all four layers in one batch
    ("gradient", 2.5 * G_MIB, [[2, 3], [0, 1]]),  # the budget holds two G's: chunks met last layer first
    ("gradient", 0.5 * G_MIB, [[3], [2], [1], [0]]),  # smaller than one G: one at a time
    ("auto", 1024.0, [[0, 1, 2, 3]]),  # fits: batched from G
    ("auto", 3.5 * G_MIB, [[3], [2], [1], [0]]),  # does not fit: the sketch, layer by layer
    ("sketch", 1024.0, [[3], [2], [1], [0]]),
]


@pytest.mark.parametrize("refresh_from, memory_mib, per_refresh", MODES)
def test_every_refresh_mode_follows_the_single_process_reference(expected, refresh_from, memory_mib, per_refresh):
    trajectory, calls = projected(refresh_from, memory_mib)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(trajectory, expected)]
    assert max(errors) <= 1e-5, f"{refresh_from} {memory_mib:.4f} MiB: relative errors {errors}"
    refresh_steps = len(range(0, TASK_END, GAP)) + len(range(0, STEPS - TASK_END, GAP))  # counters restart per task
    assert calls == per_refresh * refresh_steps
    moved = float((trajectory[-1] - expected[0]).norm() / expected[0].norm())
    assert moved > 1e-3, "the run must actually train (else every mode trivially agrees)"


def test_select_of_every_member_in_another_order_is_that_order():
    """The optimizer's stacked-state selection: all members, permuted, is not the stack itself."""
    from gorp_ds.optim.stacks import select

    stack = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(select(stack, [2, 0, 1], 3), stack[[2, 0, 1]])
    assert select(stack, [0, 1, 2], 3) is stack
