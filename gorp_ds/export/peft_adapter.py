"""Each task's LoRA as a PEFT adapter, and the change an adapter cannot hold (the ``full`` targets').

At a task boundary the LoRA factors are merged into the base weights and re-initialised
(gorp_ds/models/lora.py), so task t's adapter applies to the model as it was *before* task t
(the merged model after task t − 1; the base model for task 1). Methods that train full-rank
weights too (``--full-targets`` under gorp and galore) change that base during the task: an
adapter (``W + (α/r) B A`` on its target modules) cannot express it, so their change is written
beside the adapter::

    export/task_XX/adapter/adapter_config.json       PEFT's LoraConfig (PEFT's own writer)
    export/task_XX/adapter/adapter_model.safetensors the task's A (r × n) and B (m × r), fp32 masters
    export/task_XX/full_delta.safetensors             {HF key: after − before} of the full targets, fp32

so that, in fp32, ``before + full_delta`` with the adapter on gives the merged export of task t
(docs/export.md). The delta is of the values as exported (``exported_master``): in a bf16 run the
difference of two bf16 values, exact in fp32, so that before (bf16, read in fp32) + delta is
exactly the exported bf16 value of each full target.

The "before" values of the full targets are kept on disk from the task's start
(``write_task_start``: a resume mid-task still finds them). Every rank calls the functions that
read masters (collectives, one tensor at a time, as the export does); rank 0 writes, the full
targets' files as they are gathered (gorp_ds/export/tensor_stream.py: rank 0 holds one tensor of
them at a time). All file writes go through :class:`TensorStream`, :func:`save_tensors` and
:func:`write_json`: each is atomic (a temporary file,
then renamed), and a failed write (a full disk, an I/O error) is one :class:`~gorp_ds.safe_write.WriteError`
naming the file and the bytes needed and free, at the write site :data:`SITE`
(gorp_ds/faults.py can inject one there). The caller makes every rank stop with it
(gorp_ds/cl/task_export.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch
from torch import nn

from ..log import get_logger
from ..models.lora import lora_layers
from ..naming import canonical_name
from ..safe_write import WriteError, guarded, readable_as_usual
from ..safe_write import write_json as write_json_file
from .hf_dir import _core, _export_keys, exported_master, split_master_names
from .tensor_stream import Layout, TensorStream

log = get_logger(__name__)

ADAPTER_DIR = "adapter"
FULL_DELTA_NAME = "full_delta.safetensors"
SITE = "adapters"  # the write site of every file here (gorp_ds/faults.py WRITE_SITES)
_HEADER_BYTES = 1 << 16  # a safetensors header (names, shapes, offsets) is well under this


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None, *,
                 what: str) -> int:
    """``tensors`` as one safetensors file at ``path`` (written beside it, then renamed: an
    interrupted write never leaves a complete-looking file). Returns its size in bytes."""
    from safetensors.torch import save_file

    need = sum(t.numel() * t.element_size() for t in tensors.values()) + _HEADER_BYTES
    tmp = f"{path}.tmp"
    try:
        with guarded(path, what, need=need, site=SITE):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"format": "pt", **(metadata or {})})
            readable_as_usual(tmp)
            os.replace(tmp, path)
    except WriteError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return os.path.getsize(path)


def write_json(value: Any, path: str, *, what: str) -> int:
    """``value`` as indented JSON at ``path`` (atomically, as :func:`save_tensors`); its size in bytes."""
    write_json_file(path, value, what=what, site=SITE)
    return os.path.getsize(path)


def full_target_names(handle: Any) -> list[str]:
    """Canonical names of the trained tensors that are not LoRA factors (the ``full`` targets of gorp
    and galore, DeepSpeed's or, on the projected path, the engine's own; none for the other LoRA
    methods), sorted: every rank gathers them in this order."""
    projected = {m.name for m in handle.low_rank.members} if handle.low_rank else set()
    return sorted({n for n in handle.params_by_name if ".lora_" not in n} | projected)


def _full_entries(module: nn.Module, handle: Any, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """``(HF key, model tensor)`` of each full target of ``names``, in their order."""
    entries = {canonical_name(key): (key, tensor) for key, tensor in _export_keys(_core(module), handle)}
    return [entries[name] for name in names]


def _layout(module: nn.Module, handle: Any, names: list[str], dtype: torch.dtype) -> Layout:
    """The full targets' file layout: ``(HF key, whole shape, dtype)`` in the order they are gathered."""
    return [(key, handle.shape(tensor), dtype) for key, tensor in _full_entries(module, handle, names)]


@torch.no_grad()
def _exported_values(module: nn.Module, handle: Any, dtype: torch.dtype, names: list[str]):
    """``(HF key, value as the export writes it)`` of the full targets ``names``, one at a time, as
    :func:`~gorp_ds.export.hf_dir.export_hf_dir` computes them: a DeepSpeed-held tensor from its
    fp32 master reduced to rank 0, a projected one from the model's weight (the engine keeps it as
    its master rounded). Every rank iterates (collectives); the values are ``None`` off rank 0."""
    trained = set(handle.params_by_name)
    split = split_master_names(handle)
    for name, (key, tensor) in zip(names, _full_entries(module, handle, names), strict=True):
        master = handle.gather_masters([name], to_rank=0).get(name) if name in trained else None
        value = None
        with handle.gathered([] if name in trained else [tensor]):  # ZeRO-3: the weight whole
            if handle.rank == 0:
                value = exported_master(name, master, dtype, split) if master is not None else tensor.detach().to(dtype)
                value = value.cpu().clone()  # m × n, a copy: .to() of the same dtype is the live weight
        yield key, value


