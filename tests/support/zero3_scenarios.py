"""Scenarios run on spawned gloo ranks by test_zero3.py: GORP under DeepSpeed ZeRO-3 (every parameter
partitioned, frozen ones included) against the single-process GORP on the model, batches and schedule of
``zero_scenarios`` (refreshes every 3 steps, a task boundary after 5 steps with S extended and, here, the
LoRA merged into its frozen base and B re-initialised, as the trainer does at task boundaries).

The task-boundary merge under ZeRO-3 is the trainer's: the fp32 masters of A and B gathered
(``Distributor.gather_masters``), ``W += B A`` and ``B = 0`` inside ``Distributor.gathered(modify=True)``
(the base weight and B gathered, rank 0's values written back into every partition), then the fp32
masters of B refreshed from the partitions (``masters_from_model``). A resumed run replays the merge
from the checkpoint's client state (the base weight is frozen, so checkpoints do not hold it).
"""

from __future__ import annotations

import torch

from tests.support import lowrank_scenarios as ls
from tests.support import zero_scenarios as zs

# Every trained tensor (lowrank_scenarios order), then the frozen base weight the merge writes into.
TRACKED = ls.TRACKED + ("base",)
PARTITIONED = {"stage3_param_persistence_threshold": 0}  # really partition this tiny model's tensors


def tracked(model) -> list[torch.Tensor]:
    return ls.tracked(model) + [model.base.weight]


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in tracked(model)])


def merge_single_(model) -> dict[str, torch.Tensor]:
    """The task-boundary merge on whole tensors: ``W_base += B A`` in fp32, ``B = 0``."""
    with torch.no_grad():
        record = {"a": model.lora_a.detach().float().clone(), "b": model.lora_b.detach().float().clone()}
        model.base.weight.copy_((model.base.weight.float() + record["b"] @ record["a"]).to(model.base.weight.dtype))
        model.lora_b.zero_()
    return record


def reference_trajectory(world: int, gas: int, clip: float, *, projected: bool = True,
                         merge: bool = True) -> list[torch.Tensor]:
    """Single-process GORP on full gradients (clipped by the projected-gradient norm when
    ``projected``, by ‖G‖ otherwise), end_task() and the merge after task 1."""
    return ls.reference_trajectory(world, gas, clip, projected=projected,
                                   at_task_end=merge_single_ if merge else None, params=flat_params)


