"""Scenarios run on spawned gloo ranks by test_zero_lowrank.py: ``full`` targets trained from projected
gradients (``full_gradients="projected"``) under DeepSpeed ZeRO-2, against the single-process GORP fed with
full gradients, on the model, batches and schedule of ``zero_scenarios`` (refreshes every 3 steps, a task
boundary after 5 steps, S in use, right and left projection: 21×7, 22×7 and 7×21, 7×22)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gorp_ds.optim import GORP
from gorp_ds.optim.projector import projector_seed
from gorp_ds.optim.update import UpdateConfig, refresh_projectors
from tests.support import zero_scenarios as zs

TRACKED = ("lora_a", "lora_b", "norm", "up1", "down1", "up2", "down2")  # every trained tensor, zero_scenarios order


def tracked(model) -> list[torch.Tensor]:
    named = dict(model.named_parameters())
    return [named[n + ".weight"] if n + ".weight" in named else named[n] for n in TRACKED]


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in tracked(model)])


def build_optimizer(model, refresh_schedule: str = "cycle") -> GORP:
    """``zero_scenarios.build_optimizer``'s groups with the ``full`` group last (where
    ``build_param_groups`` puts it and where projected gradients need it)."""
    groups = zs.build_optimizer(model, refresh_schedule).param_groups
    full = [g for g in groups if g["role"] == "full"]
    keys = ("params", "names", "role", "lr", "weight_decay", "rank", "update_gap", "scale", "projector",
            "refresh_schedule")
    return GORP([{k: g[k] for k in keys if k in g} for g in [g for g in groups if g["role"] != "full"] + full],
                shared_threshold=0.9)


def projectors_for_step(opt: GORP, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector each ``full`` tensor's step will use: its current one, or on a refresh step the
    one the optimizer's refresh computes from ``G`` (the refresh is scale-invariant, so clipping G
    first changes nothing)."""
    group = next(g for g in opt.param_groups if g["role"] == "full")
    cfg = UpdateConfig.from_group(group)
    result = {}
    for name in group["names"]:
        state = opt.state.get(name, {})
        step = int(state["step"]) if "step" in state else 0
        previous = state["projector"][None] if step > 0 else None
        if step % cfg.update_gap == 0:
            seed = projector_seed(name, int(opt.tasks_completed), step // cfg.update_gap)
            projector, _ = refresh_projectors(grads[name][None], previous, cfg, [seed])
            result[name] = projector[0]
        else:
            result[name] = state["projector"]
    return result


def reference_trajectory(world: int, gas: int, clip: float, *, projected: bool = True,
                         at_task_end: Callable[[torch.nn.Module], object] | None = None,
                         params: Callable[[torch.nn.Module], torch.Tensor] | None = None,
                         refresh_schedule: str = "cycle") -> list[torch.Tensor]:
    """Single-process GORP on full gradients, clipped by the projected-gradient norm
    ``√(Σ_{lora, plain} ‖g‖² + Σ_full ‖R‖²)`` with ``R = G Q`` (``m >= n``) or ``Pᵀ G`` (by ‖G‖ with
    ``projected=False``: the flat path's groups); ``at_task_end(model)`` after ``end_task()`` (e.g. a
    LoRA merge); ``params(model)`` is what each step records (default :func:`flat_params`);
    ``refresh_schedule``: the ``full`` group's (docs/algorithm.md §2.1; clipping assumes ``cycle``)."""
    assert refresh_schedule == "cycle" or clip == 0, "projectors_for_step knows the cycle schedule only"
    model = zs.TinyNet()
    opt = build_optimizer(model, refresh_schedule) if projected else zs.build_optimizer(model, refresh_schedule)
    names = dict(zip(TRACKED, tracked(model)))
    record = params or flat_params
    trajectory = []
    for step in range(zs.STEPS):
        opt.zero_grad()
        chunks = zs.micro_batches(step, world, gas)
        for x, y in chunks:
            (zs.loss_fn(model, x, y) / len(chunks)).backward()
        if clip > 0:
            grads = {n: p.grad for n, p in names.items()}
            squares = [grads[n].pow(2).sum() for n in ("lora_a", "lora_b", "norm")]
            projectors = projectors_for_step(opt, {n: grads[n] for n in zs.FULL}) if projected else {}
            for n in zs.FULL:
                g = grads[n]
                if projected:
                    q = projectors[n]
                    g = g @ q if g.shape[0] >= g.shape[1] else q.mT @ g
                squares.append(g.pow(2).sum())
            coef = (torch.sqrt(sum(squares)) + 1e-6) / clip
            if coef > 1:
                for g in grads.values():
                    g.mul_(1.0 / coef)
        opt.step()
        if step + 1 == zs.TASK_STEPS[0]:
            opt.end_task()
            if at_task_end is not None:
                at_task_end(model)
        trajectory.append(record(model))
    return trajectory


class CollectiveCounter:
    """Wraps torch.distributed's collectives (as called by our code and by DeepSpeed, whose backend
    caches two of them) and records ``(function, numel of the largest tensor, bytes)`` per call."""

    NAMES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
             "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "all_to_all",
             "all_reduce_coalesced", "gather", "scatter", "send", "recv", "isend", "irecv")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> CollectiveCounter:
        import deepspeed.comm.comm as ds_comm
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        wrapped = {}
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            wrapped[original] = self._wrap(name, original)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    self._saved.append((module, name, original))
                    setattr(module, name, wrapped[original])
        backend = ds_comm.cdb
        for attr in ("all_gather_function", "reduce_scatter_function"):
            original = getattr(backend, attr, None)
            if original in wrapped:
                self._saved.append((backend, attr, original))
                setattr(backend, attr, wrapped[original])
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, (list, tuple)):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            if tensors:
                largest = max(tensors, key=lambda t: t.numel())
                self.calls.append((name, largest.numel(), largest.numel() * largest.element_size()))
            return original(*args, **kwargs)

        return counted


