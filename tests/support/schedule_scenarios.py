"""Scenarios run on spawned gloo ranks by test_zero_lr_schedule.py: GORP under ZeRO-1/2/3, on the flat and
the projected path, driven by the run's learning-rate scheduler (``RoleScheduler`` on the GORP optimizer
the engine wraps), against the single-process GORP under the same scheduler, on the model, batches and
task boundary of ``zero_scenarios`` (no clipping: the projected path then equals GORP on full gradients)."""

from __future__ import annotations

import torch

from gorp_ds.optim.role_scheduler import RoleScheduler
from gorp_ds.optim.schedule import Schedule
from tests.support import lowrank_scenarios as ls
from tests.support import zero3_scenarios as z3s
from tests.support import zero_scenarios as zs

# Cosine to 0.1 after 3 warmup steps, restarted at the task boundary after 5 steps.
SCHEDULE = Schedule(kind="cosine", warmup_steps=3, min_ratio=0.1, scope="task", spans=zs.TASK_STEPS)
GAS = 2
# scenario -> (ZeRO stage, full_gradients)
SCENARIOS = {"zero1_flat": (1, "flat"), "zero2_flat": (2, "flat"), "zero2_projected": (2, "projected"),
             "zero3_projected": (3, "projected")}


def reference_trajectory(world: int, schedule: Schedule | None) -> tuple[list[torch.Tensor], list[dict[str, float]]]:
    """Single-process GORP on the mean of the step's micro-batch gradients, stepped by ``schedule``
    (None: the fixed rates); the flat parameters and each role's rate after every step."""
    model = zs.TinyNet()
    opt = ls.build_optimizer(model)
    scheduler = RoleScheduler(opt, schedule) if schedule is not None else None
    trajectory, rates = [], []
    for step in range(zs.STEPS):
        rates.append({g["role"]: g["lr"] for g in opt.param_groups})
        opt.zero_grad()
        chunks = zs.micro_batches(step, world, GAS)
        for x, y in chunks:
            (zs.loss_fn(model, x, y) / len(chunks)).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if step + 1 == zs.TASK_STEPS[0]:
            opt.end_task()
        trajectory.append(ls.flat_params(model))
    return trajectory, rates


def run_engine(rank: int, world: int, stage: int, full_gradients: str) -> dict:
    import gorp_ds

    config = z3s.config(world=world, gas=GAS) if stage == 3 else zs.ds_config(stage, gas=GAS, world=world)
    model = zs.TinyNet()
    opt = ls.build_optimizer(model)
    engine, _, _, _ = gorp_ds.initialize(model=model, optimizer=opt, config=config, full_gradients=full_gradients,
                                         refresh_from="gradient")
    scheduler = RoleScheduler(opt, SCHEDULE)  # after initialize: the projected path detaches the full group
    trajectory, rates = {}, {}
    for step in range(zs.STEPS):
        rates[step] = scheduler.learning_rates()
        chunks = zs.micro_batches(step, world, GAS)
        for micro in range(GAS):
            x, y = chunks[micro * world + rank]
            engine.backward(zs.loss_fn(engine.module, x, y))
            engine.step()
        scheduler.step()
        if step + 1 == zs.TASK_STEPS[0]:
            opt.end_task()
        with engine.gorp.gathered(ls.tracked(model)):
            trajectory[step] = ls.flat_params(model)
    facts = {"trajectory": trajectory, "rates": rates, "detached": [g["role"] for g in opt.detached_groups]}
    engine.destroy()
    return facts


def scenarios(rank: int, world: int) -> dict:
    return {name: run_engine(rank, world, stage, gradients) for name, (stage, gradients) in SCENARIOS.items()}
