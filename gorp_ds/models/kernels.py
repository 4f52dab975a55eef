"""Fused GPU kernels behind one setting (``model.kernels``, ``--kernels``): Liger Kernel's
RMSNorm, SwiGLU and RoPE patched into the model once when it is built (before LoRA and DeepSpeed),
and its fused linear cross-entropy for the training loss; attention through PyTorch's SDPA.

``auto`` (the default) uses them where they run: a CUDA device, ``liger_kernel`` importable (the
optional extra ``gorp-ds[kernels]``), a verified model type and a dtype Liger's kernels take;
otherwise the model keeps its eager modules. Each build logs ONE line saying which and why, e.g.
``kernels: eager (no CUDA device: Liger's Triton kernels need one)``. ``liger`` demands them (a
user error where they cannot run); ``eager`` never patches anything.

What the patch keeps intact (so every method, LoRA and GORP's projected targets work unchanged):
- Liger binds new ``forward`` methods to the existing module instances; no weight is copied and
  parameter names do not change (checkpoints, export and the role patterns see the same tensors).
- The SwiGLU forward calls the MLP's own ``gate_proj``/``up_proj``/``down_proj`` submodules, so a
  PEFT LoRA wrapper or a projected Linear installed later (gorp_ds/zero/projected_linear.py) is
  what runs: only the ``silu(gate) * up`` elementwise product is fused.
- RoPE is patched in transformers' LLaMA module (a module-level function, so process-wide): every
  LLaMA model of a process then uses it; a run builds all its models with one setting.

The loss (:func:`answer_loss`): eager is exactly the session's previous expression, the LM head on
the answer positions then cross-entropy on fp32 logits. Fused, Liger's chunked kernel computes the
same mean over the answer tokens from the hidden states and the head's weight without holding the
``(answer tokens, vocabulary)`` logits; used only where the head is a plain ``nn.Linear`` whose
weight is whole on this rank (not LoRA-wrapped, not a projected target, not a ZeRO-3 partition).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..log import get_logger

log = get_logger(__name__)

KERNELS = ("auto", "liger", "eager")
# Model types whose Liger patch was checked against the eager model (bench/kernel_check.py).
VERIFIED_MODEL_TYPES = ("llama",)
LIGER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ACTIVE = "_gorp_kernels"  # attribute on a patched model: which kernels it runs


class KernelsUnavailable(ValueError):
    """``--kernels liger`` where Liger's kernels cannot run (raised as a ModelError by the loader)."""


def _liger_problem(model: nn.Module, dtype: torch.dtype) -> str | None:
    """Why Liger's kernels cannot run for this model here (None when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device: Liger's Triton kernels need one"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed: pip install 'gorp-ds[kernels]'"
    try:
        importlib.import_module("liger_kernel.transformers")
    except Exception as err:  # e.g. triton missing or too old: the one line names it
        return f"liger_kernel does not import ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES:
        return f"model type {model_type!r}: the kernels are verified for {', '.join(VERIFIED_MODEL_TYPES)} only"
    if dtype not in LIGER_DTYPES:
        return f"dtype {dtype}: Liger's kernels take bf16, fp16 or fp32"
    return None


def apply_kernels(model: nn.Module, setting: str, dtype: torch.dtype) -> str:
    """Patch ``model`` (a freshly built causal LM, before LoRA and DeepSpeed) per ``setting``; logs
    one line and returns the kernels it runs: ``"liger"`` or ``"eager"``."""
    if setting not in KERNELS:
        raise KernelsUnavailable(f"--kernels {setting}: expected one of {', '.join(KERNELS)}")
    if setting == "eager":
        log.info("kernels: eager (--kernels eager)")
        return "eager"
    problem = _liger_problem(model, dtype)
    if problem is not None:
        if setting == "liger":
            raise KernelsUnavailable(f"--kernels liger: {problem}; pass --kernels auto to fall back to the eager modules")
        log.info(f"kernels: eager ({problem})")
        return "eager"
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # The loss is the session's own (answer positions only): Liger must not replace the model's
    # forward with its labels-taking one, so both cross-entropy patches are off here.
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    attention = getattr(model.config, "_attn_implementation", None)
    if attention != "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # PyTorch's fused attention (flash backend on recent GPUs)
        attention = "sdpa"
    setattr(model, _ACTIVE, "liger")
    log.info(f"kernels: liger (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy; attention {attention})")
    return "liger"


def kernels_of(model: nn.Module) -> str:
    """Which kernels ``model`` (or the base model under a PEFT wrapper) was built with."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(core, _ACTIVE, "eager")


def fused_head_problem(head: nn.Module) -> str | None:
    """Why the fused cross-entropy cannot use this LM head's weight directly (None when it can):
    the fused kernel reads ``head.weight`` without calling the module, so the module's own forward
    (a LoRA wrapper, a projected Linear's gradient sink, ZeRO-3's gather hook) would be skipped."""
    if type(head) is not nn.Linear:
        return f"the LM head is a {type(head).__name__} (LoRA-wrapped?), not a plain Linear"
    if "forward" in head.__dict__:
        return "the LM head's forward is replaced (a projected full-rank target)"
    if hasattr(head.weight, "ds_id"):
        return "the LM head's weight is a ZeRO-3 partition"
    if head.bias is not None:
        return "the LM head has a bias"
    return None


class AnswerLoss:
    """The training loss on the answer positions: ``(hidden (N, H), targets (N,)) -> scalar``,
    the mean cross-entropy over the N answer tokens (the positions were selected on the host, so
    no ignore index occurs)."""

    def __init__(self, fused: bool) -> None:
        self.fused = fused
        self._liger = None
        if fused:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            # fp32 accumulation of the weight/input gradients across chunks: the eager path's
            # matmul gradients accumulate in fp32 inside cuBLAS too.
            self._liger = LigerFusedLinearCrossEntropyLoss(reduction="mean", accum_dtype=torch.float32)

    def __call__(self, head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
        if self._liger is None:
            return F.cross_entropy(head(hidden).float(), targets)
        return self._liger(head.weight, hidden, targets)


def answer_loss_for(model: nn.Module, head: nn.Module) -> AnswerLoss:
    """The loss for a model as built (after LoRA and DeepSpeed's set-up): fused where the model
    runs Liger's kernels and the head allows it; logs why not where it does not."""
    if kernels_of(model) != "liger":
        return AnswerLoss(fused=False)
    problem = fused_head_problem(head)
    if problem is not None:
        log.info(f"kernels: eager cross-entropy ({problem})")
        return AnswerLoss(fused=False)
    return AnswerLoss(fused=True)