def run_engine(rank: int, world: int, config: dict, *, steps: range = range(zs.STEPS), load_from: str | None = None,
               save_to: str | None = None, count: bool = False, full_gradients: str = "projected",
               refresh_from: str = "sketch", oversample: int | None = None, refresh_schedule: str = "cycle") -> dict:
    import gorp_ds
    from gorp_ds.zero import load_checkpoint, save_checkpoint

    model = zs.TinyNet()
    if config.get("bf16", {}).get("enabled"):
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model, refresh_schedule)
    if oversample is not None:
        for group in opt.param_groups:
            group["oversample"] = oversample
    engine, _, _, _ = gorp_ds.initialize(model=model, optimizer=opt, config=config, full_gradients=full_gradients,
                                         refresh_from=refresh_from)
    gas = config["gradient_accumulation_steps"]
    masters_at = {}
    if load_from is not None:
        load_checkpoint(engine, load_from)
        masters_at["load"] = _masters(engine)
    trajectory, collectives, refresh, refreshed = {}, {}, {}, {}
    for step in steps:
        due = [n for n in zs.FULL if opt.refresh_due((n,), UpdateConfig.from_group(opt.group(opt.tensor_meta[n][2])),
                                                     torch.device("cpu"))[0]] if full_gradients == "projected" else []
        refresh[step] = bool(due) if full_gradients == "projected" else None
        refreshed[step] = due
        refreshes = opt.refresh_count
        counter = CollectiveCounter()
        chunks = zs.micro_batches(step, world, gas)
        with counter if count else _null():
            for micro in range(gas):
                x, y = chunks[micro * world + rank]
                engine.backward(zs.loss_fn(engine.module, x, y))
                engine.step()
        collectives[step] = counter.calls
        refreshed[step] = (refreshed[step], opt.refresh_count - refreshes)  # (due, member refreshes this rank ran)
        if step + 1 == zs.TASK_STEPS[0]:
            opt.end_task()
        trajectory[step] = flat_params(model)
        if save_to is not None and step + 1 == zs.SAVE_AFTER:
            save_checkpoint(engine, save_to, tag="mid_task")
            masters_at["save"] = _masters(engine)
    facts = {"trajectory": trajectory, "collectives": collectives, "refresh": refresh, "refreshed": refreshed,
             "masters_at": masters_at,
             "weights": {n: getattr(model, n).weight.detach().clone() for n in zs.FULL},
             "shared": {n: s.shape[1] for n, s in opt.shared.items()},
             "requires_grad": {n: getattr(model, n).weight.requires_grad for n in zs.FULL},
             "ds_names": [n for g in opt.param_groups for n in g["names"]]}
    if engine.gorp.low_rank is not None:
        lo = engine.gorp.low_rank
        facts["remainders"] = {m.name: m.remainder.clone() if m.remainder is not None else None for m in lo.members}
        facts["masters"] = {n: t.clone() for n, (_, _, t) in lo.held_masters().items()}
        facts["low_rank_numel"] = lo.flat_low_rank.numel()
    engine.destroy()
    return facts