def write_task_start(module: nn.Module, handle: Any, dtype: torch.dtype, path: str) -> int | None:
    """The full targets' values at a task's start (as exported, in ``dtype``: the previous task's
    export holds the same values) to ``path``, for :func:`write_full_delta` at the task's end.
    Collective; returns the bytes rank 0 wrote (``None`` elsewhere or without full targets)."""
    names = full_target_names(handle)
    if not names:
        return None
    stream = TensorStream(path, _layout(module, handle, names, dtype), {"format": "pt"},
                          what="the full targets' values at the task's start", site=SITE, active=handle.rank == 0)
    for key, value in _exported_values(module, handle, dtype, names):
        stream.write(key, value)
    return stream.finish()


def write_full_delta(module: nn.Module, handle: Any, dtype: torch.dtype, start_path: str, out_path: str) -> int | None:
    """``{HF key: after − before}`` in fp32 for every full target (after: as the export writes it
    now; before: :func:`write_task_start`'s file) to ``out_path``. Collective; returns the bytes
    rank 0 wrote, ``None`` elsewhere, without full targets, or when ``start_path`` is missing (a
    warning: e.g. the setting was turned on by a resume in mid-task)."""
    from safetensors import safe_open

    names = full_target_names(handle)
    if not names:
        return None
    found = handle.rank == 0 and os.path.isfile(start_path)
    if handle.rank == 0 and not found:
        log.warning(f"{start_path} is missing (the full targets' values at the task's start): no "
                    f"{os.path.basename(out_path)} and no adapter for this task")
    stream = TensorStream(out_path, _layout(module, handle, names, torch.float32),
                          {"format": "pt", "what": "full-rank targets: merged after the task minus before it, fp32"},
                          what="the task's full-target delta", site=SITE, active=found)
    with contextlib.ExitStack() as stack:
        start = stack.enter_context(safe_open(start_path, framework="pt")) if found else None
        # Every rank takes part in the gathers even when rank 0 cannot use them: one decision per
        # rank would need a collective of its own.
        for key, after in _exported_values(module, handle, dtype, names):
            # m × n, fp32: exact for two bf16 values (their difference has at most 8 + gap bits)
            stream.write(key, after.float() - start.get_tensor(key).float() if start is not None else None)
    return stream.finish()


def write_adapter(module: nn.Module, record: dict[str, dict[str, torch.Tensor]], directory: str,
                  base_model: str) -> int:
    """One task's LoRA as a PEFT adapter directory (rank 0, no collectives). ``record`` is the task's
    merge (:func:`~gorp_ds.models.lora.lora_merge_record`: per layer the fp32 masters ``A`` (r × n),
    ``B`` (m × r) and the ``scaling`` α/r that were merged). ``module`` is the engine's PEFT model:
    its LoraConfig (r, α, target modules) is the adapter's, and PEFT's own
    ``get_peft_model_state_dict`` names the tensors as ``PeftModel.from_pretrained`` expects."""
    from peft.utils import get_peft_model_state_dict

    adapter = next(iter(module.peft_config))  # the engine's one adapter ("default")
    layers = lora_layers(module)
    state: dict[str, torch.Tensor] = {}
    for key, _ in module.named_parameters():
        name = canonical_name(key)
        if ".lora_" not in name:
            continue
        layer, factor = name.rsplit(".lora_", 1)  # "….q_proj", "A" or "B"
        scaling = float(layers[layer].scaling[adapter])
        if float(record[layer]["scaling"]) != scaling:
            raise ValueError(f"{layer}: the merge's scaling {float(record[layer]['scaling'])} is not the "
                             f"adapter's α/r {scaling}")
        state[key] = record[layer][factor].detach().to("cpu", torch.float32)
    tensors = get_peft_model_state_dict(module, state_dict=state, adapter_name=adapter)
    if len(tensors) != 2 * len(record):
        raise ValueError(f"the adapter has {len(tensors)} tensors for {len(record)} merged LoRA layers")
    config = copy.deepcopy(module.peft_config[adapter])
    config.inference_mode = True
    config.task_type = "CAUSAL_LM"  # from_pretrained then gives a PeftModelForCausalLM (generate)
    config.base_model_name_or_path = base_model
    with guarded(os.path.join(directory, "adapter_config.json"), "the adapter's config", need=_HEADER_BYTES,
                 site=SITE):
        os.makedirs(directory, exist_ok=True)
        config.save_pretrained(directory)
    size = save_tensors(tensors, os.path.join(directory, "adapter_model.safetensors"), what="the task's PEFT adapter")
    return size + os.path.getsize(os.path.join(directory, "adapter_config.json"))
