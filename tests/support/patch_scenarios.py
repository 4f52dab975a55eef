"""Scenarios run on spawned gloo ranks by test_deepspeed_patches.py: each patch of
``gorp_ds/zero/deepspeed_patches.py`` applied to a small DeepSpeed engine (fp32, a torch SGD inside
ZeRO instead of GORP) with a recording stand-in for the projected targets, so that what is checked is
DeepSpeed's side of the contract: when it calls the patched method, and what it does with the result.

Every rank feeds the same batch, so the data-parallel average of the gradients is the gradient of
one process (``reference_gradients``) and the expected SGD update is computable beside DeepSpeed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

LR = 0.5
CLIP = 1.0
R_NORM = 3.0  # ‖R‖ of the stand-in targets: large enough that the combined norm clips
PERSISTENCE = 100  # ZeRO-3: parameters below this many elements stay gathered ("persistent")


class Net(nn.Module):
    """Under ZeRO-3 every tensor but ``large.weight`` (160 elements) stays gathered ("persistent").
    ``frozen`` is trained outside DeepSpeed's sub-groups, as the projected targets are."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = nn.Linear(3, 4)
        self.large = nn.Linear(4, 40)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.large(torch.tanh(self.small(x + self.frozen(x))))

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def batch(micro: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, 6).reshape(2, 3) * (micro + 1)


def loss_of(module: nn.Module, micro: int) -> torch.Tensor:
    return module(batch(micro)).square().mean()


def reference_gradients(micro_batches: int) -> list[torch.Tensor]:
    """Gradients of one process (zero for frozen tensors), averaged over the micro-batches as
    DeepSpeed's loss scaling does; in ``Net.parameters()`` order."""
    model = Net()
    for micro in range(micro_batches):
        (loss_of(model, micro) / micro_batches).backward()
    return [p.grad.clone() if p.requires_grad else torch.zeros_like(p) for p in model.parameters()]


class StepMark:
    """Stands in for GORP's non-finite mark: ``step()`` with every group empty counts a skipped step."""

    def __init__(self) -> None:
        self.skip_next_step = False
        self.counted = 0

    def step(self, closure: Any = None) -> None:
        self.counted += 1
        self.skip_next_step = False


class RecordingTargets:
    """Stands in for LowRankTargets: ``‖R‖ = R_NORM``; records every call, in order."""

    def __init__(self, mark: StepMark, on_step: Any = None) -> None:
        self.optimizer = mark
        self.flat_low_rank = torch.tensor([R_NORM])
        self.total_norm: torch.Tensor | None = None
        self.calls: list[Any] = []
        self.on_step = on_step

    def reduce_(self) -> None:
        self.calls.append("reduce")

    def squared_norm(self) -> torch.Tensor:
        self.calls.append("norm")
        return self.flat_low_rank.square().sum()

    def step_(self, clip: float) -> None:
        self.calls.append(("step", clip, float(self.total_norm)))
        if self.on_step is not None:
            self.on_step()

    def undo_refreshes(self) -> None:
        self.calls.append("undo")

    def reset(self) -> None:
        self.calls.append("reset")


def _config(stage: int, world: int, gas: int) -> dict:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=PERSISTENCE, stage3_max_live_parameters=0,
                    stage3_prefetch_bucket_size=0)
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
            "steps_per_print": 10_000, "zero_allow_untested_optimizer": True, "zero_optimization": zero}


def _expected_update(grads: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """The combined norm ``√(‖g‖² + ‖R‖²)`` and SGD's update clipped by it."""
    norm = float(torch.sqrt(sum(g.square().sum() for g in grads) + R_NORM**2))
    coefficient = max(1.0, (norm + 1e-6) / CLIP)
    return norm, [-LR * g / coefficient for g in grads]


def _poison(model: nn.Module) -> Any:
    return model.large.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))


