"""The methods a run can train, as data: one :class:`MethodSpec` per method in one registry.

The runner, the session and the parameter groups ask a method's spec what to do (whether it has
LoRA adapters, which optimizer roles its tensors take, whether the shared space S applies, whether
its tasks are mixed into one, which penalty joins the loss, what happens at a task boundary) and
never compare a method's name. A new method is one :func:`register` call.

| method   | adapters | GORP roles (S)      | trains                          | boundary                         |
|----------|----------|---------------------|---------------------------------|----------------------------------|
| gorp     | LoRA     | lora_a/lora_b, full | LoRA + full-rank targets        | merge; S grows; new A off S      |
| galore   | LoRA     | same, ε_S = 0       | LoRA + full-rank targets        | merge                            |
| seq-lora | LoRA     | plain AdamW         | LoRA                            | merge                            |
| o-lora   | LoRA     | plain AdamW         | LoRA, + orthogonality penalty   | merge; remember A for the penalty|
| mtl      | LoRA     | plain AdamW         | LoRA, all tasks mixed into one  | merge                            |
| seq-ft   | none     | plain AdamW         | every weight                    | –                                |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .olora import OLoraPenalty


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """What one method trains and how; every field is a question the runner asks."""

    name: str
    summary: str
    # LoRA adapters on --lora-targets, merged into the base weights (fp32, from the masters) and
    # re-initialised at every task boundary. False: no adapters (every weight trains).
    adapters: bool = True
    # True: LoRA factors take GORP's lora_a / lora_b roles and --full-targets train at full rank with
    # projected Adam; False: every trained tensor is a plain AdamW tensor.
    gorp_roles: bool = False
    # The shared space S of finished tasks protects new gradients (ε_S = --shared-threshold);
    # False: ε_S = 0 (S stays empty).
    shared_space: bool = False
    # With no adapters: every weight of the model trains (full fine-tuning).
    train_all_weights: bool = False
    # All tasks mixed into one training task (multi-task learning: R has its first and last row).
    mixed_tasks: bool = False
    # A loss term built from the finished tasks' LoRA A's (fp32 masters remembered at each boundary):
    # ``penalty(module, old_lora_a, lambda, l2, device)``; None: no penalty.
    penalty: Callable[..., Any] | None = None
    # At a task boundary, after S grows: the new adapters' A start off the shared space (when
    # --lora-init-off-shared is on).
    lora_init_off_shared: bool = False
    # Why ZeRO-3 cannot run it (None: it can).
    zero3_refusal: str | None = None

    def __post_init__(self) -> None:
        if self.train_all_weights and self.adapters:
            raise ValueError(f"method {self.name}: train_all_weights trains the base weights, so it has no adapters")
        if (self.gorp_roles or self.shared_space or self.lora_init_off_shared or self.penalty) and not self.adapters:
            raise ValueError(f"method {self.name}: GORP roles, S, LoRA initialisation and penalties need adapters")
        if self.shared_space and not self.gorp_roles:
            raise ValueError(f"method {self.name}: the shared space protects GORP's roles only")

    @property
    def remembers_adapters(self) -> bool:
        """Whether finished tasks' A's are kept (for the penalty) and checkpointed with the merges."""
        return self.penalty is not None


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (a name may be registered once)."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name is a ValueError that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


register(MethodSpec(name="gorp", summary="LoRA + full-rank targets with projected Adam, protected by S",
                    gorp_roles=True, shared_space=True, lora_init_off_shared=True))
register(MethodSpec(name="galore", summary="gorp without the shared space (ε_S = 0)", gorp_roles=True))
register(MethodSpec(name="seq-lora", summary="LoRA with AdamW, tasks in sequence"))
register(MethodSpec(name="o-lora", summary="LoRA with AdamW and O-LoRA's orthogonality penalty",
                    penalty=OLoraPenalty,
                    zero3_refusal="o-lora's orthogonality loss reads every task's LoRA A outside its layer's "
                                  "forward, where ZeRO-3 keeps them partitioned"))
register(MethodSpec(name="mtl", summary="LoRA with AdamW on all tasks mixed (multi-task upper bound)",
                    mixed_tasks=True))
register(MethodSpec(name="seq-ft", summary="full fine-tuning with AdamW, tasks in sequence", adapters=False,
                    train_all_weights=True))
