"""Every file a run writes outside its checkpoints, written one way: complete or not at all, and a
failure (a full disk, a read-only file system, a path under a regular file) is one
:class:`WriteError` that names the path, the bytes it needed and the bytes free.

- :func:`write_file` / :func:`write_json`: the whole content in memory, so its size is known;
  written to ``<path>.tmp`` beside the target, fsynced and renamed over it, so that a reader never
  sees half a file and the previous version stays until the new one is complete;
- :func:`guarded`: for writers that stream their own bytes (safetensors, a tokenizer's
  ``save_pretrained``): the caller says how many bytes it will write and into which temporary
  path; the free space is checked first and any I/O failure inside becomes a :class:`WriteError`;
- :func:`path_problem`: why a directory cannot be created or written, asked before any work starts.

The checkpoint writer (``gorp_ds/zero/checkpoint_io.py``) keeps its own collective protocol and
:class:`~gorp_ds.zero.CheckpointError`; its messages have the same shape (path, need, free).

Where the process's fault plan says so (gorp_ds/faults.py), a write at a named site
fails with ENOSPC, as a full disk makes it fail.

This module imports only :mod:`gorp_ds.faults` from the project: the export, distribution and run
layers all write through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .faults import current as fault_plan

# What the user can do about it, after the numbers.
# --resume auto: it continues from the last checkpoint, or starts afresh where none was written yet
# (plain --resume refuses a directory without one).
FIX = ("free space or point --output-dir at a larger, writable file system, then run again with --resume auto "
       "(it continues from the last checkpoint, or starts afresh where there is none)")


class WriteError(RuntimeError):
    """An output file that could not be written: disk full, read-only file system, permissions, a
    path under a regular file. A problem the user fixes (status 2, one line)."""

    parts: tuple[str, str, BaseException | None, int] | None = None  # path, what, cause, bytes needed

    def noted(self, note: str) -> WriteError:
        """The same failure, its message saying what is still intact (``note``)."""
        return self if self.parts is None or not note else error_for(*self.parts, note)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def _existing_ancestor(path: str) -> str:
    here = os.path.abspath(path)
    while not os.path.exists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    return here


def free_bytes(path: str) -> int | None:
    """Bytes free on the file system that holds (or will hold) ``path``; None when unknown (also on
    a file system without storage, such as /proc, which reports 0 of 0 blocks free)."""
    try:
        stat = os.statvfs(_existing_ancestor(path))
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize if stat.f_blocks else None


def is_io_failure(err: BaseException) -> bool:
    """An error of the file system rather than of the program: any OSError, and the I/O errors that
    libraries written in other languages raise as their own types (safetensors: ``I/O error: No
    space left on device``; torch's writer: ``file write failed``)."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return any(mark in text for mark in ("I/O error", "No space left", "os error", "Read-only file system",
                                         "Permission denied", "file write failed", "Disk quota"))


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    return (str(err).splitlines() or [type(err).__name__])[0]


def error_for(path: str, what: str, err: BaseException | None, need: int, note: str = "") -> WriteError:
    """The one message: the path, what it is, why it failed, the bytes needed and free, what is
    still intact (``note``) and the fix."""
    free = free_bytes(path)
    why = "not enough free space" if err is None else _reason(err)
    numbers = f"it needs {human_bytes(need)} ({need} bytes), " + (
        "the free space is unknown" if free is None else f"{human_bytes(free)} ({free} bytes) are free")
    kept = f"; {note}" if note else ""
    error = WriteError(f"{path}: cannot write {what}: {why}; {numbers}{kept}. Fix: {FIX}")
    error.parts = (path, what, err, need)
    return error


def _check_free(path: str, what: str, need: int, note: str) -> None:
    free = free_bytes(path)
    if free is not None and need > free:
        raise error_for(path, what, None, need, note)


@contextmanager
def guarded(path: str, what: str, *, need: int, site: str, note: str = "") -> Iterator[None]:
    """Run a block that writes ``need`` bytes at ``path`` (a file or a temporary directory): the free
    space is checked first, and an I/O failure inside becomes one :class:`WriteError`. Anything
    else (a bug) keeps its traceback."""
    _check_free(path, what, need, note)
    try:
        fault_plan().write_point(site, path)
        yield
    except WriteError:
        raise
    except Exception as err:
        if not is_io_failure(err):
            raise
        raise error_for(path, what, err, need, note) from None


def write_file(path: str, content: str | bytes, *, what: str, site: str, note: str = "") -> None:
    """``content`` to ``path``, atomically (temporary file, fsync, rename); parents are created."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    tmp = f"{path}.tmp"
    try:
        with guarded(path, what, need=len(data), site=site, note=note):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except WriteError:
        remove_quietly(tmp)
        raise


def write_json(path: str, obj: Any, *, what: str, site: str, note: str = "", indent: int = 2) -> None:
    write_file(path, json.dumps(obj, indent=indent), what=what, site=site, note=note)


def _process_umask() -> int:
    mask = os.umask(0)  # the only way to read it: set, then put back (at import, before any thread)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def readable_as_usual(path: str) -> None:
    """Give ``path`` the mode a new file gets here (``0o666`` less the umask). safetensors creates its
    files ``0o600``, so a model exported on a shared cluster would be readable by its writer only."""
    os.chmod(path, 0o666 & ~_UMASK)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def path_problem(path: str, label: str) -> str | None:
    """Why this process cannot create or write the directory ``path`` (None: it can), for a message
    that starts with ``label`` (``--output-dir runs/x``, ``tensorboard.output_path in ds.json``)."""
    target = os.path.expanduser(path)
    if os.path.exists(target) and not os.path.isdir(target):
        return f"{label} is a file, not a directory; choose a directory path"
    ancestor = _existing_ancestor(target)
    if not os.path.isdir(ancestor):
        return f"{label}: {ancestor} is a file, so no directory can be made under it; choose another path"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        problem = "is on a read-only file system (not writable)" if _read_only(ancestor) else "is not writable by this user"
        return f"{label}: {ancestor} {problem}; choose a writable path or fix its permissions"
    if _without_storage(ancestor):
        return (f"{label}: {ancestor} is on a file system without storage (such as /proc or /sys), where no "
                "file can be made; choose a path on a disk")
    return None


def _without_storage(path: str) -> bool:
    try:
        return os.statvfs(path).f_blocks == 0
    except OSError:
        return False


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False

