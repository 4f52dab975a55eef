"""Learning-rate schedules (gorp_ds/optim/schedule.py, role_scheduler.py): the factor per step against
tables written out by hand, the rates read back from GORP's param groups of every role as a
single-process run steps (per task and per sequence, over two tasks), the update using them (plain
GORP against torch's AdamW under the same schedule), and a mid-warmup state reload continuing exactly."""

from __future__ import annotations

import math

import pytest
import torch

from gorp_ds.optim import GORP
from gorp_ds.optim.param_group import ROLES
from gorp_ds.optim.role_scheduler import RoleScheduler
from gorp_ds.optim.schedule import SCHEDULE_ROLES, Schedule, lr_factor, warmup_steps

# 10 steps, warmup 3, decay towards min ratio 0.1 over the 7 steps after warmup, p = (k − 3) / 7.
# linear: 0.1 + 0.9·(1 − p); cosine: 0.1 + 0.45·(1 + cos πp); warmup (k + 1) / 3.
LINEAR_10 = [0.3333333333, 0.6666666667, 1.0, 1.0, 0.8714285714, 0.7428571429, 0.6142857143, 0.4857142857,
             0.3571428571, 0.2285714286]
COSINE_10 = [0.3333333333, 0.6666666667, 1.0, 1.0, 0.9554359906, 0.8305704108, 0.6501344203, 0.4498655797,
             0.2694295892, 0.1445640094]
# The same over one sequence of 2 × 10 steps: p = (k − 3) / 17.
LINEAR_20 = [0.3333333333, 0.6666666667, 1.0, 1.0, 0.9470588235, 0.8941176471, 0.8411764706, 0.7882352941,
             0.7352941176, 0.6823529412, 0.6294117647, 0.5764705882, 0.5235294118, 0.4705882353, 0.4176470588,
             0.3647058824, 0.3117647059, 0.2588235294, 0.2058823529, 0.1529411765]
COSINE_20 = [0.3333333333, 0.6666666667, 1.0, 1.0, 0.9923378949, 0.9696125032, 0.9325977111, 0.8825540127,
             0.8211855864, 0.7505822601, 0.6731483455, 0.5915207618, 0.5084792382, 0.4268516545, 0.3494177399,
             0.2788144136, 0.2174459873, 0.1674022889, 0.1303874968, 0.1076621051]
CONSTANT_WARMUP_10 = [0.3333333333, 0.6666666667, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]

# (kind, scope) -> the factor of each of 20 steps over two tasks of 10 steps
TABLES = {
    ("linear", "task"): LINEAR_10 + LINEAR_10,
    ("cosine", "task"): COSINE_10 + COSINE_10,
    ("linear", "sequence"): LINEAR_20,
    ("cosine", "sequence"): COSINE_20,
    ("constant", "task"): CONSTANT_WARMUP_10 + CONSTANT_WARMUP_10,
    ("constant", "sequence"): CONSTANT_WARMUP_10 + [1.0] * 10,
}
BASE_LRS = {"lora_a": 3e-2, "lora_b": 2e-2, "full": 1e-2, "plain": 5e-3}


@pytest.mark.parametrize("kind,table", [("linear", LINEAR_10), ("cosine", COSINE_10), ("constant", CONSTANT_WARMUP_10)])
def test_lr_factor_equals_the_hand_computed_table(kind, table) -> None:
    assert [lr_factor(k, 10, 3, kind, 0.1) for k in range(10)] == pytest.approx(table, abs=1e-9)
    assert lr_factor(10, 10, 3, kind, 0.1) == pytest.approx(0.1 if kind != "constant" else 1.0)  # past the end


