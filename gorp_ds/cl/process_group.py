"""The process group of a launch: started the same way under ``deepspeed``, ``torchrun``, the SLURM
scripts and a plain ``python`` process, and a busy rendezvous port reported as one line. Joining it
also starts the watch on the launcher (``launcher_watch.py``) and unlinks this rank's shared-memory
buffer of DeepSpeed's CPU all-reduce (:func:`unlink_shm_buffer`)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from ..zero import side_group
from ..zero.deepspeed_patches import unlink_cpu_allreduce_buffer
from .config import ConfigError
from .launcher_watch import watch_launcher

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE")


def single_process_environment() -> None:
    """Rank 0 of 1 on this host when no launcher started this process.

    ``deepspeed``, ``torchrun`` and the SLURM scripts set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT. Without them DeepSpeed would look for MPI (an ``mpi4py`` import error), so a
    plain ``python`` process gets a one-rank group on MASTER_PORT if the user set one, and otherwise
    on a port the kernel says is free."""
    if any(name in os.environ for name in LAUNCHER_VARIABLES):
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def init_process_group() -> None:
    """Join (or, alone, create) the launch's process group; a rendezvous port that another job
    holds is a :class:`ConfigError` naming the port and how to choose another."""
    import deepspeed

    watch_launcher()  # before single_process_environment: RANK set by a launcher, not by us
    single_process_environment()
    if torch.cuda.is_available():
        # Object collectives on NCCL use the current CUDA device: make it this rank's before the first.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if dist.is_initialized():
        return
    try:
        deepspeed.init_distributed()
    except RuntimeError as err:  # torch's DistNetworkError is a RuntimeError
        if not _address_in_use(err):
            raise
        port, host = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "?")
        raise ConfigError(
            f"port {port} on {host} is already in use (another job's rendezvous?), so the process group cannot "
            f"start: choose a free port with the launcher's --master_port (deepspeed --master_port 29617 …, "
            f"torchrun --master_port 29617 …, make run LAUNCH_ARGS='--master_port 29617'), or set MASTER_PORT "
            "for a single process") from None
    unlink_shm_buffer()


def unlink_shm_buffer() -> None:
    """Unlink this rank's buffer of DeepSpeed's CPU all-reduce from /dev/shm once every rank has
    mapped every buffer (``deepspeed_patches.unlink_cpu_allreduce_buffer``): the memory is freed
    when the last rank exits, however it exits. Collective where the buffers exist."""
    unlink_cpu_allreduce_buffer(dist.get_rank(), dist.get_world_size(), lambda: side_group.gather_objects(None))


def _address_in_use(err: BaseException) -> bool:
    text = str(err)
    return "EADDRINUSE" in text or "address already in use" in text.lower()
