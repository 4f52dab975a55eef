"""O-LoRA's regularisers for the ``o-lora`` method (docs/protocol.md, "o-lora").

Task t trains a fresh adapter (A_t, B_t) on every LoRA layer; the adapters of tasks 1..t−1 are
frozen (merged, exactly in fp32, into the base weights: gorp_ds/models/lora.py) and their A's kept.
The loss adds

    λ1 · Σ_layers Σ_{i<t} Σ_{j,k} |(A_i A_tᵀ)[j, k]|      (orthogonality: A_i, A_t are r × n)
    λ2 · Σ_layers (‖A_t‖_F + ‖B_t‖_F)                      (size of the new adapter; 0 by default)

so that each task's adapter reads its input through a subspace orthogonal to the earlier tasks'.
Both are computed in fp32 from the parameters' current values (bf16 parameters are upcast; the old
A's are the fp32 masters that were merged). Layers whose A's share a shape are batched: one
``bmm`` per shape rather than one small product per layer (a launch-bound model has 60 such layers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .lora import lora_layers


def _current(layer: nn.Module, factor: str) -> Tensor:
    return next(iter(getattr(layer, factor).values())).weight


class OLoraPenalty:
    """The two terms for one task, with the old A's stacked once (``(tasks·r) × n`` per layer, fp32,
    on ``device``) and the trained factors looked up once (the same ``Parameter`` objects for the
    whole task: merges and re-initialisation write into them), so a training step walks no module
    tree. ``old_a``: ``{layer name: [A_1, …, A_{t−1}]}`` (each ``r × n``)."""

    def __init__(self, model: nn.Module, old_a: Mapping[str, list[Tensor]], lambda_orth: float,
                 lambda_l2: float, device: torch.device) -> None:
        self.lambda_orth, self.lambda_l2 = float(lambda_orth), float(lambda_l2)
        self.device = device
        layers = lora_layers(model)
        # Per (A's shape, old rows): the layers' current A's and their old A's as L × (tasks·r) × n.
        self._orth: list[tuple[list[Tensor], Tensor]] = []
        if self.lambda_orth > 0:
            stacked = {n: torch.cat([a.float() for a in old_a[n]], dim=0) for n in layers if old_a.get(n)}
            groups: dict[tuple[tuple[int, ...], int], list[str]] = {}
            for name, rows in stacked.items():
                groups.setdefault((tuple(_current(layers[name], "lora_A").shape), rows.shape[0]), []).append(name)
            for names in groups.values():
                self._orth.append(([_current(layers[n], "lora_A") for n in names],
                                   torch.stack([stacked[n] for n in names]).to(device)))
        # Per (factor, shape), for λ2: the new adapter's factors of that shape.
        self._l2: list[list[Tensor]] = []
        if self.lambda_l2 > 0:
            shapes: dict[tuple[str, tuple[int, ...]], list[Tensor]] = {}
            for layer in layers.values():
                for factor in ("lora_A", "lora_B"):
                    weight = _current(layer, factor)
                    shapes.setdefault((factor, tuple(weight.shape)), []).append(weight)
            self._l2 = list(shapes.values())

    @property
    def active(self) -> bool:
        return bool(self._orth) or bool(self._l2)

    def overlap(self) -> float | None:
        """The orthogonality term now, as a number for the log (None: no earlier A to compare with, or
        λ1 = 0). Before a task's first step it is the chance level of a fresh A; the end of the task
        shows how far λ1 drove it down (one device read)."""
        if not self._orth:
            return None
        with torch.no_grad():
            return float(self.orthogonality())

    def orthogonality(self) -> Tensor:
        """``Σ_layers Σ_old |A_old A_newᵀ|`` summed over entries (the λ1-free term), fp32."""
        terms = []
        for current, old in self._orth:
            new = torch.stack(current).float()  # L × r × n
            terms.append(torch.bmm(old, new.mT).abs().sum())  # L × (tasks·r) × r overlaps
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.device)

    def l2(self) -> Tensor:
        """``Σ_layers ‖A‖_F + ‖B‖_F`` of the adapter being trained (the λ2-free term), fp32."""
        terms = []
        for factors in self._l2:
            stack = torch.stack(factors).float()
            # ‖·‖_F with a zero subgradient at 0 (B starts at zero): sqrt(max(x, tiny)) keeps it finite.
            terms.append(stack.square().sum(dim=(1, 2)).clamp_min(1e-30).sqrt().sum())
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.device)

    def __call__(self) -> Tensor:
        """``λ1 · orthogonality + λ2 · l2`` (only the terms with a positive weight are computed)."""
        total = torch.zeros((), device=self.device)
        if self._orth:
            total = total + self.lambda_orth * self.orthogonality()
        if self._l2:
            total = total + self.lambda_l2 * self.l2()
        return total
