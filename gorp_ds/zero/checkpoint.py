"""World-size-independent checkpoints of GORP's state and the fp32 master weights.

DeepSpeed's own ZeRO checkpoints store element-wise optimizer state per rank partition, which
neither fits GORP's low-rank state nor survives a change of world size. Next to DeepSpeed's files,
each rank writes ``gorp_state/rank_XXXXX.pt`` holding, keyed by module name:

- ``pieces``: for every tensor piece the rank updates, its element range, fp32 master values and,
  for ``plain`` tensors, the elementwise Adam state of that range;
- ``low_rank``: full state of ``lora_*``/``full`` tensors (projector, moments, step), written by
  the lowest-ranked holder only;
- ``shared``: the shared spaces S of those tensors, same rule.

Loading reads every file (memory-mapped) and takes what the new layout needs, so a run saved on N
ranks resumes on M ranks; a single-process run writes and reads the same format.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from torch import Tensor

from ..optim.gorp import restore_tensor_state
from ..optim.update import PROTECTED_ROLES
from .deepspeed_bridge import ZeroHandle

FORMAT_VERSION = 1
STATE_DIR = "gorp_state"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match the run."""


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _primary_holders(handle: ZeroHandle) -> set[str]:
    """Names of protected tensors for which this rank writes the state (lowest-ranked holder)."""
    return handle.primary_holders()


@torch.no_grad()
def save_gorp_state(handle: ZeroHandle, directory: str) -> str:
    """Write this rank's share of GORP state and fp32 masters under ``directory/gorp_state``."""
    opt = handle.optimizer
    out = os.path.join(directory, STATE_DIR)
    os.makedirs(out, exist_ok=True)
    primary = _primary_holders(handle)
    replicated = handle.replicated_names()  # held whole by every rank: written once, by its primary holder
    pieces, low_rank, shared = {}, {}, {}
    for name, (start, end, master) in handle.held_masters().items():
        if name in replicated and name not in primary:
            continue
        role = opt.tensor_meta[name][0]
        entry: dict[str, Tensor] = {
            "elem_start": torch.tensor(start),
            "elem_end": torch.tensor(end),
            "master": master.detach().reshape(-1).float().cpu().clone(),
        }
        state = opt.state.get(name, {})
        if role == "plain":
            entry.update({f"state.{k}": v.detach().reshape(-1).cpu().clone() if v.dim() else v.clone()
                          for k, v in state.items()})
        elif name in primary:
            if state:
                low_rank[name] = {k: v.detach().cpu().clone() for k, v in state.items()}
            if name in opt.shared:
                shared[name] = opt.shared[name].detach().cpu().clone()
        pieces[name] = entry
    payload = {
        "format": torch.tensor(FORMAT_VERSION),
        "world_size": torch.tensor(handle.world_size),
        "pieces": pieces,
        "low_rank": low_rank,
        "shared": shared,
        "tasks_completed": opt.tasks_completed.clone(),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }
    _atomic_save(payload, os.path.join(out, f"rank_{handle.rank:05d}.pt"))
    return out


def _assemble(saved: list[tuple[int, int, Tensor]], start: int, end: int, what: str) -> Tensor:
    """Elements ``[start, end)`` of a flattened tensor from saved pieces covering it."""
    result = torch.empty(end - start, dtype=saved[0][2].dtype)
    covered = 0
    for s_start, s_end, values in saved:
        lo, hi = max(s_start, start), min(s_end, end)
        if lo < hi:
            result[lo - start : hi - start] = values[lo - s_start : hi - s_start]
            covered += hi - lo
    if covered != end - start:
        raise CheckpointError(f"checkpoint covers {covered} of elements [{start}, {end}) of {what}")
    return result


