"""The one weight update ``W ← decay·W − step·U`` (gorp_ds/optim/weight_update.py), through every path
that applies a step: each one goes through ``weight_update`` and matches a float64 reference.

Paths: foreach lists (``plain``/``lora_*`` tensors and ZeRO slices: a dense ``U`` and Adam's ``M / D``),
the low-rank products of ``full`` tensors (``addmm_`` on one matrix, ``baddbmm_`` on a stack, per member
on a list), a ZeRO-3 slice of an fp32 weight, and the split bf16 + int16 masters (eager: whole matrices
and flat slices; compiled on the CPU: the fused kernel the GPU path uses).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gorp_ds.optim.update as update_module
import gorp_ds.zero.lowrank_targets as lowrank_targets_module
import gorp_ds.zero.split_master as split_master
from gorp_ds.optim.param_group import UpdateConfig
from gorp_ds.optim.update import (
    AdamStep,
    LowRankStep,
    apply_adam_,
    apply_direction_,
    apply_low_rank_,
    apply_low_rank_member_,
    low_rank_factors,
)
from gorp_ds.optim.weight_update import Product, Quotient, weight_update
from gorp_ds.zero.lowrank_targets import LowRankTargets, Member

EPS = torch.finfo(torch.float32).eps
STEP = 3e-3
# (lr, weight_decay): decay 1 − lr·wd below 1, and exactly 1 (the multiplication skipped)
DECAYS = {"decay": (3e-2, 1.0), "no decay": (3e-2, 0.0)}


def _cfg(case: str) -> UpdateConfig:
    lr, weight_decay = DECAYS[case]
    return UpdateConfig(role="full", lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, rank=3)


def _assert_fp32_close(got: torch.Tensor, expected: torch.Tensor, ulps: float = 4.0) -> None:
    """``got`` (fp32 arithmetic) against the float64 ``expected``: a few roundings of fp32."""
    tolerance = ulps * EPS * float(expected.abs().max())
    assert float((got.double() - expected).abs().max()) <= tolerance


def _reference(weight: torch.Tensor, direction: torch.Tensor, decay: float, step: float) -> torch.Tensor:
    return decay * weight.double() - step * direction.double()


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """The kind of update each call of ``weight_update`` got, from every module that applies steps."""
    seen: list[str] = []

    def recording(weights, update, decay, step_size):
        kind = "product" if isinstance(update, Product) else "quotient" if isinstance(update, Quotient) else "dense"
        seen.append(f"{'list' if isinstance(weights, list) else weights.dim()}:{kind}")
        return weight_update(weights, update, decay, step_size)

    for module in (update_module, split_master, lowrank_targets_module):
        monkeypatch.setattr(module, "weight_update", recording)
    return seen


@pytest.mark.parametrize("case", list(DECAYS))
def test_foreach_dense_direction(case, calls):
    """``plain`` slices and cut tensors' slices (ZeroDriver): lists of any shapes, fp32 and bf16."""
    cfg = _cfg(case)
    weights = [_random(7, seed=0), _random(5, 3, seed=1), _random(2, 3, 4, seed=2)]
    directions = [_random(*w.shape, seed=10 + i) for i, w in enumerate(weights)]
    expected = [_reference(w, d, cfg.decay, STEP) for w, d in zip(weights, directions)]
    apply_direction_(weights, directions, STEP, cfg)
    for got, want in zip(weights, expected):
        _assert_fp32_close(got, want)
    low = [w.bfloat16() for w in weights]  # low precision: fp32 arithmetic, one rounding
    expected = [_reference(w.float(), d, cfg.decay, STEP) for w, d in zip(low, directions)]
    apply_direction_(low, directions, STEP, cfg)
    for got, want in zip(low, expected):
        assert float((got.double() - want).abs().max()) <= torch.finfo(torch.bfloat16).eps * float(want.abs().max())
    assert calls == ["list:dense", "list:dense"]


@pytest.mark.parametrize("case", list(DECAYS))
def test_foreach_adam_quotient(case, calls):
    """Adam's step ``M / D`` on lists, and on one ``(B, m, n)`` stack whose members are listed."""
    cfg = _cfg(case)
    weights = [_random(4, 6, seed=0), _random(6, 4, seed=1)]
    exp_avgs = [_random(*w.shape, seed=20 + i) for i, w in enumerate(weights)]
    denominators = [_random(*w.shape, seed=30 + i).abs() + 0.5 for i, w in enumerate(weights)]
    expected = [_reference(w, m.double() / d.double(), cfg.decay, STEP) for w, m, d in zip(weights, exp_avgs, denominators)]
    apply_adam_(weights, AdamStep(exp_avgs, denominators, STEP), cfg)
    for got, want in zip(weights, expected):
        _assert_fp32_close(got, want)
    stack = _random(3, 4, 6, seed=3)
    exp_avg, denominator = _random(3, 4, 6, seed=4), _random(3, 4, 6, seed=5).abs() + 0.5
    expected_stack = _reference(stack, exp_avg.double() / denominator.double(), cfg.decay, STEP)
    apply_adam_(list(stack.unbind(0)), AdamStep([exp_avg], [denominator], STEP), cfg)
    _assert_fp32_close(stack, expected_stack)
    assert calls == ["list:quotient", "list:quotient"]


def _low_rank_step(batch: int, m: int, n: int, k: int, seed: int) -> LowRankStep:
    """Tall matrices: ``U_r`` ``(B, m, k)`` and ``Q`` ``(B, n, k)``; wide ones: ``(B, k, n)`` and ``P`` ``(B, m, k)``."""
    normalised = _random(batch, m, k, seed=seed) if m >= n else _random(batch, k, n, seed=seed)
    projector = _random(batch, n if m >= n else m, k, seed=seed + 1)
    return LowRankStep(normalised, projector, STEP, (m, n))