def test_lr_factor_edges_and_refusals() -> None:
    assert [lr_factor(k, 4, 0, "linear", 0.0) for k in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(k, 3, 3, "cosine", 0.5) for k in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lr_factor(2, 4, 0, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    for bad in ({"kind": "step"}, {"warmup": 11}, {"warmup": -1}, {"total": 0}, {"min_ratio": 1.5}, {"step": -1}):
        args = {"step": 0, "total": 10, "warmup": 3, "kind": "linear", "min_ratio": 0.1, **bad}
        with pytest.raises(ValueError):
            lr_factor(**args)
    assert warmup_steps(0, 0.3, 10) == 3 and warmup_steps(0, 0.25, 10) == 3 and warmup_steps(4, 0.0, 10) == 4


def _model_and_optimizer() -> tuple[list[torch.nn.Parameter], GORP]:
    """One group per role, each with its own base rate; ``full`` last (it may be detached)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"lora_a": (2, 5), "lora_b": (6, 2), "plain": (6,), "full": (6, 5)}
    params = {role: torch.nn.Parameter(torch.randn(*shape, generator=g)) for role, shape in shapes.items()}
    groups = [{"params": [params[role]], "names": [role], "role": role, "lr": BASE_LRS[role], "weight_decay": 0.01}
              for role in ("lora_a", "lora_b", "plain")]
    groups.append({"params": [params["full"]], "names": ["full"], "role": "full", "lr": BASE_LRS["full"], "rank": 2,
                   "update_gap": 3, "scale": 0.5, "weight_decay": 0.01})
    return list(params.values()), GORP(groups, shared_threshold=0.9)


def _set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("kind,scope", sorted(TABLES))
def test_every_role_group_follows_the_table_as_the_run_steps(kind, scope) -> None:
    """20 steps over two tasks of 10 (end_task in between): before each step, every group's lr is
    its own base rate times the table's factor (warmup 3, min ratio 0.1)."""
    params, opt = _model_and_optimizer()
    scheduler = RoleScheduler(opt, Schedule(kind=kind, warmup_steps=3, min_ratio=0.1, scope=scope, spans=(10, 10)))
    table = TABLES[(kind, scope)]
    for step in range(20):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(BASE_LRS[group["role"]] * table[step], rel=1e-9), (step, group["role"])
        _set_grads(params, step)
        opt.step()
        scheduler.step()
        if step == 9:
            opt.end_task()
    assert scheduler.position == 20


@pytest.mark.parametrize("kind,scope", [("constant", "task"), ("cosine", "task"), ("linear", "sequence")])
def test_later_ratio_scales_every_step_after_the_first_task(kind, scope) -> None:
    """later_ratio 0.1 over two tasks of 10: the first task's factors as in the table, the second
    task's times 0.1 (O-LoRA's LLaMA recipe: 1e-3 on task 1, 1e-4 after); every group of a role
    the schedule applies to, and only those."""
    table = TABLES[(kind, scope)]
    expected = table[:10] + [0.1 * f for f in table[10:]]
    schedule = Schedule(kind=kind, warmup_steps=3, min_ratio=0.1, scope=scope, spans=(10, 10), later_ratio=0.1,
                        roles=("lora_a", "lora_b", "plain"))
    assert [schedule.factor(k) for k in range(20)] == pytest.approx(expected, abs=1e-9)
    params, opt = _model_and_optimizer()
    scheduler = RoleScheduler(opt, schedule)
    for step in range(20):
        for group in opt.param_groups:
            factor = expected[step] if group["role"] != "full" else 1.0
            assert group["lr"] == pytest.approx(BASE_LRS[group["role"]] * factor, rel=1e-9), (step, group["role"])
        _set_grads(params, step)
        opt.step()
        scheduler.step()
    # Constant, no warmup: exactly the base rate for the first task, exactly 0.1 times it after.
    plain = Schedule(spans=(3, 4, 2), later_ratio=0.1)
    assert not plain.trivial and [plain.factor(k) for k in range(9)] == [1.0] * 3 + [0.1] * 6
    # One span (mtl's mixed task) has no later task; ratio 1 is the schedule without it.
    assert Schedule(spans=(9,), later_ratio=0.1).trivial
    assert Schedule(spans=(3, 4), later_ratio=1.0).trivial
    with pytest.raises(ValueError, match="later_ratio"):
        Schedule(spans=(3, 4), later_ratio=1.5)


def test_warmup_ratio_gives_the_same_schedule_as_its_steps() -> None:
    by_ratio = Schedule(kind="cosine", warmup_ratio=0.3, min_ratio=0.1, spans=(10, 10))
    assert [by_ratio.factor(k) for k in range(20)] == pytest.approx(COSINE_10 + COSINE_10, abs=1e-9)


def test_constant_without_warmup_leaves_the_rates_exactly_as_given() -> None:
    params, opt = _model_and_optimizer()
    scheduler = RoleScheduler(opt, Schedule(spans=(3, 4)))
    for step in range(7):
        _set_grads(params, step)
        opt.step()
        scheduler.step()
        assert [g["lr"] for g in opt.param_groups] == [BASE_LRS[g["role"]] for g in opt.param_groups]


def test_the_update_uses_the_scheduled_rate_like_torch_adamw() -> None:
    """``plain`` GORP is AdamW: under the same schedule (torch's LambdaLR on AdamW, ours on GORP)
    the weights agree step by step, and differ from the unscheduled run."""
    init = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    ours, theirs, fixed = (torch.nn.Parameter(init.clone()) for _ in range(3))
    opt = GORP([{"params": [ours], "names": ["w"], "role": "plain", "lr": 3e-2, "weight_decay": 0.1}])
    ref = torch.optim.AdamW([theirs], lr=3e-2, weight_decay=0.1, foreach=False)
    unscheduled = GORP([{"params": [fixed], "names": ["w"], "role": "plain", "lr": 3e-2, "weight_decay": 0.1}])
    schedule = Schedule(kind="cosine", warmup_steps=3, min_ratio=0.1, spans=(10,))
    schedulers = [RoleScheduler(opt, schedule), torch.optim.lr_scheduler.LambdaLR(ref, schedule.factor)]
    for step in range(10):
        for param, optimizer in ((ours, opt), (theirs, ref), (fixed, unscheduled)):
            param.grad = torch.randn(7, 3, generator=torch.Generator().manual_seed(50 + step))
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    assert (ours - fixed).abs().max() > 1e-3


def test_detached_groups_follow_the_schedule() -> None:
    """The ZeRO layer detaches ``full`` groups (trained from projected gradients) from param_groups."""
    _, opt = _model_and_optimizer()
    (detached,) = opt.detach_groups("full")
    scheduler = RoleScheduler(opt, Schedule(kind="linear", warmup_steps=3, min_ratio=0.1, spans=(10,)))
    for step in range(10):
        assert detached["lr"] == pytest.approx(BASE_LRS["full"] * LINEAR_10[step], rel=1e-9)
        assert scheduler.learning_rates()["full"] == detached["lr"]
        scheduler.step()


def test_state_reloaded_mid_warmup_continues_the_exact_schedule() -> None:
    """A fresh optimizer and scheduler (a resumed run) given the state after 2 of 3 warmup steps of
    task 2 set and then step through the same rates, bit for bit."""
    schedule = Schedule(kind="cosine", warmup_steps=3, min_ratio=0.1, scope="task", spans=(10, 10))
    params, opt = _model_and_optimizer()
    scheduler = RoleScheduler(opt, schedule)
    for step in range(12):
        _set_grads(params, step)
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["position"] == 12 and state["schedule"]["kind"] == "cosine"
    params2, opt2 = _model_and_optimizer()
    resumed = RoleScheduler(opt2, schedule)
    resumed.load_state_dict(state)
    for step in range(12, 20):
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups], step
        for group in opt2.param_groups:
            assert group["lr"] == pytest.approx(BASE_LRS[group["role"]] * COSINE_10[step - 10], rel=1e-9)
        for p, o, s in ((params, opt, scheduler), (params2, opt2, resumed)):
            _set_grads(p, step)
            o.step()
            s.step()


def test_a_schedule_on_some_roles_leaves_the_others_at_their_rate() -> None:
    """``--lr-schedule-roles full``: the full-rank targets follow the table (detached or not), the
    LoRA factors and plain tensors keep their base rate exactly."""
    assert SCHEDULE_ROLES == ROLES
    for detach in (False, True):
        params, opt = _model_and_optimizer()
        detached = opt.detach_groups("full") if detach else []
        scheduler = RoleScheduler(opt, Schedule(kind="linear", warmup_steps=3, min_ratio=0.1, spans=(10,),
                                                roles=("full",)))
        for step in range(10):
            for group in [*opt.param_groups, *detached]:
                expected = BASE_LRS[group["role"]] * (LINEAR_10[step] if group["role"] == "full" else 1.0)
                assert group["lr"] == pytest.approx(expected, rel=1e-9), (detach, step, group["role"])
                if group["role"] != "full":
                    assert group["lr"] == BASE_LRS[group["role"]]
            if not detach:
                _set_grads(params, step)
                opt.step()
            scheduler.step()