@torch.no_grad()
def load_gorp_state(handle: ZeroHandle, directory: str) -> None:
    """Restore GORP state and fp32 masters written by :func:`save_gorp_state` at any world size."""
    opt = handle.optimizer
    files = sorted(glob.glob(os.path.join(directory, STATE_DIR, "rank_*.pt")))
    if not files:
        raise CheckpointError(f"{directory}: no {STATE_DIR}/rank_*.pt files (not a gorp_ds checkpoint?)")
    loaded = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    saved_world = int(loaded[0]["world_size"])
    if len(loaded) != saved_world:
        raise CheckpointError(f"{directory}: {len(loaded)} of {saved_world} rank files present (incomplete save)")
    saved_names = [g["names"] for g in loaded[0]["param_groups"]]
    if saved_names != [g["names"] for g in opt.param_groups]:
        raise CheckpointError(f"{directory}: the checkpoint's GORP param groups name different tensors than this run's")
    for group, saved in zip(opt.param_groups, loaded[0]["param_groups"]):
        group.update({k: v for k, v in saved.items() if k not in ("names", "params")})

    pieces: dict[str, list[dict[str, Tensor]]] = {}
    low_rank: dict[str, dict[str, Tensor]] = {}
    shared: dict[str, Tensor] = {}
    for payload in loaded:
        for name, entry in payload["pieces"].items():
            pieces.setdefault(name, []).append(entry)
        low_rank.update(payload["low_rank"])
        shared.update(payload["shared"])

    opt.state.clear()
    opt.shared = {}
    for name, (start, end, master) in handle.held_masters().items():
        role, shape, _ = opt.tensor_meta[name]
        device = master.device
        saved = pieces.get(name)
        if not saved:
            raise CheckpointError(f"{directory}: no saved values for tensor {name!r}")
        spans = [(int(e["elem_start"]), int(e["elem_end"])) for e in saved]
        master.copy_(_assemble([(s, t, e["master"]) for (s, t), e in zip(spans, saved)], start, end, name))
        if role == "plain":
            keys = [k for k in saved[0] if k.startswith("state.")]
            state: dict[str, Tensor] = {}
            for key in keys:
                if saved[0][key].dim() == 0:
                    state[key[6:]] = saved[0][key].clone()
                else:
                    values = _assemble([(s, t, e[key]) for (s, t), e in zip(spans, saved)], start, end, f"{name}.{key}")
                    state[key[6:]] = values.to(device).view(shape if not handle.sharded else (-1,))
            if state:
                opt.state[name] = state
        elif role in PROTECTED_ROLES:
            if name in low_rank:
                opt.state[name] = restore_tensor_state(low_rank[name], device)
            if name in shared:
                opt.shared[name] = shared[name].to(device, copy=True)
    opt.tasks_completed = loaded[0]["tasks_completed"].clone()
    handle.model_from_masters()


def save_checkpoint(engine: Any, save_dir: str, tag: str, client_state: dict[str, Any] | None = None) -> str:
    """``engine.save_checkpoint`` plus GORP's world-size-independent state. GORP's files are written
    first, so DeepSpeed's ``latest`` pointer never names a checkpoint without them."""
    directory = os.path.join(save_dir, tag)
    if engine.gorp.rank == 0:
        os.makedirs(directory, exist_ok=True)
    engine.gorp.barrier()
    save_gorp_state(engine.gorp, directory)
    engine.gorp.barrier()
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {})
    return directory


def load_checkpoint(engine: Any, load_dir: str, tag: str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` on any number of ranks; returns the
    client state. DeepSpeed restores the module, scheduler and counters; GORP restores its own
    state and the exact fp32 masters (DeepSpeed's per-partition optimizer files are not read)."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(f"{load_dir}: no 'latest' file; pass the checkpoint tag explicitly")
        with open(latest) as handle:
            tag = handle.read().strip()
    path, client_state = engine.load_checkpoint(
        load_dir, tag=tag, load_optimizer_states=False, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"{load_dir}: DeepSpeed could not load checkpoint {tag!r}")
    load_gorp_state(engine.gorp, os.path.join(load_dir, tag))
    return client_state or {}
