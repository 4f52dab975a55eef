"""World-size-independent checkpoints of what training changes, each tensor stored once.

A checkpoint holds the trainable state only: no frozen base weight and no DeepSpeed module or
optimizer file. The run rebuilds the model from its source on resume (the session replays the
task-boundary LoRA merges kept in the client state) and loads from the checkpoint:

``client_state.pt`` (rank 0): the caller's client state and the engine counters DeepSpeed keeps
(``global_steps``, ..., the LR scheduler's state if there is one).

``gorp_state/rank_XXXXX.pt`` (every rank), keyed by module name:

- ``pieces``: for every tensor piece the rank updates, its element range, fp32 master values and,
  for ``plain`` tensors, the elementwise Adam state of that range;
- ``low_rank``: full state of ``lora_*``/``full`` tensors (projector, moments, step), written by
  the lowest-ranked holder only;
- ``shared``: the shared spaces S of those tensors, same rule.

Loading reads every file (memory-mapped) and takes what the new layout needs, so a run saved on N
ranks resumes on M ranks; a single-process run writes and reads the same format. The directory is
written and committed by ``checkpoint_io`` (temporary tag, fsync, manifest with CRC-32, rename,
atomic ``latest``); loading verifies it and falls back to the newest complete tag.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from torch import Tensor

from ..log import get_logger
from ..optim.param_group import PROTECTED_ROLES
from ..optim.stacks import restore_tensor_state
from . import side_group
from .checkpoint_io import LATEST, CheckpointError, commit_checkpoint, complete_tags, resolve_tag
from .distributor import Distributor

log = get_logger(__name__)
FORMAT_VERSION = 2
STATE_DIR = "gorp_state"
CLIENT_FILE = "client_state.pt"


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _primary_holders(handle: Distributor) -> set[str]:
    """Names of protected tensors for which this rank writes the state (lowest-ranked holder)."""
    return handle.primary_holders()


def rank_file(rank: int) -> str:
    return f"{STATE_DIR}/rank_{rank:05d}.pt"


@torch.no_grad()
def gorp_payload(handle: Distributor) -> dict[str, Any]:
    """This rank's share of GORP state and fp32 masters, as CPU copies."""
    opt = handle.optimizer
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
    return payload


def save_gorp_state(handle: Distributor, directory: str) -> str:
    """Write this rank's share under ``directory/gorp_state`` (no commit protocol: for a single
    process or a caller that commits itself)."""
    out = os.path.join(directory, STATE_DIR)
    os.makedirs(out, exist_ok=True)
    _atomic_save(gorp_payload(handle), os.path.join(directory, rank_file(handle.rank)))
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
def load_gorp_state(handle: Distributor, directory: str) -> None:
    """Restore GORP state and fp32 masters written by :func:`save_gorp_state` at any world size."""
    files = sorted(glob.glob(os.path.join(directory, STATE_DIR, "rank_*.pt")))
    if not files:
        raise CheckpointError(f"{directory}: no {STATE_DIR}/rank_*.pt files (not a gorp_ds checkpoint?)")
    loaded = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    restore_gorp_payloads(handle, loaded, directory)


@torch.no_grad()
def restore_gorp_payloads(handle: Distributor, loaded: list[dict[str, Any]], directory: str) -> None:
    """Restore masters and GORP state from every rank's payload of one checkpoint."""
    opt = handle.optimizer
    saved_world = int(loaded[0]["world_size"])
    if len(loaded) != saved_world:
        raise CheckpointError(f"{directory}: {len(loaded)} of {saved_world} rank files present (incomplete save)")
    saved_names = [g["names"] for g in loaded[0]["param_groups"]]
    if saved_names != [g["names"] for g in opt.param_groups]:
        raise CheckpointError(f"{directory}: the checkpoint's GORP param groups name different tensors than this run's")
    for index, saved in enumerate(loaded[0]["param_groups"]):  # checked, as any change of a group's values
        opt.update_group(index, saved)

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
                    state[key[6:]] = values.to(device).view(handle.held_state_shape(shape))
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
    """Write and commit checkpoint ``tag`` under ``save_dir`` on every rank (collective): this
    rank's GORP state and masters, and on rank 0 the client state with the engine counters.
    Raises :class:`CheckpointError` (on every rank) when it cannot be written, e.g. disk full;
    the previous checkpoint stays usable. Returns the tag directory."""
    return save_state(engine.gorp, save_dir, tag, client_state)


