"""The checkpoint commit protocol in one process: manifest, fall-back past a damaged ``latest`` or
newest tag, the free-space check, write errors, and SIGKILL at every point of a save.

The reference is the uninterrupted single-process run of ``zero_scenarios`` (GORP with a task
boundary, shared spaces, cut-free local driver); every resumed run must continue bit-exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from gorp_ds.zero import CheckpointError, checkpoint_io, load_state, save_state
from tests.support import REPO
from tests.support import zero_scenarios as zs
from tests.support.checkpoint_scenarios import FIRST, SECOND, handle, run_with_saves


def _resume_matches_reference(directory: str) -> int:
    """Load the checkpoint ``directory`` resolves to, finish the run, compare with the reference."""
    model = zs.TinyNet()
    opt = zs.build_optimizer(model)
    step = load_state(handle(opt), directory)["step"]
    zs.train_single_process(model, opt, range(step, zs.STEPS))
    reference = zs.TinyNet()
    ref_opt = zs.build_optimizer(reference)
    zs.train_single_process(reference, ref_opt, range(zs.STEPS))
    for a, b in zip(zs.trainable(model), zs.trainable(reference)):
        assert torch.equal(a, b)
    return step


@pytest.fixture
def saved(tmp_path) -> str:
    directory = str(tmp_path / "ckpt")
    run_with_saves(directory)
    return directory


def test_manifest_lists_every_file_with_size_and_crc(saved) -> None:
    assert (Path(saved) / "latest").read_text().strip() == "second"
    manifest = json.loads((Path(saved) / "second" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"client_state.pt", "gorp_state/rank_00000.pt"}
    for relative, meta in manifest["files"].items():
        data = (Path(saved) / "second" / relative).read_bytes()
        assert meta["bytes"] == len(data) and meta["crc32"] == zlib.crc32(data)
    assert not [p for p in os.listdir(saved) if p.startswith(".")], "no temporary directory left behind"
    assert _resume_matches_reference(saved) == SECOND


@pytest.mark.parametrize("damage", ["empty", "truncated-name", "garbage"])
def test_bad_latest_falls_back_to_newest_complete_tag(saved, damage, caplog) -> None:
    latest = Path(saved) / "latest"
    latest.write_bytes({"empty": b"", "truncated-name": b"sec", "garbage": b"\xff\xfe\x00"}[damage])
    assert _resume_matches_reference(saved) == SECOND
    assert "falling back to the newest complete checkpoint 'second'" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte", "no-manifest"])
def test_damaged_newest_tag_falls_back_to_previous(saved, damage, caplog) -> None:
    tag = Path(saved) / "second"
    rank_file = tag / "gorp_state" / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    if damage == "truncated":
        rank_file.write_bytes(data[: len(data) // 2])
    elif damage == "flipped-byte":
        data[len(data) // 2] ^= 0xFF
        rank_file.write_bytes(bytes(data))
    else:
        (tag / "manifest.json").unlink()
    assert _resume_matches_reference(saved) == FIRST
    assert "falling back to the newest complete checkpoint 'first'" in caplog.text
    with pytest.raises(CheckpointError, match="'second' cannot be loaded"):
        load_state(handle(zs.build_optimizer(zs.TinyNet())), saved, tag="second")


def test_no_complete_checkpoint_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "latest").write_text("")
    with pytest.raises(CheckpointError, match="no complete checkpoint to load.*'latest' is empty"):
        load_state(handle(zs.build_optimizer(zs.TinyNet())), str(tmp_path))


def test_free_space_shortfall_refuses_before_writing(saved, monkeypatch) -> None:
    usage = checkpoint_io.shutil.disk_usage(saved)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    model = zs.TinyNet()
    opt = zs.build_optimizer(model)
    with pytest.raises(CheckpointError) as err:
        save_state(handle(opt), saved, "third", {"step": 0})
    message = str(err.value)
    assert message.startswith(f"{saved}: not enough free space for checkpoint 'third'")
    assert "1000 bytes) are free" in message and "needs" in message
    assert "the previous checkpoint 'second' is still usable" in message and "\n" not in message
    assert sorted(os.listdir(saved)) == ["first", "latest", "second"]
    assert _resume_matches_reference(saved) == SECOND


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160"),
                                   RuntimeError("basic_ios::clear: iostream error"),
                                   OSError(28, "No space left on device")])
def test_write_error_removes_the_partial_tag(saved, monkeypatch, error) -> None:
    def failing_save(obj, handle):
        handle.write(b"partial")
        raise error

    monkeypatch.setattr(checkpoint_io.torch, "save", failing_save)
    with pytest.raises(CheckpointError) as err:
        save_state(handle(zs.build_optimizer(zs.TinyNet())), saved, "third", {"step": 0})
    assert "writing checkpoint 'third' failed" in str(err.value)
    assert "no space left" in str(err.value).lower()
    assert "'second' is still usable" in str(err.value)
    assert sorted(os.listdir(saved)) == ["first", "latest", "second"]
    monkeypatch.undo()
    assert _resume_matches_reference(saved) == SECOND


KILLED_SAVE = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from gorp_ds import faults
from tests.support.checkpoint_scenarios import run_with_saves
faults.install(faults.FaultPlan(checkpoint_kill=(sys.argv[2], 2)))  # SIGKILL at that point of the 2nd save
run_with_saves(sys.argv[1])
"""


