"""Run a function on N gloo ranks spawned from a test (one process group per call)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.support.launch import free_port


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        from gorp_ds.cl.process_group import unlink_shm_buffer

        unlink_shm_buffer()  # DeepSpeed's CPU all-reduce buffers leave /dev/shm once every rank has them
        result = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException:  # report every failure to the parent, with its traceback
        result = {"ok": False, "error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if result["ok"]:
        _close_group()


def _close_group() -> None:
    """Meet the other ranks, then destroy the process group before the interpreter exits: a rank whose
    gloo threads still hold work objects when the interpreter tears down aborts (SIGABRT), most
    often the rank that exits last, after its peers closed their sockets. A failed rank skips this
    and exits at once, so that the others fail on their next collective instead of waiting here."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, out_dir: str) -> list[Any]:
    """Spawn ``world`` processes running ``fn(rank, world, *args)`` under an initialised gloo group;
    return each rank's return value, raising with the rank's traceback on failure."""
    os.makedirs(out_dir, exist_ok=True)
    mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world, start_method="spawn")
    results = []
    for rank in range(world):
        result = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
        if not result["ok"]:
            raise AssertionError(f"rank {rank} failed:\n{result['error']}")
        results.append(result["value"])
    return results
