"""Write a trained model as a plain Hugging Face directory: ``config.json``, ``generation_config.json``,
safetensors weights (one file, or shards with an index) and the tokenizer, every LoRA merged.

Loadable by ``AutoModelForCausalLM.from_pretrained`` and any loader that reads Hugging Face
safetensors directories: no PEFT files, no gorp_ds classes, the base model's own ``model_type``.

The weights are computed from the fp32 masters, not from the (bf16) model copy:

- LoRA targets: ``W + (α/r) B A`` in fp32 from the A, B masters, rounded once to the run's dtype;
- trained full-rank / plain tensors: their fp32 master, rounded to the run's dtype;
- frozen tensors: as they are.

Under ZeRO the masters are partitioned: the LoRA factors (small) are all-reduced once; every other
trained tensor is reduced to rank 0 one at a time, written into the current shard and freed, so
no rank holds a second copy of the model. Every rank must call :func:`export_hf_dir` (collectives);
only rank 0 writes.

A write that fails (a full disk: safetensors' ``I/O error``, a read-only file system) is one
:class:`~gorp_ds.safe_write.WriteError` on every rank, naming the export, the bytes it needs and the
bytes free; rank 0 keeps taking part in the collectives after it, and the temporary directory is
removed, so an earlier export in ``out_dir`` stays as it was.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..log import get_logger, show_progress
from ..models.lora import canonical_name, lora_factor_names, lora_layers, merged_base_weight
from ..optim.bf16_split import round_to_bf16
from ..safe_write import WriteError, guarded, readable_as_usual

log = get_logger(__name__)

DEFAULT_SHARD_BYTES = 5 * 2**30  # shards of at most 5 GiB (one tensor larger than that gets its own)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Room counted for config, generation config, index and tokenizer files (a Llama-3 tokenizer.json is
# about 9 MB, LLaMA-2's 1.8 MB plus its 0.5 MB tokenizer.model).
METADATA_BYTES = 16 * 2**20


@dataclass
class ExportInfo:
    path: str
    seconds: float
    bytes: int  # size on disk of everything written


def split_master_names(handle: Any) -> set[str]:
    """Trained tensors whose bf16 weight the engine keeps as its fp32 master split in two (the
    projected ``full`` targets, gorp_ds/optim/bf16_split.py)."""
    return {m.name for m in handle.low_rank.members if m.remainder is not None} if handle.low_rank else set()


def exported_master(name: str, master: torch.Tensor, dtype: torch.dtype, split_masters: set[str]) -> torch.Tensor:
    """A trained tensor's fp32 master as the export writes it in ``dtype``: a split master with the
    split's rounding, any other with ``Tensor.to``'s (round to nearest even, as DeepSpeed's own)."""
    return round_to_bf16(master) if name in split_masters and dtype == torch.bfloat16 else master.to(dtype)


def _core(module: nn.Module) -> nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _export_keys(core: nn.Module, handle: Any) -> list[tuple[str, torch.Tensor]]:
    """``(Hugging Face key, tensor in the model)`` for every weight to write: PEFT's LoRA tensors
    dropped, ``….base_layer.weight`` renamed back to ``….weight``, tied duplicates (e.g. an LM head
    tied to the embeddings) written once, under their first name, as ``save_pretrained`` does
    (under ZeRO-3 a tied parameter is one object: its partition placeholder has no storage)."""
    seen: set[tuple[int, ...]] = set()
    result = []
    for key, tensor in core.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        identity = (id(tensor),) if handle.is_partitioned(tensor) else (tensor.data_ptr(), *tensor.shape)
        if identity in seen:
            continue
        seen.add(identity)
        result.append((key.replace(".base_layer.", "."), tensor))
    return result


def _plan_shards(entries: list[tuple[str, torch.Tensor]], dtype: torch.dtype, limit: int,
                 numel: Any = torch.Tensor.numel) -> list[list[str]]:
    """Consecutive keys grouped into shards of at most ``limit`` bytes (by shape, before any data)."""
    shards: list[list[str]] = [[]]
    size = 0
    item = torch.empty((), dtype=dtype).element_size()
    for key, tensor in entries:
        nbytes = numel(tensor) * (item if tensor.is_floating_point() else tensor.element_size())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_metadata(core: nn.Module, tokenizer: Any, dtype: torch.dtype, directory: str) -> None:
    config = copy.deepcopy(core.config)
    config.use_cache = True  # training turns the KV cache off; inference wants it
    config.dtype = dtype
    if hasattr(config, "quantization_config"):  # a de-quantised GGUF source: the weights are plain now
        del config.quantization_config
    config.save_pretrained(directory)
    generation = getattr(core, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _move_into(tmp: str, out_dir: str) -> None:
    """Replace the files of ``out_dir`` by those of ``tmp``. Sub-directories of ``out_dir`` stay
    (the per-task exports ``export/task_XX/`` live inside the final ``export/``)."""
    if not os.path.isdir(out_dir):
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.replace(tmp, out_dir)
        return
    for name in os.listdir(out_dir):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def _verdict(error: WriteError | None, rank: int) -> None:
    """Rank 0's write failure raised on every rank (a broadcast: also the ranks' last barrier)."""
    import torch.distributed as dist

    message = str(error) if error is not None else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if rank == 0 and error is not None:
        raise error
    if message is not None:
        raise WriteError(f"{message} (seen by rank 0)")


def _disk_bytes(directory: str) -> int:
    """Bytes of the files directly in ``directory`` (not the per-task exports below it)."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if os.path.isfile(os.path.join(directory, f)))


@torch.no_grad()
def export_hf_dir(module: nn.Module, handle: Any, tokenizer: Any, dtype: torch.dtype, out_dir: str, *,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, desc: str = "export") -> ExportInfo | None:
    """Write ``module`` (PEFT-wrapped or plain) with its LoRA merged to ``out_dir`` (written into a
    temporary sibling first, then moved in, so an interrupted export never looks complete). ``handle`` is the engine's :class:`~gorp_ds.zero.Distributor` (the masters).
    Returns what rank 0 wrote, ``None`` on the other ranks."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    rank = handle.rank
    core = _core(module)
    layers = lora_layers(module) if hasattr(module, "get_base_model") else {}
    # Collective 1: the LoRA factors' fp32 masters on every rank (r × n and m × r per layer: small).
    factors = handle.gather_masters(lora_factor_names(module)) if layers else {}
    trained = {n for n in handle.params_by_name if ".lora_" not in n}
    # Trained tensors whose bf16 weight the engine keeps as its fp32 master split in two (the
    # projected ``full`` targets): exported with that split's rounding, so that the export holds
    # exactly the weights the run evaluated (DeepSpeed's own masters round to nearest even, as
    # ``Tensor.to`` does).
    split_masters = split_master_names(handle)
    entries = _export_keys(core, handle)
    shards = _plan_shards(entries, dtype, max_shard_bytes, handle.numel)
    shard_of = {key: i for i, keys in enumerate(shards) for key in keys}
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    tmp = f"{out_dir.rstrip('/')}.tmp"
    item = torch.empty((), dtype=dtype).element_size()
    # What the export writes: the weights (as planned) plus the config and tokenizer files; checked
    # before the first byte, and named if a write fails.
    need = sum(handle.numel(t) * (item if t.is_floating_point() else t.element_size()) for _, t in entries) \
        + METADATA_BYTES
    what = "the exported model"
    error: WriteError | None = None
    if rank == 0:
        try:
            with guarded(tmp, what, need=need, site="export"):
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
        except WriteError as err:
            error = err
    _verdict(error, rank)
    pending: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total_bytes = 0
    bar = tqdm(entries, desc=desc, unit="tensor", disable=not show_progress(), dynamic_ncols=True, mininterval=1.0)
    for key, tensor in bar:
        name = canonical_name(key)
        target = dtype if tensor.is_floating_point() else tensor.dtype
        # Collective: a trained tensor's master, reduced to rank 0 (every rank takes part).
        master = handle.gather_masters([name], to_rank=0).get(name) if name in trained else None
        # Collective under ZeRO-3: a frozen tensor whole, one at a time (a no-op otherwise).
        with handle.gathered([] if name in trained else [tensor]):
            if rank != 0:
                continue
            if name in layers:  # a LoRA target: its base weight with the adapter merged in fp32
                value = merged_base_weight(layers[name], factors[f"{name}.lora_A"], factors[f"{name}.lora_B"],
                                           master).to(target)
            elif master is not None:
                value = exported_master(name, master, target, split_masters)
            else:
                value = tensor.detach().to(target)
        pending[key] = value.contiguous().cpu()
        total_bytes += value.numel() * value.element_size()
        index = shard_of[key]
        if key == shards[index][-1]:  # shard complete: write it and free it
            if error is None:  # after a failure rank 0 only takes part in the collectives
                try:
                    with guarded(tmp, what, need=need - total_bytes + sum(
                            v.numel() * v.element_size() for v in pending.values()), site="export"):
                        save_file(pending, os.path.join(tmp, names[index]), metadata={"format": "pt"})
                        readable_as_usual(os.path.join(tmp, names[index]))
                except WriteError as err:
                    error = err
            weight_map.update({k: names[index] for k in pending})
            pending = {}
    bar.close()
    if rank != 0:
        _verdict(None, rank)
        return None
    if error is None:
        try:
            with guarded(tmp, what, need=METADATA_BYTES, site="export"):
                if len(shards) > 1:
                    with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
                _write_metadata(core, tokenizer, dtype, tmp)
                _move_into(tmp, out_dir)
        except WriteError as err:
            error = err
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        _verdict(error, rank)
    info = ExportInfo(out_dir, time.perf_counter() - start, _disk_bytes(out_dir))
    log.info(f"exported {out_dir}: {info.bytes / 2**20:,.1f} MiB on disk, {len(shards)} weight file(s), "
             f"{info.seconds:.1f} s")
    _verdict(None, rank)
    return info