def merge_partitioned_(engine, model, record: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The merge under ZeRO-3 from the fp32 masters; with a saved ``record`` (resume) only its
    replay into the frozen base weight (B's re-initialisation is in the checkpoint's masters)."""
    handle = engine.gorp
    replay = record is not None
    if record is None:
        masters = handle.gather_masters(["lora_a", "lora_b"])
        record = {"a": masters["lora_a"].clone(), "b": masters["lora_b"].clone()}
    with torch.no_grad(), handle.gathered([model.base.weight, model.lora_b], modify=True):
        weight = model.base.weight
        weight.copy_((weight.float() + record["b"] @ record["a"]).to(weight.dtype))
        if not replay:
            model.lora_b.zero_()
    if not replay:
        handle.masters_from_model(["lora_b"])
    return record


def run_engine(rank: int, world: int, config: dict, *, steps: range = range(zs.STEPS), load_from: str | None = None,
               save_to: str | None = None, full_gradients: str = "projected", merge: bool = True,
               skip_at: int | None = None) -> dict:
    import gorp_ds
    from gorp_ds.zero import load_checkpoint, save_checkpoint

    model = zs.TinyNet()
    if config.get("bf16", {}).get("enabled"):
        model = model.to(torch.bfloat16)
    opt = ls.build_optimizer(model) if full_gradients == "projected" else zs.build_optimizer(model)
    engine, _, _, _ = gorp_ds.initialize(model=model, optimizer=opt, config=config, full_gradients=full_gradients)
    handle = engine.gorp
    gas = config["gradient_accumulation_steps"]
    facts: dict = {}
    if load_from is not None:
        client = load_checkpoint(engine, load_from)
        if client.get("merge") is not None:
            merge_partitioned_(engine, model, client["merge"])
    record = None
    trajectory, counters = {}, {}
    for step in steps:
        chunks = zs.micro_batches(step, world, gas)
        for micro in range(gas):
            x, y = chunks[micro * world + rank]
            engine.backward(zs.loss_fn(engine.module, x, y))
            if step == skip_at and micro == gas - 1:
                opt.skip_next_step = True  # as the trainer's non-finite check marks a bad step
            engine.step()
        counters[step] = sorted({int(st["step"]) for n, st in opt.state.items() if isinstance(n, str) and "step" in st})
        if step == steps[-1]:  # between steps: empty placeholders, except DeepSpeed's persistent parameters
            facts["partitioned"] = {n: p.numel() == 0 for n, p in zip(TRACKED, tracked(model))}
        if step + 1 == zs.TASK_STEPS[0]:
            opt.end_task()
            if merge:
                record = merge_partitioned_(engine, model)
        with handle.gathered(tracked(model)):
            trajectory[step] = flat_params(model)
            if step == steps[-1]:
                facts["weights"] = {n: getattr(model, n).weight.detach().clone() for n in zs.FULL}
        if save_to is not None and step + 1 == zs.SAVE_AFTER:
            save_checkpoint(engine, save_to, tag="mid_task", client_state={"merge": record})
    facts["trajectory"] = trajectory
    facts["skipped_steps"] = opt.skipped_steps
    facts["counters"] = counters  # the step counters of every tensor's state after each step
    facts["held"] = {n: (s, e) for n, (s, e, _) in handle.held_masters().items()}
    facts["cut"] = sorted({t.name for layout in opt.driver.layouts for t in layout.cut_tensors()})
    facts["shared"] = {n: s.shape[1] for n, s in opt.shared.items()}
    if handle.low_rank is not None:
        facts["masters"] = {n: t.clone() for n, (_, _, t) in handle.low_rank.held_masters().items()}
        facts["remainders"] = {m.name: m.remainder.clone() if m.remainder is not None else None
                               for m in handle.low_rank.members}
    engine.destroy()
    return facts


def config(**kwargs) -> dict:
    """``zero_scenarios.ds_config`` at stage 3 with real partitioning (``extra`` zero settings added)."""
    extra = kwargs.pop("extra", PARTITIONED)
    result = zs.ds_config(3, **kwargs)
    result["zero_optimization"].update(extra)
    return result


def scenarios(rank: int, world: int, checkpoint_dir: str, mode: str) -> dict:
    """Everything one process group checks; ``mode``: "save" (2 ranks), "load" (3 ranks) or "one"
    (1 rank: every partition is the whole tensor; only "clip" and "bf16")."""
    results = {}
    results["clip"] = run_engine(rank, world, config(clip=0.3, world=world),
                                 save_to=checkpoint_dir if mode == "save" else None)
    if mode == "one":
        results["bf16"] = run_engine(rank, world, config(clip=0.3, bf16=True, world=world), merge=False)
        return results
    # One micro-batch per step (sketch refreshes from the activations); overlapped reduction.
    results["sketch"] = run_engine(rank, world, config(gas=1, clip=0.3, overlap=True, world=world))
    # DeepSpeed's default persistence: these tiny tensors stay gathered and are re-gathered after each step.
    results["persistent"] = run_engine(rank, world, config(clip=0.3, world=world, extra={}))
    results["flat"] = run_engine(rank, world, config(clip=0.3, world=world), full_gradients="flat")
    results["bf16"] = run_engine(rank, world, config(clip=0.3, bf16=True, world=world), merge=False)
    # A step marked non-finite at a refresh step (3): every sub-group and the full targets skip it.
    results["skip"] = run_engine(rank, world, config(clip=0.3, world=world), steps=range(5), skip_at=3)
    if mode == "load":
        results["resumed"] = run_engine(rank, world, config(clip=0.3, world=world),
                                        steps=range(zs.SAVE_AFTER, zs.STEPS), load_from=checkpoint_dir)
    return results
