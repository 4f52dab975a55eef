"""Operators one GORP step dispatches on SmolLM2-135M's 120 q/v LoRA factors, with S in use,
against ``torch.optim.AdamW(foreach=True)`` on the same tensors (counted with a TorchDispatchMode).

SmolLM2-135M: 30 layers, hidden 576, q_proj 576→576, v_proj 576→192, LoRA r = 8: 60 lora_A (8×576),
30 lora_B (576×8) and 30 lora_B (192×8). On a CPU, foreach kernels count once per call, so the
count measures how many kernels the Python side launches per step: stacking same-shape tensors is
what keeps GORP's count low, and AdamW pays nothing for being a list.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gorp_ds.optim import GORP

LAYERS, HIDDEN, V_OUT, R = 30, 576, 192, 8


class OperatorCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def smollm2_lora_factors() -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for layer in range(LAYERS):
        for proj, out in (("q_proj", HIDDEN), ("v_proj", V_OUT)):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            factors[f"{prefix}.lora_A"] = torch.nn.Parameter(torch.randn(R, HIDDEN, generator=gen) * 0.02)
            factors[f"{prefix}.lora_B"] = torch.nn.Parameter(torch.randn(out, R, generator=gen) * 0.02)
    return factors


def _set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_gorp_step_dispatches_at_most_twice_adamw_foreach():
    factors = smollm2_lora_factors()
    assert len(factors) == 120
    a = {n: p for n, p in factors.items() if n.endswith("lora_A")}
    b = {n: p for n, p in factors.items() if n.endswith("lora_B")}
    opt = GORP([{"params": list(a.values()), "names": list(a), "role": "lora_a"},
                {"params": list(b.values()), "names": list(b), "role": "lora_b"}], lr=1e-3, shared_threshold=0.9)
    for step in range(4):  # task 1
        _set_grads(factors.values(), step)
        opt.step()
    sizes = opt.end_task()
    assert len(sizes) == 120 and min(sizes.values()) >= 1  # S is in use for every factor
    _set_grads(factors.values(), 10)
    with OperatorCounter() as first:  # first step of task 2: stacks are (re)built
        opt.step()
    _set_grads(factors.values(), 11)
    with OperatorCounter() as gorp:
        opt.step()

    adamw_params = [torch.nn.Parameter(p.detach().clone()) for p in factors.values()]
    adamw = torch.optim.AdamW(adamw_params, lr=1e-3, foreach=True)
    _set_grads(adamw_params, 10)
    adamw.step()
    _set_grads(adamw_params, 11)
    with OperatorCounter() as reference:
        adamw.step()

    report = (f"one step on 120 SmolLM2 q/v LoRA factors with S in use: GORP {gorp.total} operators "
              f"(first step of the task {first.total}), AdamW(foreach=True) {reference.total}; "
              f"GORP's: {dict(gorp.ops.most_common())}")
    print(report)
    assert gorp.total <= 2 * reference.total, report
    # the count is per stack, not per tensor: no per-tensor kernels remain on the step path
    assert max(gorp.ops.values()) < 120, report
