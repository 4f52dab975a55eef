"""Stacked optimizer state: one ``(B, …)`` buffer per state key for a batch of same-shape tensors.

The optimizer's state stays ``{module name: {key: tensor}}`` (what ``state_dict`` and checkpoints
see). For a batch of tensors updated together, those per-name tensors are *views* into stacked
buffers, so the update runs on whole stacks without gathering or scattering. The binding is
derived, never stored: whenever a member's state is not (or no longer) a view of the stack — a
fresh task after ``end_task``, a ``load_state_dict``, a checkpoint load — the stack is rebuilt from
the per-name tensors, which keeps saving and loading exact.

Keys per role (shapes per member; ``d × k`` projector, ``R``-shaped moments for ``full``):

- ``lora_a``/``lora_b``: ``step`` (CPU int64), ``exp_avg``, ``exp_avg_sq`` (tensor's shape).
- ``full``: ``step``, ``projector_failures`` (device int64: counted without a host sync),
  ``projector``, ``exp_avg``, ``exp_avg_sq``. The last three appear in a member's state only once
  its first projector of the task succeeded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .projector import projection_side
from .shared_space import stack_bases

LOW_RANK_KEYS = ("projector", "exp_avg", "exp_avg_sq")


def state_shapes(role: str, shape: tuple[int, ...], rank: int) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
    """``{key: (member shape, dtype, on the CPU)}`` of a protected tensor's state."""
    keys: dict[str, tuple[tuple[int, ...], torch.dtype, bool]] = {"step": ((), torch.int64, True)}
    if role != "full":
        keys["exp_avg"] = keys["exp_avg_sq"] = (tuple(shape), torch.float32, False)
        return keys
    m, n = shape
    right = projection_side(shape) == "right"
    keys["projector_failures"] = ((), torch.int64, False)
    keys["projector"] = ((n, rank) if right else (m, rank), torch.float32, False)
    keys["exp_avg"] = keys["exp_avg_sq"] = ((m, rank) if right else (rank, n), torch.float32, False)
    return keys


class StateStack:
    """State of the batch ``names`` (same role and shape) as stacked buffers with per-name views."""

    def __init__(self, names: tuple[str, ...], role: str, shape: tuple[int, ...], rank: int) -> None:
        self.names, self.role, self.shape, self.rank = names, role, tuple(shape), rank
        self.specs = state_shapes(role, self.shape, rank)
        self.buffers: dict[str, Tensor] = {}
        self._views: list[dict[str, Tensor]] = []
        self._shared_members: list[Tensor | None] | None = None
        self._shared: Tensor | None = None

    # ------------------------------------------------------------------ binding
    def _expected_keys(self, member_state: dict[str, Tensor]) -> tuple[str, ...]:
        if self.role == "full" and "projector" not in member_state:
            return ("step", "projector_failures")
        return tuple(self.specs)

    def is_bound(self, state: dict) -> bool:
        if not self.buffers:
            return False
        for i, name in enumerate(self.names):
            member = state.get(name)
            if not member:
                return False
            keys = self._expected_keys(member)
            if len(member) != len(keys):
                return False
            for key in keys:
                if member.get(key) is not self._views[i][key]:
                    return False
        return True

    def bind(self, state: dict, device: torch.device) -> None:
        """Make ``state[name][key]`` views of the stacked buffers, rebuilding them from the
        per-name tensors (zeros where a member has none yet) unless they already are."""
        if self.is_bound(state):
            return
        batch = len(self.names)
        members = [state.get(name) or {} for name in self.names]
        self.buffers = {}
        for key, (shape, dtype, on_cpu) in self.specs.items():
            buffer = torch.zeros((batch, *shape), dtype=dtype, device="cpu" if on_cpu else device)
            for i, member in enumerate(members):
                if key in member:
                    buffer[i].copy_(member[key])
            self.buffers[key] = buffer
        self._views = [{key: buffer[i] for key, buffer in self.buffers.items()} for i in range(batch)]
        for i, (name, member) in enumerate(zip(self.names, members)):
            state[name] = {key: self._views[i][key] for key in self._expected_keys(member)}

    def attach_low_rank(self, state: dict, index: list[int]) -> None:
        """Members ``index`` got their first projector of the task: expose its and the moments' views."""
        for i in index:
            for key in LOW_RANK_KEYS:
                state[self.names[i]][key] = self._views[i][key]

    def steps(self) -> list[int]:
        """Members' step counters (a CPU tensor: no device sync)."""
        return self.buffers["step"].tolist()

    # ------------------------------------------------------------------ shared spaces
    def shared_stack(self, shared: dict[str, Tensor]) -> Tensor | None:
        """The members' S zero-padded into one ``(B, d, s_max)`` stack, rebuilt only when some
        member's S changed (task boundaries, loads)."""
        current = [shared.get(name) for name in self.names]
        cached = self._shared_members
        if cached is None or any(a is not b for a, b in zip(current, cached)):
            self._shared_members = current
            self._shared = stack_bases(current)
        return self._shared


def select(stack: Tensor, index: list[int], batch: int) -> Tensor:
    """Members ``index`` of a ``(B, …)`` stack: the stack itself when all are selected, a
    contiguous slice when they are consecutive, else a stacked copy (no device index tensor, so no
    host-to-device copy)."""
    if index == list(range(index[0], index[0] + len(index))):  # in order (all members: the stack itself)
        if len(index) == batch:
            return stack
        return stack[index[0] : index[0] + len(index)]
    return torch.stack([stack[i] for i in index])


def store(stack: Tensor, index: list[int], values: Tensor) -> None:
    """Write ``values`` (from :func:`select`) back into members ``index`` unless it is already a view."""
    if values.data_ptr() == stack[index[0]].data_ptr() and values.stride() == stack.stride():
        return  # a view: in-place updates already landed
    if index == list(range(index[0], index[0] + len(index))):
        stack[index[0] : index[0] + len(index)].copy_(values)
    else:
        torch._foreach_copy_([stack[i] for i in index], list(values.unbind(0)))


def partition_by_step(steps: list[int]) -> list[tuple[int, list[int]]]:
    """``[(step, member positions)]``: members whose counters agree step together (normally all)."""
    parts: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        parts.setdefault(step, []).append(i)
    return list(parts.items())


def restore_tensor_state(state: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Copy of a saved per-tensor state: the step counter stays on the CPU, everything else
    (the projector failure counter included) goes to ``device``."""
    return {k: v.clone() if k == "step" else v.to(device, copy=True) for k, v in state.items()}