@pytest.mark.parametrize("point, expected", [("files", FIRST), ("manifest", FIRST), ("renamed", FIRST),
                                             ("latest_tmp", FIRST)])
def test_sigkill_during_a_save_leaves_latest_complete(tmp_path, point, expected) -> None:
    """A real SIGKILL at each point of the second save; the next run resumes from the first."""
    directory = str(tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, directory, point], env=dict(os.environ), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (Path(directory) / "latest").read_text().strip() == "first"
    assert _resume_matches_reference(directory) == expected
    # The next save cleans up what the killed one left behind.
    save_state(handle(zs.build_optimizer(zs.TinyNet())), directory, "again", {"step": 0})
    assert not [p for p in os.listdir(directory) if p.startswith(".") or p.endswith(".tmp")]


def test_real_enospc_on_a_small_tmpfs(tmp_path, saved, monkeypatch) -> None:
    """The write itself runs out of space (the free-space check is told there is plenty): torch's
    error becomes the one CheckpointError, the partial tag is removed, the first checkpoint loads."""
    pages = sum(-(-p.stat().st_size // 4096) for p in (Path(saved) / "first").rglob("*") if p.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    size = (pages + 2) * 4096  # the first checkpoint and 'latest' fit, a second one does not
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        usage = checkpoint_io.shutil.disk_usage(str(mount))
        monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda path: usage._replace(free=1 << 40))
        model = zs.TinyNet()
        opt = zs.build_optimizer(model)
        zs.train_single_process(model, opt, range(FIRST))
        save_state(handle(opt), str(mount), "first", {"step": FIRST})
        zs.train_single_process(model, opt, range(FIRST, SECOND))
        with pytest.raises(CheckpointError) as err:
            save_state(handle(opt), str(mount), "second", {"step": SECOND})
        message = str(err.value)
        assert "writing checkpoint 'second' failed" in message or "committing checkpoint 'second' failed" in message
        assert "no space left" in message.lower() and "'first' is still usable" in message, message
        assert sorted(os.listdir(mount)) == ["first", "latest"]
        monkeypatch.undo()
        assert _resume_matches_reference(str(mount)) == FIRST
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_missing_latest_still_counts_as_a_checkpoint(saved) -> None:
    from gorp_ds.zero import has_checkpoint

    (Path(saved) / "latest").unlink()
    assert has_checkpoint(saved)
    assert _resume_matches_reference(saved) == SECOND
    assert not has_checkpoint(str(Path(saved) / "nothing-here"))
