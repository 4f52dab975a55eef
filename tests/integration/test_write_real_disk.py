"""Real full and read-only file systems (a small tmpfs, mounted where this process may: root in a
container; skipped elsewhere, where the injected faults of tests/unit/test_safe_write.py and
test_export_hf_dir.py remain): the writer's free-space check, a streamed writer's own I/O error
(safetensors, written in Rust) when the disk fills under it, a whole export that does not fit, and
the output-path check of a read-only mount."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from gorp_ds.safe_write import WriteError, guarded, path_problem, write_file

NUMBERS = re.compile(r"it needs [\d.]+ \w*B \((\d+) bytes\), [\d.]+ \w*B \((\d+) bytes\) are free")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (skipped where this process may not mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _one_line(err: WriteError, path) -> tuple[int, int]:
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path}: cannot write "), text
    numbers = NUMBERS.search(text)
    assert numbers, text
    return int(numbers[1]), int(numbers[2])


def test_a_real_full_disk(small_disk) -> None:
    """Checked before writing (the bytes known), and a streamed writer's own I/O error (safetensors,
    written in Rust) converted when the disk fills under it."""
    from safetensors.torch import save_file

    big = small_disk / "predictions.jsonl"
    with pytest.raises(WriteError, match="not enough free space") as caught:
        write_file(str(big), "x" * 200_000, what="the predictions", site="predictions")
    need, free = _one_line(caught.value, big)
    assert need == 200_000 and free <= 65536 and not big.exists()
    weights = small_disk / "model.safetensors"
    with pytest.raises(WriteError) as caught:  # told it needs little: the disk fills during the write
        with guarded(str(weights), "the exported model", need=1, site="export"):
            save_file({"w": torch.zeros(40_000)}, str(weights))
    _one_line(caught.value, weights)
    assert "No space left" in str(caught.value) or "I/O error" in str(caught.value)


def test_a_read_only_file_system(small_disk) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
    assert "is on a read-only file system" in path_problem(str(small_disk / "out"), "--output-dir r")
    with pytest.raises(WriteError, match="Read-only file system"):
        write_file(str(small_disk / "results.json"), "{}", what="the results", site="results")


def test_an_export_that_does_not_fit(small_disk) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gorp_ds.export import export_hf_dir
    from gorp_ds.models import LoraSettings, TargetsConfig, add_lora, build_param_groups
    from gorp_ds.optim import GORP
    from gorp_ds.optim.config import OptimizerConfig
    from gorp_ds.zero import LocalDistributor
    from tests.support.tiny_model import make_tokenizer

    tokenizer = make_tokenizer(small_disk.parent / "tok")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = add_lora(LlamaForCausalLM(config).to(torch.bfloat16), LoraSettings(r=4, alpha=8.0, targets=["q_proj"]))
    optimizer = GORP(build_param_groups(model, "gorp", TargetsConfig(full_targets=["mlp.gate_proj"]),
                                        OptimizerConfig(rank=2)))
    handle = LocalDistributor(optimizer, {n: p for g in optimizer.param_groups for n, p in zip(g["names"], g["params"])})
    with pytest.raises(WriteError) as caught:
        export_hf_dir(model, handle, tokenizer, torch.bfloat16, str(small_disk / "export"), max_shard_bytes=8192)
    need, free = _one_line(caught.value, small_disk / "export.tmp")
    assert "cannot write the exported model: not enough free space" in str(caught.value)
    assert need > free and list(small_disk.iterdir()) == []  # checked before the first byte