def _dense(update: LowRankStep) -> torch.Tensor:
    left, right = low_rank_factors(update)
    return left.double() @ right.double()  # (B, m, n)


@pytest.mark.parametrize("case", list(DECAYS))
@pytest.mark.parametrize("m, n", [(12, 7), (6, 14)])
def test_low_rank_products(case, m, n, calls):
    """``full`` tensors: one ``addmm_`` per matrix, one ``baddbmm_`` per fp32 stack, one ``addmm_``
    per member of a list, and the dense direction for low-precision members."""
    cfg = _cfg(case)
    update = _low_rank_step(3, m, n, 3, seed=7)
    dense = _dense(update)

    one = _random(m, n, seed=0)
    expected = _reference(one, dense[1], cfg.decay, STEP)
    apply_low_rank_member_(one, update, 1, cfg)
    _assert_fp32_close(one, expected)

    stack = _random(3, m, n, seed=1)
    expected = _reference(stack, dense, cfg.decay, STEP)
    apply_low_rank_(stack, update, cfg)
    _assert_fp32_close(stack, expected)

    members = [_random(m, n, seed=2 + j) for j in range(3)]
    expected_members = [_reference(w, dense[j], cfg.decay, STEP) for j, w in enumerate(members)]
    apply_low_rank_(members, update, cfg)
    for got, want in zip(members, expected_members):
        _assert_fp32_close(got, want)

    low = [w.bfloat16() for w in members]
    expected_low = [_reference(w.float(), dense[j], cfg.decay, STEP) for j, w in enumerate(low)]
    apply_low_rank_(low, update, cfg)
    for got, want in zip(low, expected_low):
        assert float((got.double() - want).abs().max()) <= torch.finfo(torch.bfloat16).eps * float(want.abs().max())
    assert calls == ["2:product", "3:product"] + ["2:product"] * 3 + ["list:dense"]


def _split(masters: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    his = [torch.empty(w.shape, dtype=torch.bfloat16) for w in masters]
    los = [torch.empty(w.shape, dtype=torch.int16) for w in masters]
    for w, hi, lo in zip(masters, his, los):
        split_master.split_(w, hi, lo)
    return his, los


@pytest.mark.parametrize("decay", [0.97, 1.0])
def test_split_master_eager(decay, calls):
    """bf16 weights with their int16 low bits: whole matrices (``addmm_`` on the joined master) and
    flat slices (ZeRO-3), each master exact fp32 arithmetic, the bf16 weight its rounding."""
    c, m, n, k = 3, 20, 12, 3
    masters = [_random(m, n, seed=j) * (j + 1) for j in range(c)]
    left, right = _random(c, m, k, seed=10), _random(c, n, k, seed=11).mT  # a strided Qᵀ, as in use
    his, los = _split(masters)
    split_master.update_(his, los, left, right, decay, STEP, fused=False)
    for j, (w, hi, lo) in enumerate(zip(masters, his, los)):
        got = split_master.join(hi, lo)
        _assert_fp32_close(got, _reference(w, left[j].double() @ right[j].double(), decay, STEP))
        assert torch.equal(hi, got.bfloat16())
    flat_master = masters[0].reshape(-1)[5:37].clone()  # a slice of a flattened weight
    product = _random(32, seed=12)
    (hi,), (lo,) = _split([flat_master])
    split_master.update_flat_(hi, lo, product, decay, STEP)
    _assert_fp32_close(split_master.join(hi, lo), _reference(flat_master, product, decay, STEP))
    assert calls == ["2:product"] * c + ["1:dense"]


def test_split_master_compiled_on_cpu():
    """The fused update the GPU path compiles (one batched GEMM, then per member one elementwise
    kernel with ``weight_update`` inside), compiled here on the CPU, with 0-d tensor scalars."""
    c, m, n, k = 3, 24, 16, 3
    decay = 0.97
    masters = [_random(m, n, seed=j) for j in range(c)]
    left, right = _random(c, m, k, seed=10), _random(c, k, n, seed=11)
    his, los = _split(masters)
    split_master.compiled_update()(his, los, left, right, torch.tensor(decay), torch.tensor(STEP))
    for j, (w, hi, lo) in enumerate(zip(masters, his, los)):
        got = split_master.join(hi, lo)
        _assert_fp32_close(got, _reference(w, left[j].double() @ right[j].double(), decay, STEP))
        assert torch.equal(hi, got.bfloat16())


@pytest.mark.parametrize("split", [False, True], ids=["fp32 weight", "split master"])
def test_zero3_slice_of_a_low_rank_update(split, calls):
    """``LowRankTargets`` under ZeRO-3: elements ``[start, end)`` of a flattened weight, updated from
    the rows of ``left @ right`` they touch (mid-row start and end)."""
    m, n, k, start, end = 10, 8, 3, 13, 61
    decay = 0.97
    full = _random(m, n, seed=0)
    left, right = _random(m, k, seed=1), _random(k, n, seed=2)
    expected = _reference(full, left.double() @ right.double(), decay, STEP).reshape(-1)[start:end]
    weight = full.reshape(-1)[start:end].clone()
    remainder = None
    if split:
        master, weight = weight, torch.empty(end - start, dtype=torch.bfloat16)
        remainder = torch.empty(end - start, dtype=torch.int16)
        split_master.split_(master, weight, remainder)
    member = Member("w", 0, 0, 0, nn.Parameter(torch.zeros(m, n)), remainder, start=start, end=end)
    LowRankTargets._apply_slice(member, weight, left, right, decay, STEP)
    got = split_master.join(weight, remainder) if split else weight
    _assert_fp32_close(got, expected)
    assert calls == ["1:dense"]