def save_state(handle: Distributor, save_dir: str, tag: str, client_state: dict[str, Any] | None = None) -> str:
    """:func:`save_checkpoint` on a :class:`Distributor` (its engine may be None in one process)."""
    files: dict[str, Any] = {rank_file(handle.rank): gorp_payload(handle)}
    if handle.rank == 0:
        files[CLIENT_FILE] = {"format": FORMAT_VERSION, "client_state": client_state or {},
                              "engine": handle.engine_state()}
    return commit_checkpoint(save_dir, tag, files, handle.rank)


def _read_client_file(tag_dir: str) -> dict[str, Any]:
    # Our own file, written by rank 0; it may hold an LR scheduler's plain-Python state.
    return torch.load(os.path.join(tag_dir, CLIENT_FILE), map_location="cpu", weights_only=False)


def has_checkpoint(load_dir: str) -> bool:
    """Whether ``load_dir`` holds something to resume from: a ``latest`` file (even a damaged one:
    loading then falls back or says why not) or a committed tag."""
    return os.path.isfile(os.path.join(load_dir, LATEST)) or bool(complete_tags(load_dir))


def read_client_state(load_dir: str, tag: str | None = None) -> dict[str, Any]:
    """The client state of checkpoint ``tag`` (default: ``latest``, with the same fallback as
    :func:`load_checkpoint`), read without an engine. Sizes of every file and the client file's
    checksum are verified here; :func:`load_checkpoint` verifies all checksums."""
    chosen = resolve_tag(load_dir, tag, checksums=[CLIENT_FILE])
    return _read_client_file(os.path.join(load_dir, chosen))["client_state"]


def load_checkpoint(engine: Any, load_dir: str, tag: str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` on any number of ranks; returns the
    client state. Collective."""
    return load_state(engine.gorp, load_dir, tag)


def load_state(handle: Distributor, load_dir: str, tag: str | None = None) -> dict[str, Any]:
    """:func:`load_checkpoint` on a :class:`Distributor`. Rank 0 picks the tag (verifying every
    file's size and checksum, falling back past damaged tags) and tells the others."""
    choice: tuple[str | None, str | None] = (None, None)
    if handle.rank == 0:
        try:
            choice = (resolve_tag(load_dir, tag, checksums=True), None)
        except CheckpointError as err:
            choice = (None, str(err))
    chosen, error = side_group.broadcast_object(choice)
    if error is not None:
        raise CheckpointError(error)
    tag_dir = os.path.join(load_dir, chosen)
    client = _read_client_file(tag_dir)
    if int(client.get("format", 0)) != FORMAT_VERSION:
        raise CheckpointError(f"{tag_dir}: checkpoint format {client.get('format')}, this version reads {FORMAT_VERSION}")
    handle.restore_engine_state(client.get("engine", {}))
    load_gorp_state(handle, tag_dir)
    log.info(f"loaded checkpoint {tag_dir}")
    return client["client_state"]


def read_masters(load_dir: str, tag: str | None = None) -> dict[str, Tensor]:
    """Every trained tensor's full fp32 master (flattened), assembled from all ranks' pieces,
    without an engine: for comparing checkpoints and exporting."""
    chosen = resolve_tag(load_dir, tag, checksums=True)
    files = sorted(glob.glob(os.path.join(load_dir, chosen, STATE_DIR, "rank_*.pt")))
    pieces: dict[str, list[tuple[int, int, Tensor]]] = {}
    for path in files:
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        for name, entry in payload["pieces"].items():
            pieces.setdefault(name, []).append((int(entry["elem_start"]), int(entry["elem_end"]), entry["master"]))
    return {name: _assemble(saved, 0, max(e for _, e, _ in saved), name) for name, saved in pieces.items()}
