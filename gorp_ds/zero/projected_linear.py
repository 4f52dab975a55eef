"""Linear layers of ``full`` targets whose backward hands ``(X, δ)`` to a gradient sink.

The owner of the ``full`` tensors (``gorp_ds.zero.lowrank_targets``) installs this on each target's
``nn.Linear``. Forward is the ordinary ``x Wᵀ (+ b)``. Backward returns the input gradient ``δ W``
as usual and, instead of a weight gradient, calls ``sink.linear_backward(key, X, δ)`` with the
layer's input and output gradient flattened to ``(tokens, n)`` and ``(tokens, m)``: the sink forms
the low-rank gradient ``R`` (or, on projector refresh steps, ``G``) from them. The weight itself does
not require a gradient, so autograd never forms ``G`` and DeepSpeed never sees the tensor.

- The sink is called only from backward: under (non-reentrant) gradient checkpointing the
  forward runs twice, the backward once, so nothing is accumulated twice.
- Where the input does not require a gradient (e.g. a first layer fed by frozen embeddings), a
  zero-size ``anchor`` that does is an extra input of the call, so the backward runs anyway.
- Without autograd (evaluation, generation) the layer is a plain ``F.linear``.
- Under ZeRO-3 the weight saved by forward is the parameter itself; DeepSpeed's pre-backward hook
  of the module gathers it again before this backward runs. Backward checks that it is whole
  (``m × n``, a host-side shape check), never the empty partition placeholder.
"""

from __future__ import annotations

from types import MethodType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..naming import canonical_name


class GradientSink(Protocol):
    def linear_backward(self, key: int, x: Tensor, delta: Tensor) -> None: ...


class _ProjectedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, anchor: Tensor | None, sink: GradientSink,
                key: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sink, ctx.key = sink, key
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        if weight.dim() != 2 or weight.shape[0] != grad_out.shape[-1]:
            raise RuntimeError(f"projected Linear {ctx.key}: the weight in backward has shape {tuple(weight.shape)}, "
                               "not the gathered matrix (a ZeRO-3 partition placeholder?)")
        grad_in = grad_out @ weight if ctx.needs_input_grad[0] else None  # (…, m) @ (m, n)
        ctx.sink.linear_backward(ctx.key, x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1]))
        return grad_in, None, None, None, None, None


def _projected_forward(self: nn.Linear, x: Tensor) -> Tensor:
    if not torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    # The anchor only where nothing else makes autograd run this backward: a fresh leaf per call
    # costs an allocation forward and an AccumulateGrad node backward, on the host-bound hot path.
    anchor = None if x.requires_grad else torch.empty(0, device=x.device, requires_grad=True)
    return _ProjectedLinear.apply(x, self.weight, self.bias, anchor, self._gorp_sink, self._gorp_key)


class ProjectedLinearError(ValueError):
    """A ``full`` target that cannot take projected gradients (not a plain Linear, trainable bias)."""


def linear_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """``{canonical tensor name: its nn.Linear}`` for weight names such as ``model.layers.0.mlp.gate_proj``."""
    found: dict[str, nn.Linear] = {}
    for module_name, module in model.named_modules():
        name = canonical_name(f"{module_name}.weight")
        if name in names:
            found[name] = module
    missing = [n for n in names if n not in found]
    if missing:
        raise ProjectedLinearError(f"full-rank target {missing[0]!r}: no module of that name in the model")
    for name, module in found.items():
        if type(module) is not nn.Linear:
            raise ProjectedLinearError(
                f"full-rank target {name!r} is a {type(module).__name__}, not a plain torch.nn.Linear; projected "
                "gradients need one (use --full-gradients flat, or target a Linear that is not LoRA-wrapped)")
        if module.bias is not None and module.bias.requires_grad:
            raise ProjectedLinearError(f"full-rank target {name!r} has a trainable bias; freeze it or use "
                                       "--full-gradients flat")
    return found


def install(modules: dict[str, nn.Linear], keys: dict[str, int], sink: GradientSink) -> None:
    """Route the backward of every module through ``sink`` (``keys``: name -> the sink's key)."""
    for name, module in modules.items():
        module._gorp_sink, module._gorp_key = sink, keys[name]
        module.forward = MethodType(_projected_forward, module)


def uninstall(modules: dict[str, nn.Linear]) -> None:
    for module in modules.values():
        if "forward" in module.__dict__:
            del module.forward
        for attr in ("_gorp_sink", "_gorp_key"):
            module.__dict__.pop(attr, None)
