"""Pieces of the projected-gradient path on one process: the low-rank gradient from activations against
G Q in float64, the custom Linear under gradient checkpointing, the split fp32 master, the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gorp_ds.optim.lowrank_grad import accumulate_full_gradient_, accumulate_low_rank_
from gorp_ds.zero import projected_linear, split_master


@pytest.mark.parametrize("m, n", [(24, 10), (10, 24)])  # right and left projection
def test_low_rank_gradient_is_the_projected_weight_gradient(m, n):
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(50, n, generator=g), torch.randn(50, m, generator=g)
    full = (delta.double().mT @ x.double())  # G = δᵀ X, float64
    side = "right" if m >= n else "left"
    projector = torch.linalg.qr(torch.randn(n if side == "right" else m, 3, generator=g))[0]
    expected = full @ projector.double() if side == "right" else projector.double().mT @ full
    got = torch.zeros(expected.shape)
    accumulate_low_rank_(got, x, delta, projector, side)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    accumulated = torch.zeros_like(got)
    accumulate_low_rank_(accumulated, x[:20], delta[:20], projector, side)
    accumulate_low_rank_(accumulated, x[20:], delta[20:], projector, side)
    assert torch.allclose(accumulated.double(), expected, rtol=1e-5, atol=1e-5)
    g_acc = torch.zeros(m, n)
    accumulate_full_gradient_(g_acc, x, delta)
    assert torch.allclose(g_acc.double(), full, rtol=1e-5, atol=1e-5)
    bf16 = torch.zeros_like(got)  # bf16 activations: bf16 products, accumulated in fp32
    accumulate_low_rank_(bf16, x.bfloat16(), delta.bfloat16(), projector, side)
    assert float((bf16.double() - expected).norm() / expected.norm()) < 2e-2


class _Sink:
    def __init__(self):
        self.calls = []

    def linear_backward(self, key, x, delta):
        self.calls.append((key, x.clone(), delta.clone()))


def test_projected_linear_under_checkpointing_calls_the_sink_once_per_backward():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 9, bias=False), nn.Tanh(), nn.Linear(9, 4, bias=False))
    model = nn.Sequential(*[nn.Linear(6, 9, bias=False), nn.Tanh(), nn.Linear(9, 4, bias=False)])
    model.load_state_dict(base.state_dict())
    modules = projected_linear.linear_modules(model, ["0"])
    model[0].weight.requires_grad_(False)
    sink = _Sink()
    projected_linear.install(modules, {"0": 7}, sink)
    x = torch.randn(5, 3, 6)  # the input requires no gradient: the anchor still runs the backward
    checkpoint(model, x, use_reentrant=False).pow(2).sum().backward()
    assert len(sink.calls) == 1, "recomputed forward must not call the sink"
    key, seen_x, delta = sink.calls[0]
    base(x).pow(2).sum().backward()
    assert key == 7 and torch.equal(seen_x, x.reshape(-1, 6))
    assert torch.allclose(delta.mT @ seen_x, base[0].weight.grad, rtol=1e-5, atol=1e-6)  # G from (X, δ)
    assert torch.allclose(model[2].weight.grad, base[2].weight.grad, rtol=1e-5, atol=1e-6)  # δ W flowed back
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    projected_linear.uninstall(modules)
    assert "forward" not in model[0].__dict__


def test_non_linear_full_target_is_refused():
    model = nn.Sequential(nn.Conv1d(2, 2, 1))
    with pytest.raises(projected_linear.ProjectedLinearError, match="not a plain torch.nn.Linear"):
        projected_linear.linear_modules(model, ["0"])


def test_split_master_is_exact_fp32_and_accumulates_updates_below_bf16_resolution():
    g = torch.Generator().manual_seed(0)
    master = torch.randn(64, 32, generator=g) * 0.02
    master[0, :4] = torch.tensor([0.0, -0.0, 1.0, -1.0])
    hi, lo = torch.empty(master.shape, dtype=torch.bfloat16), torch.empty(master.shape, dtype=torch.int16)
    split_master.split_(master, hi, lo)
    assert torch.equal(split_master.join(hi, lo).view(torch.int32), master.view(torch.int32))
    assert torch.equal(hi, master.bfloat16())  # round to nearest (no ties here)
    left, right = torch.randn(64, 2, generator=g), torch.randn(2, 32, generator=g)
    reference = master.clone()
    for _ in range(200):  # lr-1e-6-sized steps: each far below bf16 resolution of |w| ~ 0.02
        reference.addmm_(left, right, beta=1.0, alpha=-1e-7)
        split_master.update_([hi], [lo], left[None], right[None], 1.0, 1e-7)
    assert torch.equal(split_master.join(hi, lo), reference)
    assert torch.equal(hi, reference.bfloat16())
    naive = master.bfloat16()
    for _ in range(200):
        naive = (naive.float() - 1e-7 * (left @ right)).bfloat16()
    # Without the low bits the same updates are lost: almost no bf16 weight moves at all.
    assert float((naive != master.bfloat16()).float().mean()) < 0.05
    assert float((reference != master).float().mean()) > 0.95


def test_a_module_both_lora_and_full_target_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from gorp_ds.models import LoraSettings, RoleError, TargetsConfig, add_lora, build_param_groups
    from gorp_ds.optim.config import OptimizerConfig

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(targets=["q_proj", "v_proj"]))
    with pytest.raises(RoleError, match=r"both a LoRA target \(--lora-targets\) and a full-rank target \(--full-targets"):
        build_param_groups(model, "gorp", TargetsConfig(full_targets=["self_attn.q_proj"]), OptimizerConfig())
    groups = build_param_groups(model, "gorp", TargetsConfig(full_targets=["mlp.gate_proj"]), OptimizerConfig())
    assert groups[-1]["role"] == "full"


def test_full_gradients_setting_is_validated():
    import argparse

    from gorp_ds.cl.command_line import add_arguments, build_run_config
    from gorp_ds.cl.config import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert build_run_config(parser.parse_args(["--model", "x"])).targets.full_gradients == "projected"
    assert build_run_config(parser.parse_args(["--model", "x", "--full-gradients", "flat"])).targets.full_gradients == "flat"
    with pytest.raises(ConfigError, match="--full-gradients must be one of projected, flat"):
        build_run_config(parser.parse_args(["--model", "x", "--full-gradients", "dense"]))


@pytest.mark.parametrize("m, n", [(40, 12), (12, 40)])
def test_projectors_from_products_equal_projectors_from_the_gradient(m, n):
    """The sketch refresh's range finder (products only) against the one on G: same test matrices,
    same algorithm, so the same projector up to rounding; the G used by the products is δᵀX."""
    from gorp_ds.optim.projector import compute_projectors, compute_projectors_op

    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(64, n, generator=g), torch.randn(64, m, generator=g)
    grad = (delta.mT @ x).unsqueeze(0)
    expected, ok = compute_projectors(grad, 3, "randomized", seeds=[5], oversample=4, power_iters=2)
    got, ok_op = compute_projectors_op(lambda v: (delta.mT @ (x @ v[0])).unsqueeze(0),
                                       lambda u: (x.mT @ (delta @ u[0])).unsqueeze(0), (1, m, n), 3, seeds=[5],
                                       oversample=4, power_iters=2, device=torch.device("cpu"))
    assert bool(ok[0]) and bool(ok_op[0])
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    # and against an independent reference: an orthonormal basis capturing the top-3 singular
    # directions of G (float64 torch.linalg.svd) on the projected side
    g64, p64 = grad[0].double(), got[0].double()
    assert torch.allclose(p64.mT @ p64, torch.eye(3, dtype=torch.float64), atol=1e-5)
    top = torch.linalg.svd(g64).S[:3].norm()
    captured = (g64 @ p64).norm() if m >= n else (p64.mT @ g64).norm()
    assert captured >= 0.99 * top, float(captured / top)


def test_compiled_in_place_split_master_update_is_the_fp32_update():
    """The fused update the GPU path compiles (one call for a batch of targets: a batched GEMM, then
    in place on each bf16 weight and its low bits), compiled here on the CPU: every master it leaves
    is decay·master − step·left[j]@right[j] to fp32 rounding (float64 reference), with the bf16 weight
    the rounded master; the eager path (one member at a time) gives the same masters."""
    g = torch.Generator().manual_seed(0)
    c, m, n, k = 3, 48, 24, 3
    masters = [torch.randn(m, n, generator=g) * (j + 1) for j in range(c)]
    left, right = torch.randn(c, m, k, generator=g), torch.randn(c, n, k, generator=g).mT  # a strided Qᵀ, as in use
    results = {}
    for path in ("compiled", "eager"):
        his = [w.bfloat16() for w in masters]
        los = [torch.zeros(m, n, dtype=torch.int16) for _ in range(c)]
        for w, hi, lo in zip(masters, his, los):
            split_master.split_(w, hi, lo)
        if path == "compiled":
            split_master.compiled_update()(his, los, left, right, torch.tensor(0.999), torch.tensor(3e-4))
        else:
            split_master.update_(his, los, left, right, 0.999, 3e-4)
        results[path] = [split_master.join(hi, lo) for hi, lo in zip(his, los)]
        for j, (w, hi) in enumerate(zip(masters, his)):
            expected = w.double() * 0.999 - 3e-4 * (left[j].double() @ right[j].double())
            got = results[path][j]
            tolerance = 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())
            assert float((got.double() - expected).abs().max()) <= tolerance, (path, j)
            assert torch.equal(hi, got.bfloat16()), "the bf16 weight must be the master rounded to nearest"
            assert not torch.equal(got, w), "the update must have been applied"
    for a, b in zip(results["compiled"], results["eager"]):
        assert float((a - b).abs().max()) <= 2 * torch.finfo(torch.float32).eps * float(b.abs().max())


def test_split_master_updates_are_chunked_and_skip_members_on_other_paths():
    """``LowRankTargets`` updates the whole bf16 targets of a batch together, in chunks bounded by
    ``update_bytes``; members at positions it is not given (a ZeRO-3 slice, an fp32 weight) are
    untouched, and a chunk of non-adjacent positions takes the right factors (float64 reference)."""
    from gorp_ds.optim import GORP
    from gorp_ds.optim.update import BatchUpdate, LowRankStep
    from gorp_ds.zero.lowrank_targets import LowRankTargets, claim_targets

    g = torch.Generator().manual_seed(3)
    m, n, k, layers = 20, 12, 3, 4
    model = nn.Sequential(*[nn.Linear(n, m, bias=False) for _ in range(layers)]).to(torch.bfloat16)
    names = [str(i) for i in range(layers)]
    opt = GORP([{"params": list(model.parameters()), "names": names, "role": "full", "lr": 1e-2, "rank": k}])
    targets = LowRankTargets(opt, claim_targets(opt.detach_groups("full"), model), rank=0, world=1,
                             all_reduce=lambda t: None, is_boundary=lambda: True, accumulation=1)
    for member in targets.members:  # masters below bf16 resolution: the low bits must carry them
        member.remainder.copy_(torch.randint(-2**15, 2**15, (m, n), generator=g, dtype=torch.int16))
    before = [split_master.join(mb.weight.data, mb.remainder).double() for mb in targets.members]
    targets.update_bytes = 2 * m * n * 4  # two products at a time
    normalised, projector = torch.randn(layers, m, k, generator=g), torch.randn(layers, n, k, generator=g)
    update = BatchUpdate(list(range(layers)), LowRankStep(normalised, projector, 0.05, (m, n)))
    batch = targets.batches[0]
    cfg = targets.cfg(batch)
    targets._apply_split(batch, update, [0, 2, 3], cfg)  # position 1 takes another path
    for j, member in enumerate(targets.members):
        got = split_master.join(member.weight.data, member.remainder).double()
        if j == 1:
            assert torch.equal(got, before[j])
            continue
        expected = cfg.decay * before[j] - 0.05 * (normalised[j].double() @ projector[j].double().mT)
        assert float((got - expected).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(expected.abs().max()), j
    targets.remove()
