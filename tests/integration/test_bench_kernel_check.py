"""bench/kernel_check.py: its smoke run (CPU, eager vs eager, deepspeed not importable) passes with
bit-identical gradients and writes its JSON and table; the loss it checks is the session's
(gorp_ds.cl.session.answer_loss, bit for bit), which is transformers' own causal-LM loss when the
labels keep only the answer tokens."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.support import REPO
from tests.support.torch_only import run_torch_only

sys.path.insert(0, str(REPO))

from bench.kernel_check import base_model, build, make_batch, session_loss  # noqa: E402

pytestmark = pytest.mark.slow



def test_smoke_run_passes_with_identical_gradients(tmp_path):
    out = tmp_path / "out"
    proc = run_torch_only("kernel_check", ["--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((out / "kernel_check.json").read_text())
    assert data["passed"] is True and data["kernels"] == "eager" and data["shape"] == "smoke"
    for mode, tensors in (("lora", 8), ("full", 20)):  # 2 layers x (q, v) x (A, B); every tensor of the model
        n = data["numerics"][mode]
        assert n["tensors"] == tensors and n["passed"] and n["mlp_submodules_called"] and not n["failing"]
        assert n["direct"]["max"] == 0.0 and n["loss"]["eager"] == n["loss"]["kernels"]  # eager twice: bit for bit
        assert n["eager_error"] == n["kernels_error"]
        assert 0 < n["eager_error"]["max"] < 0.1  # bf16 against fp32: a few units of 2^-8, not zero
        assert abs(n["loss"]["eager"] - n["loss"]["ref"]) < 0.05 * n["loss"]["ref"]
        for kind in ("eager", "kernels"):
            t = data["throughput"][mode][kind]
            assert t["tokens_per_s"] == pytest.approx(2 * 16 / t["step_s"]) and len(t["rounds_s"]) == 1
    report = (out / "kernel_check.md").read_text()
    assert "Overall: PASS" in report and report == proc.stdout[proc.stdout.index("# Kernel check"):]


def test_the_checked_loss_is_transformers_causal_lm_loss_on_the_answer_tokens():
    """session_loss (the session's loss: decoder, answer positions, LM head, mean cross-entropy)
    equals LlamaForCausalLM's own loss with labels -100 everywhere but the answer tokens."""
    model, loss_fn, own = build(base_model("smoke", 0), torch.float32, "eager", "full", "cpu", 0)
    batch = make_batch(3, 24, 4, 300, 5, "cpu", ragged=True)
    labels = torch.full_like(batch["input_ids"], -100)
    rows, cols = batch["answer_positions"].unbind(1)
    labels[rows, cols + 1] = batch["input_ids"][rows, cols + 1]
    assert torch.equal(batch["answer_targets"], labels[rows, cols + 1])
    assert len(batch["answer_targets"]) == 12 and bool((batch["attention_mask"][rows, cols + 1] == 1).all())
    ours = session_loss(model, loss_fn, batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
    # and the script's copy of the session's loss has not drifted from it (bit for bit, both eager paths)
    from gorp_ds.cl.session import answer_loss

    assert torch.equal(ours, answer_loss(model, batch)) and torch.equal(ours, answer_loss(model, batch, loss_fn))
