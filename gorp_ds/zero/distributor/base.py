"""The one interface through which the rest of the project reaches trainable tensors, wherever
they live: whole in one process, cut into ZeRO-1/2 flat partitions, or partitioned per tensor by
ZeRO-3. One class per case implements it (``local.py``, ``flat.py``, ``stage3.py``); the engine
carries its instance as ``engine.gorp``.

Masters are reported as ``{name: (elem_start, elem_end, flat fp32 master view)}``: the elements
``[elem_start, elem_end)`` of the flattened tensor that this rank updates. Checkpoints, exports and
the run layer work on that contract only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from ...optim.gorp import GORP
from ..lowrank_targets import LowRankTargets

Masters = dict[str, tuple[int, int, Tensor]]


class Distributor(ABC):
    """What the project needs from a GORP optimizer placed by DeepSpeed (or by nobody)."""

    def __init__(self, engine: Any, optimizer: GORP, params_by_name: dict[str, nn.Parameter],
                 low_rank: LowRankTargets | None) -> None:
        self.engine = engine  # the DeepSpeed engine (None for a process without DeepSpeed)
        self.optimizer = optimizer
        self.params_by_name = params_by_name  # the tensors GORP steps through DeepSpeed, by module name
        self.low_rank = low_rank  # the ``full`` targets trained from projected gradients, if any
        first = next(iter(params_by_name.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    # ------------------------------------------------------------------ masters
    @abstractmethod
    def held_masters(self) -> Masters:
        """``{name: (elem_start, elem_end, flat fp32 master view)}`` for what this rank updates."""

    @abstractmethod
    def replicated_names(self) -> set[str]:
        """Tensors every rank holds whole and updates identically; checkpoints write them once."""

    @abstractmethod
    def primary_holders(self) -> set[str]:
        """Names of the tensors whose whole low-rank state and S this rank writes to checkpoints."""

    @abstractmethod
    def masters_from_model(self, names: Iterable[str]) -> None:
        """After the model's trainable tensors ``names`` were changed in place identically on every
        rank (LoRA merge and re-init, inside :meth:`gathered` with ``modify``), copy them into the
        fp32 masters."""

    @abstractmethod
    def model_from_masters(self) -> None:
        """Push the fp32 masters into the (bf16) model weights on every rank (after loading masters)."""

    @abstractmethod
    def gather_masters(self, names: Iterable[str], to_rank: int | None = None) -> dict[str, Tensor]:
        """Whole fp32 masters of ``names``, each in its parameter's shape. A collective: every rank
        calls it with the same names; with ``to_rank`` set, other ranks get ``{}``."""

    @abstractmethod
    def held_state_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape in which this rank keeps the elementwise (``plain``) state of a tensor of
        ``shape``: its own where tensors are held whole, flat where they are held as slices."""

    # ------------------------------------------------------------------ whole tensors
    @abstractmethod
    def gathered(self, params: Iterable[Tensor], modify: bool = False) -> AbstractContextManager[None]:
        """Inside, ``params`` are whole on every rank. ``modify``: changes made inside (identically
        on every rank) are kept; refresh the masters of trainable tensors with
        :meth:`masters_from_model` afterwards."""

    @abstractmethod
    def for_generation(self, strategy: str = "auto") -> AbstractContextManager[str]:
        """Evaluation and generation with every parameter usable; yields the strategy used."""

    def is_partitioned(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is empty outside :meth:`gathered` (a ZeRO-3 parameter)."""
        return False

    def numel(self, tensor: Tensor) -> int:
        """Elements of the whole tensor."""
        return tensor.numel()

    def shape(self, tensor: Tensor) -> tuple[int, ...]:
        """Shape of the whole tensor."""
        return tuple(tensor.shape)

    # ------------------------------------------------------------------ the step
    @abstractmethod
    def _step_gradients(self) -> list[Tensor]:
        """The gradients of the optimizer step under way that this rank holds."""

    @abstractmethod
    def _agree_on_flag(self, found: Tensor) -> None:
        """Make ``found`` (1 element, 1.0 = non-finite) the maximum over the ranks that step together."""

    @torch.no_grad()
    def gradients_finite(self, loss: Tensor | None = None) -> Tensor:
        """A device bool (0-d): True when every rank's gradients of this optimizer step, and every
        rank's ``loss`` (a local scalar), are finite. Call after the backward pass of the step's last
        micro-batch and before ``engine.step()``. One fused non-finite check per rank, one
        1-element all-reduce (MAX) so that all ranks decide alike; no host sync."""
        device = self.device
        found = torch.zeros(1, dtype=torch.float32, device=device)
        grads = self._step_gradients()
        if self.low_rank is not None:  # the `full` targets' projected gradients (this rank's sums, before the all-reduce)
            grads.append(self.low_rank.flat_low_rank)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for dtype, same in by_dtype.items():
            if dtype in (torch.float32, torch.float16) or device.type == "cpu":
                # The AMP check sets `found` to 1 on any inf/NaN; the unscale factor 1 leaves values unchanged.
                torch._amp_foreach_non_finite_check_and_unscale_(same, found, torch.ones(1, device=device))
            else:  # bf16 on CUDA has no AMP check kernel: a NaN or inf makes that tensor's norm non-finite
                norms = torch.stack(torch._foreach_norm(same)).float()
                found = torch.maximum(found, (~torch.isfinite(norms)).any().float().reshape(1))
        if loss is not None:
            found = torch.maximum(found, (~torch.isfinite(loss.detach().float())).float().reshape(1).to(device))
        self._agree_on_flag(found)
        return found[0] == 0

    # ------------------------------------------------------------------ processes and engine counters
    def barrier(self) -> None:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.barrier()

    @property
    def rank(self) -> int:
        return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1

    # Engine counters a resumed run must continue from (DeepSpeed's module and optimizer files are
    # not written: gorp_ds checkpoints hold the trainable state themselves).
    _COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")

    def engine_state(self) -> dict[str, Any]:
        """The engine's step counters and its LR scheduler's state (when the config has one)."""
        if self.engine is None:
            return {}
        state: dict[str, Any] = {k: int(getattr(self.engine, k)) for k in self._COUNTERS if hasattr(self.engine, k)}
        scheduler = getattr(self.engine, "lr_scheduler", None)
        if scheduler is not None and hasattr(scheduler, "state_dict"):
            state["lr_scheduler"] = scheduler.state_dict()
        return state

    def restore_engine_state(self, state: dict[str, Any]) -> None:
        if self.engine is None:
            return
        for key in self._COUNTERS:
            if key in state:
                setattr(self.engine, key, int(state[key]))
        scheduler = getattr(self.engine, "lr_scheduler", None)
        if scheduler is not None and state.get("lr_scheduler") is not None:
            scheduler.load_state_dict(state["lr_scheduler"])

