"""The streamed safetensors writer (gorp_ds/export/tensor_stream.py) read back by
safetensors' own reader: generated layouts give the written values, dtypes, shapes and metadata;
the writer keeps no tensor after writing it; and a full disk at the start or in the middle of the sequence is one
WriteError raised at the end, with nothing left behind."""

from __future__ import annotations

import errno
import gc
import json
import struct
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from gorp_ds.export.tensor_stream import DTYPE_NAMES, TensorStream, header_bytes
from gorp_ds.safe_write import WriteError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8, torch.bool]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


layouts = st.lists(
    st.tuples(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), st.sampled_from(DTYPES)),
    min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(layout=layouts, seed=st.integers(0, 2**16))
def test_generated_layouts_read_back_equal(tmp_path_factory, layout, seed) -> None:
    path = tmp_path_factory.mktemp("stream") / "t.safetensors"
    tensors = {f"model.layers.{i}.w": _tensor(shape, dtype, seed + i) for i, (shape, dtype) in enumerate(layout)}
    stream = TensorStream(str(path), [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], {"format": "pt"},
                          what="a test file", site="adapters")
    for key, value in tensors.items():
        stream.write(key, value)
    assert stream.finish() == path.stat().st_size
    read, metadata = _read(path)
    assert metadata == {"format": "pt"} and sorted(read) == sorted(tensors)
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
        assert torch.equal(read[key], value), key
    # the data starts 8-byte aligned, as safetensors writes it
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + length) % 8 == 0 and json.loads(path.read_bytes()[8:8 + length])["__metadata__"] == {"format": "pt"}


def test_the_stream_keeps_no_tensor_it_has_written(tmp_path) -> None:
    layout = [(f"w{i}", (64, 32), torch.float32) for i in range(3)]
    stream = TensorStream(str(tmp_path / "t.safetensors"), layout, what="a test file", site="adapters")
    refs = []
    for key, shape, dtype in layout:
        value = torch.ones(shape, dtype=dtype)
        refs.append(weakref.ref(value))
        stream.write(key, value)
        del value
        gc.collect()
        assert refs[-1]() is None, key  # freed once the caller lets go: the writer held nothing
    stream.finish()


def test_out_of_order_or_misshapen_tensors_are_refused(tmp_path) -> None:
    layout = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    stream = TensorStream(str(tmp_path / "t.safetensors"), layout, what="a test file", site="adapters")
    with pytest.raises(ValueError, match="expected a"):
        stream.write("b", torch.zeros(4, dtype=torch.bfloat16))
    stream = TensorStream(str(tmp_path / "u.safetensors"), layout, what="a test file", site="adapters")
    stream.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected b"):
        stream.write("b", torch.zeros(4))  # fp32 where bf16 was declared
    stream = TensorStream(str(tmp_path / "v.safetensors"), layout, what="a test file", site="adapters")
    stream.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1 tensors of the layout were not written"):
        stream.finish()
    with pytest.raises(ValueError, match="no safetensors name"):
        header_bytes([("c", (1,), torch.complex64)])
    assert set(DTYPE_NAMES) >= set(DTYPES)


def test_an_inactive_stream_writes_nothing(tmp_path) -> None:
    stream = TensorStream(str(tmp_path / "t.safetensors"), [("a", (1,), torch.float32)], what="x", site="adapters",
                          active=False)
    stream.write("a", None)  # another rank's view: no value, no file
    assert stream.finish() is None and not list(tmp_path.iterdir())


def test_a_full_disk_at_the_start_is_raised_after_the_whole_sequence(tmp_path, fault_plan) -> None:
    fault_plan(write_fault=("adapters", 1))
    path = tmp_path / "t.safetensors"
    layout = [("a", (8,), torch.float32), ("b", (8,), torch.float32)]
    stream = TensorStream(str(path), layout, what="the task's full-target delta", site="adapters")
    stream.write("a", torch.zeros(8))  # the caller goes on (the other ranks' collectives)
    stream.write("b", torch.zeros(8))
    with pytest.raises(WriteError) as caught:
        stream.finish()
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot write the task's full-target delta: No space left on device")
    assert f"({stream.need} bytes)" in message
    assert not list(tmp_path.iterdir())


def test_a_full_disk_in_the_middle_leaves_nothing(tmp_path, monkeypatch) -> None:
    path = tmp_path / "t.safetensors"
    layout = [(name, (16,), torch.float32) for name in "abc"]
    stream = TensorStream(str(path), layout, what="the task's full-target delta", site="adapters")
    real_write, calls = stream.handle.write, []

    def write(data) -> int:
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(data)

    monkeypatch.setattr(stream.handle, "write", write)
    for name in "abc":
        stream.write(name, torch.ones(16))
    assert len(calls) == 2  # after the failure nothing more is written
    with pytest.raises(WriteError, match="No space left on device"):
        stream.finish()
    assert not list(tmp_path.iterdir())
