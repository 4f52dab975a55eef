"""An fp32 master weight stored as its bf16 model weight plus the 16 low bits (2 bytes per element).

An fp32 number is 32 bits; the bf16 weight the model computes with is its upper 16 bits, rounded.
Keeping the remainder ``lo = bits(master) − bits(hi) · 2¹⁶`` (a signed 16-bit integer, because ``hi``
is rounded to nearest: ``lo ∈ [−2¹⁵, 2¹⁵)``) makes ``(hi, lo)`` an exact, lossless encoding of the
fp32 master. So a ``full`` target's master costs 2 extra bytes per element instead of 4, the model's
bf16 weight *is* the rounded master at all times (no copy, no drift), and updates far below bf16
resolution (``lr_full`` 1e-6 at 7B) accumulate exactly as in fp32.

Rounding: ``hi`` is the master rounded to nearest bf16, ties away from zero (``+0x8000`` on the
magnitude bits), which differs from round-to-nearest-even only on exact ties.

The encoding (``join``, ``split_``) lives in gorp_ds/optim/bf16_split.py (the LoRA merge uses it
too), the update's formula in gorp_ds/optim/weight_update.py (every path's); here is how the
update runs on split masters: join, update in fp32, split. Callers process a matrix (or a few) at
a time so that the fp32 temporaries stay small.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..optim.bf16_split import join, split_, zero_remainder  # noqa: F401  (the encoding; re-exported)
from ..optim.weight_update import Product, weight_update


def _fused_member_(hi: Tensor, lo: Tensor, product: Tensor, decay: Tensor, step: Tensor) -> None:
    """The weight update with ``U = product`` (fp32, the shape of ``hi``) on the master ``join(hi, lo)``,
    split back into ``(hi, lo)`` in place, with the encoding's own ``join`` and ``split_``: compiled, one elementwise
    kernel that reads ``hi``, ``lo`` and the product and writes ``hi``, ``lo`` back (the compiler
    turns the temporaries and copies into the kernel's registers and stores)."""
    split_(weight_update(join(hi, lo), product, decay, step), hi, lo)  # 0-d tensor scalars: out of place


def _fused_update_(his: list[Tensor], los: list[Tensor], left: Tensor, right: Tensor, decay: Tensor,
                   step: Tensor) -> None:
    """Member ``j``: :func:`_fused_member_` with ``U = left[j] @ right[j]``; ``left`` ``(c, m, k)``,
    ``right`` ``(c, k, n)``. Written for ``torch.compile``: one batched GEMM for the
    ``c`` products (``(c, m, n)`` fp32), then one elementwise kernel per member, all from one call
    (one guard check and one launch sequence per batch of targets instead of one per target).
    Scalars as tensors so that changing step sizes do not recompile."""
    product = torch.bmm(left, right)
    for j in range(len(his)):
        _fused_member_(his[j], los[j], product[j], decay, step)


def update_flat_(hi: Tensor, lo: Tensor, product: Tensor, decay: float, step_size: float) -> None:
    """The weight update with ``U = product`` on a split master of any shape (a ZeRO-3 slice),
    ``product`` fp32 of the same number of elements; in place, eager."""
    master = join(hi, lo)
    weight_update(master, product.view(master.shape), decay, step_size)
    split_(master, hi, lo)


_compiled: dict[str, object] = {}


def compiled_update():
    """The compiled :func:`_fused_update_` (compiled on first use; once per batch size ``c``)."""
    fn = _compiled.get("fn")
    if fn is None:
        fn = _compiled["fn"] = torch.compile(_fused_update_, dynamic=False, fullgraph=True)
    return fn


def scalars(decay: float, step_size: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """``decay`` and ``step_size`` as 0-d fp32 tensors on ``device``, filled there (kernel arguments:
    no host-to-device copy, no sync); made once per batch of targets and passed to :func:`update_`."""
    return (torch.full((), decay, dtype=torch.float32, device=device),
            torch.full((), step_size, dtype=torch.float32, device=device))


def update_(his: list[Tensor], los: list[Tensor], left: Tensor, right: Tensor, decay: float, step_size: float,
            scalar_tensors: tuple[Tensor, Tensor] | None = None, *, fused: bool = True) -> None:
    """The weight update with ``U_j = left[j] @ right[j]`` on the split masters ``(his[j], los[j])``
    (``m × n`` each; ``left`` ``(c, m, k)``, ``right`` ``(c, k, n)``), in place.

    On CUDA and with ``fused``, one ``torch.compile``d call does all ``c``: a batched GEMM, then per
    member a kernel that reads ``hi``, ``lo`` and the product once and writes ``hi``, ``lo`` once
    (~16 bytes per element; the caller bounds ``c`` so that the ``(c, m, n)`` fp32 products stay small). If compiling fails it
    falls back, once and with a warning, to the eager sequence (join, ``addmm_``, split: ~90 bytes per
    element, one member at a time; also the path without ``fused``, which the caller picks where the
    compilation would cost more than the traffic it saves). Both are exact fp32 arithmetic on the master."""
    if fused and his[0].is_cuda and _compiled.get("fn") is not False:
        try:
            decay_t, step_t = scalar_tensors if scalar_tensors is not None else scalars(decay, step_size, his[0].device)
            compiled_update()(list(his), list(los), left, right, decay_t, step_t)
            return
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager path is exact too
            from ..log import get_logger

            get_logger(__name__).warning(f"fused split-master update unavailable ({type(err).__name__}: {err}); "
                                         "using the eager path")
            _compiled["fn"] = False
    for hi, lo, a, b in zip(his, los, left, right):
        master = join(hi, lo)
        weight_update(master, Product(a, b), decay, step_size)  # (m, n) fp32: one addmm_
        split_(master, hi, lo)
