"""Independent launches side by side, for a module whose fixture makes several.

A 2-rank CPU launch keeps about 1.1 of a 2-core machine's cores busy on average (measured on
test_cl_runs' ten launches: ~140 s of CPU in ~125 s): the ``deepspeed`` runner and its per-node
launcher import torch one after the other on one core, and the ranks wait on each other and on
gloo. Two launches that share no directory therefore finish sooner together than one after the
other. Each job is a plain function (a whole chain of dependent launches is one job); the jobs must
not touch ``os.environ`` (launch helpers take their environment as an argument) nor each other's
output directories. More than two at a time only adds memory on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
WORKERS = 2


def side_by_side(*jobs: Callable[[], T], workers: int = WORKERS) -> list[T]:
    """Each job's return value, in the order given; at most ``workers`` run at once. The first job
    that raised re-raises here, after every job has ended (none is left running behind a test)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
    return [future.result() for future in futures]