def flat_facts(rank: int, world: int) -> dict:
    """ZeRO-2: the combined norm clips DeepSpeed's partitions, the targets step after DeepSpeed's
    step (not after an overflow), and R is reduced first and reset last."""
    import deepspeed

    from gorp_ds.zero import deepspeed_patches as patches

    model = Net()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.trainable(), lr=LR),
                                      config=_config(2, world, gas=1))
    mark = StepMark()
    targets = RecordingTargets(mark)
    patches.combine_flat_norm_with_targets(engine.optimizer, targets)
    patches.step_targets_after_flat_step(engine.optimizer, targets)
    norm, update = _expected_update(reference_gradients(1))
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(loss_of(engine.module, 0))
    engine.step()
    facts: dict[str, Any] = {
        "norm": norm,
        "update_error": max(float((p.detach() - b - u).abs().max()) for p, b, u in zip(model.parameters(), before, update)),
        "reported_norm": float(engine.get_global_grad_norm()),
        "total_norm": float(targets.total_norm),
        "calls": list(targets.calls),
    }
    targets.calls.clear()
    hook = _poison(model)
    engine.backward(loss_of(engine.module, 0))
    engine.step()
    hook.remove()
    facts["overflow_calls"] = list(targets.calls)
    engine.destroy()
    return facts


def stage3_facts(rank: int, world: int) -> dict:
    """ZeRO-3 with two micro-batches per step and the module called directly (as the trainer does)."""
    import deepspeed

    from gorp_ds.zero import deepspeed_patches as patches

    model = Net()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.trainable(), lr=LR),
                                      config=_config(3, world, gas=2))
    zero = engine.optimizer
    target = model.frozen.weight

    def bump_persistent_partition() -> None:  # a target updating its own partition during _post_step
        target.ds_tensor.data.add_(1.0)

    mark = StepMark()
    targets = RecordingTargets(mark, on_step=bump_persistent_partition)
    patches.hook_gorp_into_stage3_step(zero, mark, targets)
    patches.count_micro_steps_in_backward(engine)
    facts: dict[str, Any] = {"persistent": [bool(p.ds_persist) for p in model.parameters()]}

    def whole() -> list[torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return [p.detach().clone() for p in model.parameters()]

    def train_step() -> None:
        for micro in range(2):
            engine.backward(loss_of(engine.module, micro))
            engine.step()

    norm, update = _expected_update(reference_gradients(2))
    before = whole()
    train_step()
    after = whole()
    bumped = [1.0 if p is target else 0.0 for p in model.parameters()]
    facts.update(
        norm=norm,
        update_error=max(float((a - b - u - k).abs().max()) for a, b, u, k in zip(after, before, update, bumped)),
        reported_norm=float(engine.get_global_grad_norm()),
        total_norm=float(targets.total_norm),
        calls=list(targets.calls),
    )
    # A marked step: no sub-group steps, the skip is counted once, the targets do not step.
    targets.calls.clear()
    mark.skip_next_step = True
    train_step()
    facts.update(skip_change=max(float((a - b).abs().max()) for a, b in zip(whole(), after)),
                 skip_counted=mark.counted, skip_calls=list(targets.calls))
    # An overflow: DeepSpeed returns before _post_step, so the targets do not step either.
    targets.calls.clear()
    hook = _poison(model)
    train_step()
    hook.remove()
    facts["overflow_calls"] = list(targets.calls)
    # The module hooks: off inside (whole parameters, no gather per module), back afterwards.
    offload = zero.parameter_offload

    def module_hooks() -> int:  # hooks registered on the modules, DeepSpeed's among them
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    facts["hooks_before"] = (len(offload.forward_hooks), len(offload.backward_hooks), module_hooks())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        with patches.stage3_module_hooks_removed(engine):
            facts["hooks_inside"] = (len(offload.forward_hooks), len(offload.backward_hooks), module_hooks())
            with torch.no_grad():
                facts["output_inside"] = model(batch(0)).clone()
    facts["hooks_after"] = (len(offload.forward_hooks), len(offload.backward_hooks), module_hooks())
    with torch.no_grad():
        facts["output_after"] = model(batch(0)).clone()  # DeepSpeed's hooks gather the partitioned weight again
    facts["partitioned_after"] = model.large.weight.numel() == 0
    engine.destroy()
    return facts


def shm_facts() -> dict:
    """The shared-memory files this rank maps (DeepSpeed's CPU all-reduce buffers; run_ranks has
    unlinked its own with deepspeed_patches.unlink_cpu_allreduce_buffer), and the group's port."""
    with open("/proc/self/maps") as handle:
        mapped = sorted({line.rstrip("\n").split(None, 5)[-1] for line in handle if "deepspeed_allreduce_buffer_" in line})
    return {"mapped": mapped, "port": os.environ["MASTER_PORT"]}


def patch_facts(rank: int, world: int) -> dict:
    return {"flat": flat_facts(rank, world), "stage3": stage3_facts(rank, world), "shm": shm_facts()}
