"""Peak memory of one method, measured from that method's start (the runner trains several methods
in one process, so a process-wide peak would carry an earlier method's into a later one's).

- GPU: the CUDA caching allocator's peak of allocated bytes, reset when the method starts.
- CPU: the process's resident-set high-water mark (VmHWM), reset when the method starts by writing
  5 to ``/proc/self/clear_refs`` (Linux ≥ 4.0), after a garbage collection and ``malloc_trim`` have
  handed the earlier method's freed memory back. Where that reset is not possible the peak is
  reported as not measured (None), never as a value from earlier work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch

GIB = 2**30
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


class PeakMemory:
    """``start()`` when a method begins, ``gib()`` when it ends; ``source`` says what was measured."""

    def __init__(self) -> None:
        self.source = "cuda_allocated" if torch.cuda.is_available() else "rss_high_water_mark"
        self._measuring = False

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._measuring = True
            return
        gc.collect()
        _malloc_trim()
        try:
            CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, an old kernel, or a sandbox that forbids it
            self._measuring = False
            return
        self._measuring = _high_water_mark_kib() is not None

    def gib(self) -> float | None:
        """The peak since ``start()`` in GiB, or None where it could not be measured."""
        if not self._measuring:
            return None
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / GIB
        kib = _high_water_mark_kib()
        return None if kib is None else kib * 1024 / GIB


def _high_water_mark_kib() -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system, so that the resident set starts from what is
    really in use (best effort: other C libraries have no ``malloc_trim``)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass
