"""LoRA through PEFT: injection, canonical module names, and the task-boundary merge + re-init.

GORP keys its shared spaces by module name (docs/algorithm.md §3), and LoRA factors are re-initialised at
every task, so names must not depend on PEFT's wrapping: ``base_model.model.model.layers.3.
self_attn.q_proj.lora_A.default.weight`` is called ``model.layers.3.self_attn.q_proj.lora_A``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..naming import PEFT_PREFIX as _PEFT_PREFIX
from ..naming import canonical_name  # noqa: F401  (re-exported: models.lora.canonical_name)
from ..optim.bf16_split import join, round_to_bf16, split_, zero_remainder
from ..settings import SettingError, check_settings, setting


@dataclass(kw_only=True)
class LoraSettings:
    """The LoRA adapters of the LoRA methods (the run file's ``lora:`` section; flat names and
    flags carry the prefix ``lora_``: ``--lora-r``)."""

    r: int = setting(8, "LoRA rank r", minimum=1, on_resume="fixed")
    alpha: float = setting(32.0, "LoRA alpha: the adapter's update is scaled by alpha / r", above=0.0, on_resume="fixed")
    targets: list[str] = setting(["q_proj", "v_proj"], "module-name patterns that get an adapter (a pattern "
                                 "matches at a dot boundary; re:<regex> for a regular expression)", on_resume="fixed")
    dropout: float = setting(0.0, "dropout on the LoRA path's input while training (0: none; O-LoRA's scripts use 0.1 "
                                  "for every LoRA method); masks drawn from (seed, task, step, rank)", minimum=0.0,
                             maximum=0.9)
    init_off_shared: bool = setting(True, "(ours) gorp: a new task's LoRA A starts orthogonal to the shared space", on_resume="fixed")
    olora_lambda: float = setting(0.5, "o-lora: λ1, weight of the orthogonality loss Σ|A_old A_newᵀ| between the "
                                       "new task's LoRA A and every earlier task's", minimum=0.0, flat="olora_lambda")
    olora_l2: float = setting(0.0, "o-lora: λ2, weight of Σ(‖A‖_F + ‖B‖_F) of the new task's LoRA (0: off, as in "
                                   "O-LoRA's objective)", minimum=0.0, flat="olora_l2")

    def __post_init__(self) -> None:
        if isinstance(self.alpha, (int, float)) and not self.alpha > 0:
            raise SettingError("alpha", f"must be > 0 (the adapter's update is scaled by alpha / r; 0 makes it a "
                               f"no-op), got {self.alpha}", "lora")
        check_settings(self, "lora")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise SettingError("targets", f"must name at least one module pattern, got {self.targets!r}", "lora")


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA on modules whose name ends with one of ``settings.targets``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, target_modules=list(settings.targets),
                        lora_dropout=settings.dropout, bias="none")
    return get_peft_model(model, config)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{canonical module name: PEFT LoRA layer}`` (e.g. ``model.layers.0.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(_PEFT_PREFIX): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def lora_factor_names(model: nn.Module) -> list[str]:
    """Canonical names of every LoRA A and B factor."""
    names = []
    for name in lora_layers(model):
        names += [f"{name}.lora_A", f"{name}.lora_B"]
    return names


def _seeded_kaiming_(weight: torch.Tensor, seed: int) -> None:
    """PEFT's default A init (kaiming uniform, a=√5), from a generator so all ranks agree."""
    generator = torch.Generator().manual_seed(seed)
    fan_in = weight.shape[1]
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=√5 gives gain·√(3/fan_in) = 1/√fan_in
    values = torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    weight.data.copy_(values.to(weight.dtype))


def seed_lora_dropout(seed: int, task_index: int, step: int, rank: int) -> None:
    """Seed torch's generators (PEFT's LoRA dropout draws from them) for one optimizer step from
    (seed, task, step, rank): the masks are a function of the position, so a resumed run draws the
    ones the uninterrupted run drew (no generator state is checkpointed), and each rank its own."""
    torch.manual_seed(zlib.crc32(f"lora_dropout/{seed}/{task_index}/{step}/{rank}".encode()))


@torch.no_grad()
def init_lora_(model: nn.Module, seed: int, task_index: int) -> list[str]:
    """A from a generator seeded by (seed, task, layer name), B zero: the same on every rank and
    in every run with the same seed (PEFT's own init draws from torch's global generator)."""
    changed = []
    for name, layer in lora_layers(model).items():
        for adapter in layer.lora_A:
            _seeded_kaiming_(layer.lora_A[adapter].weight, zlib.crc32(f"{seed}/{task_index}/{name}".encode()))
            layer.lora_B[adapter].weight.data.zero_()
            changed += [f"{name}.lora_A", f"{name}.lora_B"]
    return changed


def lora_merge_record(model: nn.Module, masters: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """What a merge now adds, per layer: ``{"A": r × n, "B": m × r}`` copies on the CPU of exactly the
    values merged (the fp32 masters when given, as :func:`merge_and_reinit_` uses them; else the
    layer's tensors) and ``"scaling"`` (α/r, a 0-d fp64 tensor). Stored in checkpoints instead of
    the merged weights: at LLaMA-2-7B (q, v, r = 8) 17 MB per task in fp32 where the changed q/v
    matrices would be 2.1 GB."""
    record = {}
    for name, layer in lora_layers(model).items():
        for adapter in layer.lora_A:
            a = masters.get(f"{name}.lora_A") if masters else None
            b = masters.get(f"{name}.lora_B") if masters else None
            record[name] = {"A": (layer.lora_A[adapter].weight if a is None else a).detach().cpu().clone(),
                            "B": (layer.lora_B[adapter].weight if b is None else b).detach().cpu().clone(),
                            "scaling": torch.tensor(float(layer.scaling[adapter]), dtype=torch.float64)}
    return record


@torch.no_grad()
def replay_lora_merges_(model: nn.Module, records: list[dict[str, dict[str, torch.Tensor]]]) -> int:
    """Re-apply, in order, the merges of finished tasks to a freshly loaded model's base weights
    (with :func:`merge_into_base_`, so the weights and their fp32 remainders come back bit-exactly).
    Base weights that train (a LoRA target that is also a full-rank target) are skipped: their
    merged values come back with the fp32 masters. Returns the number of matrices changed."""
    layers = lora_layers(model)
    changed = 0
    for record in records:
        for name, merge in record.items():
            if name not in layers:
                raise KeyError(f"the checkpoint merges LoRA into {name!r}, which this model has no LoRA layer for")
            if layers[name].get_base_layer().weight.requires_grad:
                continue
            merge_into_base_(layers[name], merge["A"], merge["B"])
            changed += 1
    return changed


# The frozen base weight's fp32 low bits, on the base Linear: a non-persistent int16 buffer (not in
# state dicts, checkpoints or exports: the merge records replay it), created by the first merge.
REMAINDER = "lora_merge_remainder"


def merge_remainder(layer: nn.Module) -> torch.Tensor | None:
    """The int16 remainder of a bf16 base weight that LoRA merges accumulate into (None: none yet)."""
    return getattr(layer.get_base_layer(), REMAINDER, None)


@torch.no_grad()
def base_master(layer: nn.Module) -> torch.Tensor:
    """The base weight's exact fp32 value (``m × n``, a new tensor): a bf16 weight joined with its
    merge remainder (gorp_ds/optim/bf16_split.py), otherwise the weight in fp32."""
    weight = layer.get_base_layer().weight
    remainder = merge_remainder(layer)
    if remainder is None or weight.dtype != torch.bfloat16:
        return weight.detach().float().clone()
    return join(weight.data, remainder.to(weight.device))


def _lora_delta(layer: nn.Module, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """``(α/r) B A`` in fp32 on the weight's device (``m × n``)."""
    adapter = next(iter(layer.lora_A))
    a = layer.lora_A[adapter].weight if a is None else a
    b = layer.lora_B[adapter].weight if b is None else b
    device = layer.get_base_layer().weight.device
    return (b.to(device, torch.float32) @ a.to(device, torch.float32)) * float(layer.scaling[adapter])


@torch.no_grad()
def merged_base_weight(layer: nn.Module, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                       base: torch.Tensor | None = None) -> torch.Tensor:
    """``W + (α/r) B A`` of one PEFT LoRA layer, computed in fp32 and rounded once to W's dtype.
    ``a`` (``r × n``) and ``b`` (``m × r``) are the fp32 masters of the factors, ``base`` (``m × n``)
    W's own master when W is trained too; without them the layer's (possibly bf16) tensors are used,
    W in its exact fp32 value (:func:`base_master`: earlier merges' low bits included)."""
    weight = layer.get_base_layer().weight
    base = base_master(layer) if base is None else base.to(weight.device, torch.float32)
    merged = base + _lora_delta(layer, a, b)
    # A bf16 W stands for its fp32 master (merge_into_base_ keeps it split): the same rounding.
    return round_to_bf16(merged) if weight.dtype == torch.bfloat16 else merged.to(weight.dtype)


@torch.no_grad()
def merge_into_base_(layer: nn.Module, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                     base: torch.Tensor | None = None) -> None:
    """``W ← W + (α/r) B A`` in place, exact in fp32 across any number of merges: a bf16 W keeps the
    low 16 bits of its fp32 value in an int16 remainder (2 bytes per element, on W's device), so
    the k-th merge rounds ``W₀ + Σ_{i≤k} ΔW_i`` (summed in fp32) once, not k times. ``base``: W's own
    fp32 master when W is trained (it then owns W's value; no remainder is kept)."""
    module = layer.get_base_layer()
    weight = module.weight
    if base is not None or weight.dtype != torch.bfloat16:
        weight.data.copy_(merged_base_weight(layer, a, b, base))
        return
    remainder = merge_remainder(layer)
    if remainder is None:  # a weight as loaded is exactly its bf16 value
        remainder = zero_remainder(weight.data)
        module.register_buffer(REMAINDER, remainder, persistent=False)
    master = join(weight.data, remainder) + _lora_delta(layer, a, b)
    split_(master, weight.data, remainder)


@torch.no_grad()
def merge_and_reinit_(model: nn.Module, seed: int, task_index: int,
                      masters: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """docs/algorithm.md §4 step 2: ``W ← W + (α/r) B A`` for every LoRA layer, then A re-drawn and B zeroed
    (equivalent to freezing the old adapter, as O-LoRA does). ``masters`` (``{canonical factor
    name: fp32 tensor}``) gives the factors' fp32 master values (and W's, under its module name,
    when W is trained as well): the merge is computed in fp32 from them and accumulated exactly
    (:func:`merge_into_base_`). Deterministic per (seed, task, name), identical on every rank.
    Returns the canonical names of the re-initialised factors."""
    merge_lora_(model, masters)
    return init_lora_(model, seed, task_index + 1)


@torch.no_grad()
def merge_lora_(model: nn.Module, masters: Mapping[str, torch.Tensor] | None = None) -> None:
    """``W ← W + (α/r) B A`` into every LoRA layer's base weight (fp32 from ``masters`` when given,
    see :func:`merge_and_reinit_`); the factors are left as they are."""
    for name, layer in lora_layers(model).items():
        a = masters.get(f"{name}.lora_A") if masters else None
        b = masters.get(f"{name}.lora_B") if masters else None
        base = masters.get(name) if masters else None
        merge_into_base_(layer, a, b, base)


@torch.no_grad()
def project_lora_a_off_(model: nn.Module, bases: dict[str, torch.Tensor]) -> list[str]:
    """Start each new adapter outside the old tasks' input space: ``A ← A − (A S) Sᵀ`` with S
    (``n × s``, orthonormal) the shared space of that layer's ``lora_A``. GORP keeps A's gradients
    out of span(S); a random A would still read those inputs from its first step (ours)."""
    changed = []
    for name, layer in lora_layers(model).items():
        basis = bases.get(f"{name}.lora_A")
        if basis is None:
            continue
        for adapter in layer.lora_A:
            a = layer.lora_A[adapter].weight
            s = basis.to(a.device, torch.float32)
            a32 = a.float()
            a.data.copy_((a32 - (a32 @ s) @ s.mT).to(a.dtype))
            changed.append(f"{name}.lora_A")
    return changed
