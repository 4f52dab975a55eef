"""The batched update of B same-shape tensors equals B single-tensor (B = 1) updates.

Covers every protected role (``lora_a``, ``lora_b``, ``full`` tall and wide), shared spaces of
different sizes inside one batch (zero-padded stacks, one member without S), projector refreshes
(randomized, aligned), non-finite gradients in one member at a refresh and at the first refresh of
a task (which must poison nobody else: the other members' results equal a run without the bad
member), and the ZeRO driver's zero-copy strided views and cut tensors simulated in one process.
"""

from __future__ import annotations

import pytest
import torch

from gorp_ds.optim import GORP
from gorp_ds.zero.driver import ZeroDriver
from gorp_ds.zero.layout import FlatTensor, GroupLayout

B, GAP, RANK, STEPS = 4, 3, 2, 7
CASES = {"lora_a": (3, 12), "lora_b": (12, 3), "full": (12, 7), "full_wide": (6, 14)}


def _orthonormal(d: int, s: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, s, generator=torch.Generator().manual_seed(seed)))
    return q


def _group(role: str, params: list[torch.nn.Parameter], names: list[str]) -> dict:
    group = {"params": params, "names": names, "role": "full" if role.startswith("full") else role, "lr": 1e-2}
    if group["role"] == "full":
        group.update(rank=RANK, update_gap=GAP, scale=0.5, projector="randomized")
    return group


def _shared_side_dim(role: str, shape: tuple[int, int]) -> int:
    m, n = shape
    if role == "lora_a":
        return n
    if role == "lora_b":
        return m
    return m if m >= n else n


def _run(role: str, members: list[int], bad: dict[int, int] | None = None) -> dict[int, dict]:
    """Train members (indices into a fixed pool of B tensors) in ONE optimizer for STEPS steps of a
    second task (S set per member: widths 0, 1, 3, 5). ``bad`` maps member -> step with a NaN grad."""
    shape = CASES[role]
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(shape, generator=gen) for _ in range(B)]
    grads = [[torch.randn(shape, generator=gen) for _ in range(B)] for _ in range(STEPS)]
    names = [f"layers.{i}.{role}" for i in members]
    params = [torch.nn.Parameter(init[i].clone()) for i in members]
    opt = GORP([_group(role, params, names)], weight_decay=0.05)
    opt.tasks_completed += 1  # a second task: seeds depend on it
    d = _shared_side_dim(role, shape)
    for name, i in zip(names, members):
        width = (0, 1, 3, 5)[i]
        if width:
            opt.shared[name] = _orthonormal(d, width, seed=i)
    history: dict[int, dict] = {i: {"w": [], "projector": [], "init": init[i].clone()} for i in members}
    for step in range(STEPS):
        for p, i in zip(params, members):
            g = grads[step][i].clone()
            if bad and bad.get(i) == step:
                g[0, 1] = float("nan")
            p.grad = g
        opt.step()
        for p, name, i in zip(params, names, members):
            history[i]["w"].append(p.detach().clone())
            history[i]["projector"].append(opt.state[name].get("projector", torch.empty(0)).clone())
    for name, i in zip(names, members):
        history[i]["state"] = {k: v.clone() for k, v in opt.state[name].items()}
    history["stats"] = opt.stats  # type: ignore[index]
    return history


