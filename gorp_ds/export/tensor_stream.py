"""One safetensors file written a tensor at a time, so that the writer holds one tensor in memory,
not the whole file's. The per-task files of the ``full`` targets (their values at a task's start
and their change over the task) are as large as those weights: 5.8 GB of fp32 for LLaMA-2-7B's 32
``gate_proj``, 75 GB for a 70B model's 80. Gathered whole on rank 0 they would sit in its host
memory next to the training process; streamed, rank 0 holds one ``m × n`` tensor at a time.

The format (as safetensors reads it): 8 bytes, the header's length ``N`` (little-endian u64); ``N``
bytes of JSON, ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
padded with spaces so the data starts 8-byte aligned; then every tensor's bytes (little-endian,
row-major), back to back in the header's order. The header comes first, so every key, shape and
dtype is declared before the first tensor arrives, and the tensors must then come in that order.

Failures are those of gorp_ds/safe_write.py: the file is written beside its path and renamed when
complete; a full disk or an I/O error becomes one :class:`~gorp_ds.safe_write.WriteError` naming
the file and the bytes needed and free. The error is kept and raised by :meth:`TensorStream.finish`,
after the caller has gone through every tensor: each of them is a collective for the other ranks,
so rank 0 must not stop in the middle of the sequence.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import BinaryIO

import torch

from ..safe_write import WriteError, error_for, guarded, is_io_failure, remove_quietly

# torch dtype -> the format's name (the ones a model's weights or their deltas use)
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}

Layout = list[tuple[str, tuple[int, ...], torch.dtype]]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def header_bytes(layout: Layout, metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header of ``layout``, padded to a multiple of 8."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, shape, dtype in layout:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{key}: dtype {dtype} has no safetensors name")
        size = _nbytes(shape, dtype)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


class TensorStream:
    """A safetensors file at ``path`` with the tensors of ``layout``, given to :meth:`write` in its
    order, one at a time; :meth:`finish` completes it. ``active`` False (the ranks that only take
    part in the collectives): every call is a no-op and nothing is written."""

    def __init__(self, path: str, layout: Layout, metadata: dict[str, str] | None = None, *, what: str, site: str,
                 active: bool = True) -> None:
        self.path, self.tmp, self.what = path, f"{path}.tmp", what
        self.layout, self.active = layout, active
        self.next = 0  # index in layout of the tensor expected next
        self.error: WriteError | None = None
        self.handle: BinaryIO | None = None
        header = header_bytes(layout, metadata)
        self.need = len(header) + sum(_nbytes(shape, dtype) for _, shape, dtype in layout)
        if not active:
            return
        try:
            with guarded(path, what, need=self.need, site=site):  # free space checked, one write point per file
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self.handle = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish)
                self.handle.write(header)
        except WriteError as err:
            self._fail(err)

    def write(self, key: str, tensor: torch.Tensor | None) -> None:
        """The next tensor of the layout (``None`` off the active rank)."""
        if not self.active:
            return
        expected_key, shape, dtype = self.layout[self.next]
        self.next += 1
        if tensor is None or key != expected_key or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            got = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
            raise ValueError(f"{self.path}: expected {expected_key} {shape} {dtype} next, got {key} {got}")
        if self.error is not None:
            return  # the file has failed: the caller still goes through the sequence (collectives)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        try:
            self.handle.write(memoryview(data))
        except Exception as err:
            if not is_io_failure(err):
                raise
            self._fail(error_for(self.path, self.what, err, self.need))

    def finish(self) -> int | None:
        """Complete the file (fsync, rename); its size in bytes (``None`` when not active). Raises the
        :class:`WriteError` of a failed write, with nothing left at ``path`` or beside it."""
        if not self.active:
            return None
        if self.error is None and self.next != len(self.layout):
            raise ValueError(f"{self.path}: {len(self.layout) - self.next} tensors of the layout were not written")
        if self.error is None:
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
                self.handle.close()
                os.replace(self.tmp, self.path)
            except Exception as err:
                if not is_io_failure(err):
                    raise
                self._fail(error_for(self.path, self.what, err, self.need))
        if self.error is not None:
            raise self.error
        return os.path.getsize(self.path)

    def _fail(self, error: WriteError) -> None:
        self.error = error
        if self.handle is not None:
            try:
                self.handle.close()
            except OSError:
                pass
        remove_quietly(self.tmp)
