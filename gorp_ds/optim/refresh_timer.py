"""Time spent computing projectors, measured without slowing the step down.

A refresh's kernels run asynchronously on a GPU: reading a wall clock around them would measure
the launch, and synchronising to measure them would stall the step. So by default each refresh is
bracketed by CUDA events, read only when :meth:`RefreshTimer.seconds` is called (at logging
intervals); with ``synchronize`` (profiling) it is wall time between device synchronisations. On
the CPU it is plain wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class RefreshTimer:
    """Accumulated refresh seconds: ``with timer(device, synchronize): <refresh>``."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []  # (start, end) CUDA events not read yet

    @contextmanager
    def __call__(self, device: torch.device, synchronize: bool) -> Iterator[None]:
        cuda = device.type == "cuda"
        if cuda and not synchronize:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        if cuda:
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
        self._seconds += time.perf_counter() - began

    def seconds(self) -> float:
        """Total so far; waits for the recorded events (a device sync: call at logging intervals)."""
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self._seconds