def _assert_same(batched: dict, single: dict, what: str) -> None:
    for step, (a, b) in enumerate(zip(batched["w"], single["w"], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, s=step: f"{what} step {s}: {m}")
    for step, (a, b) in enumerate(zip(batched["projector"], single["projector"], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, s=step: f"{what} projector step {s}: {m}")
    assert batched["state"].keys() == single["state"].keys(), what
    for key in batched["state"]:
        torch.testing.assert_close(batched["state"][key], single["state"][key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("role", list(CASES))
def test_batch_equals_single_tensor_updates(role):
    batched = _run(role, list(range(B)))
    for i in range(B):
        _assert_same(batched[i], _run(role, [i])[i], f"{role} member {i}")
    # the trajectories really differ between members (S widths, seeds), and moved
    assert not torch.allclose(batched[0]["w"][-1], batched[3]["w"][-1])
    if role.startswith("full"):
        assert int(batched[0]["state"]["step"]) == STEPS
        assert batched["stats"]["refreshes"] == B * 3  # steps 0, 3, 6


@pytest.mark.parametrize("role", list(CASES))
@pytest.mark.parametrize("bad_step", [0, GAP], ids=["first-refresh", "later-refresh"])
def test_non_finite_member_poisons_nobody(role, bad_step):
    """Member 1 gets a NaN gradient at a refresh step: the others equal a run without it."""
    batched = _run(role, list(range(B)), bad={1: bad_step})
    without = _run(role, [0, 2, 3])
    for i in (0, 2, 3):
        _assert_same(batched[i], without[i], f"{role} member {i} next to a NaN member")
        assert torch.isfinite(batched[i]["w"][-1]).all()
    bad = batched[1]
    if not role.startswith("full"):
        return
    assert batched["stats"]["projector_failures"] == 1
    assert int(bad["state"]["projector_failures"]) == 1
    if bad_step == 0:  # no projector to keep: the member's step is skipped, it starts one step late
        assert torch.equal(bad["w"][0], bad["init"])  # its first step left it untouched
        assert int(bad["state"]["step"]) == STEPS - 1
        assert bad["projector"][0].numel() == 0 and bad["projector"][1].numel() > 0
        assert torch.isfinite(bad["w"][-1]).all()
        # and it then equals a single-tensor run that started one step later on the same gradients
        single_bad = _run(role, [1], bad={1: 0})[1]
        _assert_same(bad, single_bad, f"{role} member 1 after a failed first refresh")
    else:  # the previous projector is kept (bit for bit)
        assert torch.equal(bad["projector"][bad_step], bad["projector"][bad_step - 1])


# ----------------------------------------------------------------------------- ZeRO driver views


def _zero_fixture():
    """4×6 lora_A-like tensors, alternating 8×3 / 5×3 lora_B-like ones and 9×5 full ones."""
    gen = torch.Generator().manual_seed(3)
    groups = {
        "lora_a": [(f"a{i}", (4, 6)) for i in range(12)],
        "lora_b": [(f"b{i}", (8, 3) if i % 2 == 0 else (5, 3)) for i in range(14)],
        "full": [(f"f{i}", (9, 5)) for i in range(9)],
    }
    init = {name: torch.randn(shape, generator=gen) for tensors in groups.values() for name, shape in tensors}
    grads = [{name: torch.randn(t.shape, generator=gen) for name, t in init.items()} for _ in range(5)]
    return groups, init, grads


def _build(groups, init):
    params = {name: torch.nn.Parameter(t.clone()) for name, t in init.items()}
    opt = GORP([_group(role, [params[n] for n, _ in tensors], [n for n, _ in tensors]) for role, tensors in groups.items()],
               weight_decay=0.02)
    return opt, params


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero_driver_views_and_cut_tensors_equal_local_driver(world):
    """Each rank's driver (strided zero-copy batches, cut tensors with their full gradient from a
    simulated all-reduce) updates its partition; stitched together they equal the LocalDriver."""
    groups, init, grads = _zero_fixture()
    reference, ref_params = _build(groups, init)
    ranks = []
    for rank in range(world):
        opt, params = _build(groups, init)
        layouts, flats = [], []
        for group in opt.param_groups:
            tensors, offset = [], 0
            for name in group["names"]:
                tensors.append(FlatTensor(name, tuple(params[name].shape), offset))
                offset += params[name].numel()
            padded = -(-offset // world) * world
            layout = GroupLayout(tuple(tensors), padded // world, world)
            flat = torch.zeros(padded)
            for t in tensors:
                flat[t.offset : t.offset + t.numel] = params[t.name].detach().reshape(-1)
            part = torch.nn.Parameter(flat[rank * layout.partition_size : (rank + 1) * layout.partition_size].clone())
            group["params"] = [part]  # what DeepSpeed does
            layouts.append(layout)
            flats.append(part)
        ranks.append((opt, layouts, flats))
    for step_grads in grads:
        for name, p in ref_params.items():
            p.grad = step_grads[name].clone()
        reference.step()
        for rank, (opt, layouts, flats) in enumerate(ranks):
            full_flats = []
            for layout, part in zip(layouts, flats):
                full = torch.zeros(layout.partition_size * world)
                for t in layout.tensors:
                    full[t.offset : t.offset + t.numel] = step_grads[t.name].reshape(-1)
                full_flats.append(full)
                part.grad = full[rank * layout.partition_size : (rank + 1) * layout.partition_size].clone()
            cut_sums = iter([torch.cat([step_grads[t.name].reshape(-1) for t in layout.cut_tensors()])
                             for layout in layouts if layout.cut_tensors()])
            opt.driver = ZeroDriver(layouts, rank, lambda buffer, sums=cut_sums: buffer.copy_(next(sums)))
            opt.step()
    batched = 0
    for group_index, layout in enumerate(ranks[0][1]):
        stitched = torch.cat([flats[group_index].detach() for _, _, flats in ranks])
        for t in layout.tensors:
            got = stitched[t.offset : t.offset + t.numel].view(t.shape)
            torch.testing.assert_close(got, ref_params[t.name].detach(), rtol=1e-6, atol=1e-6, msg=t.name)
    for opt, _, _ in ranks:
        batched += sum(len(b.names) > 1 for batches in opt.driver.whole for b in batches)
    assert batched >= 3 * world, "the fixture must exercise multi-member strided batches"
    if world > 1:
        assert any(layout.cut_tensors() for layout in ranks[0][1])
