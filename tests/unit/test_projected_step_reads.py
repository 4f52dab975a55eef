"""Host reads of device values on GORP's projected path (the path of bench/zero_gorp.py's ``gorp``):
the backward's low-rank gradients and refreshes (``LowRankTargets.linear_backward``), the clipped
low-rank step and the split-master update (``reduce_``, ``step_``, ``reset``).

On a GPU every read of a device value into Python (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``torch.nonzero``) waits for the device, and a step that waits stops overlapping the
host's launches with the device's work. The optimizer's docstring promises none on the step path
except the first refresh of a task (one read of the success flags per refreshed batch) and torch's
own ``eigh``/``svd`` error checks (inside the operator, not counted here). On a CPU every tensor is
a host tensor, so the test tells device values from the step counters the optimizer keeps on the
host by storage: a read is allowed only of ``StateStack.buffers["step"]`` and ``tasks_completed``.
Reads are caught where they dispatch (``_local_scalar_dense``, ``is_nonzero``, ``nonzero``) and at
``Tensor.tolist`` (which does not dispatch).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gorp_ds.optim import GORP
from gorp_ds.zero.lowrank_targets import LowRankTargets, claim_targets

READ_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "item")
LAYERS, N, K, T = 5, 16, 3, 3


class DeviceReads(TorchDispatchMode):
    """Records each read of a tensor value into Python whose storage is not in ``host``'s list
    (a callable giving the storages that legitimately live on the host)."""

    def __init__(self, host, monkeypatch) -> None:
        super().__init__()
        self.host, self.reads = host, []
        tolist = torch.Tensor.tolist

        def recording_tolist(tensor, *args, **kwargs):
            self._check("tolist", tensor)
            return tolist(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "tolist", recording_tolist)

    def _check(self, what: str, tensor: torch.Tensor) -> None:
        if tensor.untyped_storage().data_ptr() not in self.host():
            self.reads.append((what, tuple(tensor.shape)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in READ_OPS:
            self._check(func.overloadpacket.__name__, args[0])
        return func(*args, **(kwargs or {}))


def _projected_setup(schedule: str, refresh_from: str):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(N, N, bias=False) for _ in range(LAYERS)]).to(torch.bfloat16)
    names = [str(i) for i in range(LAYERS)]
    opt = GORP([{"params": list(model.parameters()), "names": names, "role": "full", "lr": 1e-2, "rank": K,
                 "update_gap": T, "refresh_schedule": schedule, "weight_decay": 0.1}])
    targets = LowRankTargets(opt, claim_targets(opt.detach_groups("full"), model), rank=0, world=1,
                             all_reduce=lambda t: None, is_boundary=lambda: True, accumulation=1,
                             refresh_from=refresh_from)
    return model, opt, targets


def _host_storages(opt: GORP):
    def storages() -> set[int]:
        held = {opt.tasks_completed.untyped_storage().data_ptr()}
        held.update(s.buffers["step"].untyped_storage().data_ptr() for s in opt._stacks.values() if s.buffers)
        return held
    return storages


def _step(model: nn.Module, targets: LowRankTargets, x: torch.Tensor) -> None:
    """One training step as the ZeRO-2 patches drive it (deepspeed_patches): backward, the R
    all-reduce, the combined clipping norm, the clipped low-rank step, reset."""
    model(x).float().square().mean().backward()
    targets.reduce_()
    targets.total_norm = torch.sqrt(targets.squared_norm())
    targets.step_(1.0)
    targets.reset()


@pytest.mark.parametrize("refresh_from", ["gradient", "sketch"])
@pytest.mark.parametrize("schedule", ["cycle", "spread"])
def test_projected_steps_read_no_device_value_after_the_first_refresh(schedule, refresh_from, monkeypatch):
    model, opt, targets = _projected_setup(schedule, refresh_from)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 6, N, generator=g).to(torch.bfloat16) for _ in range(3 * T + 1)]
    counter = DeviceReads(_host_storages(opt), monkeypatch)
    per_step = []
    for x in inputs:
        counter.reads = []
        with counter:
            _step(model, targets, x)
        per_step.append(list(counter.reads))
    # Step 0 is every member's first refresh of the task: the documented read of the success
    # flags, once per refreshed batch (the sketch refreshes layer by layer), nothing else.
    first = per_step[0]
    assert all(what == "tolist" and len(shape) == 1 for what, shape in first), first
    assert len(first) == (1 if refresh_from == "gradient" else LAYERS), first
    # Every later step, refresh steps of either schedule included, reads no device value.
    assert all(not reads for reads in per_step[1:]), per_step
    # The steps did train: refreshes happened after step 0 and the weights moved.
    assert opt.refresh_count > LAYERS
    targets.remove()


def test_the_read_detector_sees_device_values(monkeypatch):
    """The detector itself: reads of a non-counter tensor through float(), bool(), .item() and
    .tolist() are recorded; reads of the step counters are not."""
    model, opt, targets = _projected_setup("cycle", "gradient")
    _step(model, targets, torch.randn(4, 6, N).to(torch.bfloat16))
    counter = DeviceReads(_host_storages(opt), monkeypatch)
    with counter:
        value = targets.flat_low_rank.sum()
        float(value), bool(value > 0), value.item(), targets.flat_low_rank[:2].tolist()
        next(iter(opt._stacks.values())).steps()  # a host counter: allowed
        int(opt.tasks_completed)
    assert len(counter.reads) == 4 and counter.reads[-1] == ("tolist", (2,)), counter.reads
    targets.remove()