def _masters(engine) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 master, model weight) of every owned full target, copied."""
    held = engine.gorp.low_rank.held_masters()
    return {m.name: (held[m.name][2].clone(), m.weight.detach().clone()) for m in engine.gorp.low_rank.members}


def refusals(rank: int, world: int) -> dict[str, str | None]:
    """Start-up refusals of the projected path (each raised before DeepSpeed builds anything)."""
    import gorp_ds
    from gorp_ds.zero import UnsupportedSetupError

    cases = {
        "full_first": (zs.build_optimizer, zs.ds_config(2, world=world)),
        "unmanaged_accumulation": (build_optimizer, {**zs.ds_config(2, world=world),
                                                     "managed_gradient_accumulation": False}),
        "no_grad_norm": (build_optimizer, {**zs.ds_config(2, clip=0.3, world=world),
                                           "zero_optimization": {"stage": 2, "compute_grad_norm": False}}),
    }
    messages = {}
    for name, (build, config) in cases.items():
        model = zs.TinyNet()
        try:
            gorp_ds.initialize(model=model, optimizer=build(model), config=config)
            messages[name] = None
        except UnsupportedSetupError as err:
            messages[name] = str(err)
    return messages


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


BYTES_OVERSAMPLE = 2  # sketch width l = k + 2 = 4 < the short side 7 (with 8, l would be the whole side)


def byte_counts(rank: int, world: int) -> dict:
    """Collectives per step: projected path (sketch refresh and G refresh) and flat path, gas 1 (so that
    worlds 2, 3 and 4 split the batch evenly)."""
    config = zs.ds_config(2, gas=1, clip=0.3, overlap=True, world=world)
    sketch = run_engine(rank, world, config, count=True, oversample=BYTES_OVERSAMPLE)
    gradient = run_engine(rank, world, config, count=True, refresh_from="gradient", oversample=BYTES_OVERSAMPLE)
    flat = run_engine(rank, world, config, count=True, full_gradients="flat", oversample=BYTES_OVERSAMPLE)
    return {"sketch": sketch["collectives"], "projected": gradient["collectives"], "refresh": gradient["refresh"],
            "flat": flat["collectives"], "low_rank_numel": gradient["low_rank_numel"]}


def scenarios(rank: int, world: int, checkpoint_dir: str, mode: str) -> dict:
    """Everything one process group checks; ``mode``: "save" (2 ranks), "load" (3 ranks), "bytes" (4 ranks),
    "plain" (1 rank)."""
    results = {}
    if world > 1:
        results["bytes"] = byte_counts(rank, world)
    if mode == "bytes":
        return results
    results["clip"] = run_engine(rank, world, zs.ds_config(2, clip=0.3, overlap=True, world=world),
                                 save_to=checkpoint_dir if mode == "save" else None)
    # One micro-batch per step: refreshes from the sketch (no G), against the reference with that batch split.
    results["sketch"] = run_engine(rank, world, zs.ds_config(2, gas=1, clip=0.3, overlap=True, world=world))
    results["noclip"] = run_engine(rank, world, zs.ds_config(2, gas=2, clip=0.0, world=world))
    results["zero1"] = run_engine(rank, world, zs.ds_config(1, clip=0.3, world=world))
    results["bf16"] = run_engine(rank, world, zs.ds_config(2, clip=0.3, bf16=True, world=world),
                                 save_to=checkpoint_dir + "_bf16" if mode == "save" else None)
    if mode == "plain":
        results["refusals"] = refusals(rank, world)
    if mode == "save":  # the spread refresh schedule (docs/algorithm.md §2.1): from G, from the sketch, flat
        config = zs.ds_config(2, gas=2, clip=0.0, world=world)
        results["spread"] = run_engine(rank, world, config, refresh_from="gradient", refresh_schedule="spread")
        results["spread_sketch"] = run_engine(rank, world, zs.ds_config(2, gas=1, clip=0.0, world=world),
                                              refresh_schedule="spread")
        results["spread_flat"] = run_engine(rank, world, config, full_gradients="flat", refresh_schedule="spread")
    if mode == "load":
        results["bf16_resumed"] = run_engine(rank, world, zs.ds_config(2, clip=0.3, bf16=True, world=world),
                                             steps=range(zs.SAVE_AFTER, zs.SAVE_AFTER + 1),
                                             load_from=checkpoint_dir + "_bf16")
        results["resumed"] = run_engine(rank, world, zs.ds_config(2, clip=0.3, overlap=True, world=world),
                                        steps=range(zs.SAVE_AFTER, zs.STEPS), load_from=checkpoint_dir)
    return results
