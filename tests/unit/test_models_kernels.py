"""The kernels setting (gorp_ds/models/kernels.py) on a CPU: ``auto`` falls back to the eager
modules with one logged reason, ``liger`` where it cannot run and a bad value are one-line user
errors, the eager loss is bit for bit the session's previous expression, and the patch is applied
once, before LoRA, through Liger's instance API with the session's own loss kept (a stand-in
``liger_kernel`` records the call: the real one needs a CUDA device; bench/kernel_check.py checks
its numerics on a GPU)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gorp_ds.cli import check_before_start
from gorp_ds.models import ModelConfig, ModelError, load_model_and_tokenizer
from gorp_ds.models import kernels as K
from gorp_ds.settings import SettingError


def kernel_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels:")]


def untouched(model: nn.Module) -> bool:
    """No module of the model has an instance-bound forward (what Liger's instance patch adds)."""
    return not any("forward" in m.__dict__ for m in model.modules())


@pytest.fixture
def gorp_logs(caplog):
    caplog.set_level(logging.INFO, logger="gorp_ds")
    logging.getLogger("gorp_ds").addHandler(caplog.handler)  # the project logger may not propagate
    yield caplog
    logging.getLogger("gorp_ds").removeHandler(caplog.handler)


def test_auto_on_cpu_is_eager_with_one_reason_and_an_unpatched_model(tiny_model_dir, gorp_logs) -> None:
    model, _ = load_model_and_tokenizer(ModelConfig(model=str(tiny_model_dir), dtype="fp32", gradient_checkpointing=False,
                                                        kernels="auto"))
    assert kernel_lines(gorp_logs) == ["kernels: eager (no CUDA device: Liger's Triton kernels need one)"]
    assert K.kernels_of(model) == "eager" and untouched(model)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_liger_not_importable_is_the_reason_where_cuda_is(monkeypatch, gorp_logs) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # an import of it fails; find_spec raises
    real = K.importlib.util.find_spec
    monkeypatch.setattr(K.importlib.util, "find_spec", lambda name, *args: None if name == "liger_kernel" else real(name, *args))
    model = nn.Linear(2, 2)
    assert K.apply_kernels(model, "auto", torch.bfloat16) == "eager"
    assert kernel_lines(gorp_logs) == ["kernels: eager (liger_kernel is not installed: pip install 'gorp-ds[kernels]')"]
    with pytest.raises(K.KernelsUnavailable, match=r"^--kernels liger: liger_kernel is not installed.*--kernels auto"):
        K.apply_kernels(model, "liger", torch.bfloat16)


def test_eager_setting_never_probes_and_says_so(monkeypatch, tiny_model_dir, gorp_logs) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("eager must not probe the device"))
    model = nn.Linear(2, 2)
    assert K.apply_kernels(model, "eager", torch.bfloat16) == "eager"
    assert kernel_lines(gorp_logs) == ["kernels: eager (--kernels eager)"]


def test_liger_demanded_on_cpu_is_one_model_error_line(tiny_model_dir) -> None:
    cfg = ModelConfig(model=str(tiny_model_dir), dtype="fp32", gradient_checkpointing=False, kernels="liger")
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message == ("--kernels liger: no CUDA device: Liger's Triton kernels need one; pass --kernels auto to fall "
                       "back to the eager modules")


def test_a_bad_value_is_one_line_naming_the_setting() -> None:
    with pytest.raises(SettingError, match="kernels"):
        ModelConfig(kernels="fast")
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        status = check_before_start(["--kernels", "fast"])
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("gorp_ds: error:"), out.getvalue()
    assert "--kernels" in lines[0] and "Traceback" not in out.getvalue()


def test_eager_loss_is_bit_identical_to_the_previous_expression() -> None:
    """The eager AnswerLoss is the session's former two lines (the LM head on the answer
    positions, cross-entropy on fp32 logits): equal loss and equal gradients, bit for bit, bf16."""
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    hidden = torch.randn(7, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 40, (7,))
    before = F.cross_entropy(head(hidden).float(), targets)
    grads_before = torch.autograd.grad(before, [hidden, head.weight])
    loss = K.answer_loss_for(nn.Module(), head)(head, hidden, targets)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    assert torch.equal(loss, before)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))
    # and the value is the mean cross-entropy over the answer tokens, re-derived in float64: bf16
    # logits are each within 2^-8 relative of the exact ones, so logsumexp and the picked logit
    # each move by at most 2^-8 max|logit|
    logits = head.weight.detach().double() @ hidden.detach().double().T  # (V, N)
    expected = (torch.logsumexp(logits, 0) - logits[targets, torch.arange(7)]).mean()
    assert abs(float(loss.detach()) - float(expected)) <= 2 * 2**-8 * float(logits.abs().max())


def test_fused_head_only_where_the_weight_is_the_whole_trained_tensor() -> None:
    assert K.fused_head_problem(nn.Linear(4, 6, bias=False)) is None
    assert "bias" in K.fused_head_problem(nn.Linear(4, 6))
    projected = nn.Linear(4, 6, bias=False)
    projected.forward = lambda x: x  # what gorp_ds.zero.projected_linear.install does
    assert "projected" in K.fused_head_problem(projected)
    partitioned = nn.Linear(4, 6, bias=False)
    partitioned.weight.ds_id = 3  # a ZeRO-3 parameter
    assert "ZeRO-3" in K.fused_head_problem(partitioned)

    class LoraLayer(nn.Module):
        pass

    assert "LoraLayer" in K.fused_head_problem(LoraLayer())
    # a model without Liger's kernels keeps the eager loss whatever the head
    assert not K.answer_loss_for(nn.Module(), nn.Linear(4, 6, bias=False)).fused


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in ``liger_kernel.transformers`` recording the instance patch; CUDA reported present."""
    calls: list[dict] = []

    def apply(model, **kwargs):
        calls.append(kwargs)

    package = types.ModuleType("liger_kernel")
    package.__path__ = []
    sub = types.ModuleType("liger_kernel.transformers")
    sub._apply_liger_kernel_to_instance = apply
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    real = K.importlib.util.find_spec
    monkeypatch.setattr(K.importlib.util, "find_spec",
                        lambda name, *args: object() if name == "liger_kernel" else real(name, *args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def test_auto_patches_once_before_lora_and_keeps_the_sessions_loss(fake_liger, tiny_model_dir, gorp_logs) -> None:
    from gorp_ds.models import LoraSettings, add_lora

    model, _ = load_model_and_tokenizer(ModelConfig(model=str(tiny_model_dir), dtype="fp32", gradient_checkpointing=False,
                                                        kernels="auto"))
    assert fake_liger == [{"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                           "fused_linear_cross_entropy": False}]
    assert K.kernels_of(model) == "liger"
    assert model.config._attn_implementation == "sdpa"
    assert len(kernel_lines(gorp_logs)) == 1 and kernel_lines(gorp_logs)[0].startswith("kernels: liger (")
    wrapped = add_lora(model, LoraSettings())
    assert K.kernels_of(wrapped) == "liger"  # seen through PEFT's wrapper
    assert len(fake_liger) == 1


def test_unverified_model_type_falls_back(fake_liger, gorp_logs) -> None:
    model = nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="gpt2")
    assert K.apply_kernels(model, "auto", torch.bfloat16) == "eager"
    assert kernel_lines(gorp_logs) == ["kernels: eager (model type 'gpt2': the kernels are verified for llama only)"]
    assert fake_liger == []
