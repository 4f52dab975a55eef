"""The process group of a launch: started the same way under ``deepspeed``, ``torchrun``, the SLURM
scripts and a plain ``python`` process, and a busy rendezvous port reported as one line. Joining it
also starts the watch on the launcher (``launcher_watch.py``) and unlinks this rank's shared-memory
buffer of DeepSpeed's CPU all-reduce (:func:`unlink_shm_buffer`)."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist

from ..log import get_logger
from ..zero import side_group
from .config import ConfigError
from .launcher_watch import watch_launcher

log = get_logger(__name__)

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


# DeepSpeed's CPU accelerator (ops/csrc/cpu/comm/shm.cpp, DeepSpeed 0.19) gives each rank of a
# one-host group a 66 MB POSIX shared-memory buffer for its low-latency all-reduce, named
# deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (/dev/shm/ on Linux). The
# ranks open each other's by name while the backend starts, and DeepSpeed never unlinks them.
SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def shm_buffer_path() -> str:
    """This rank's all-reduce buffer, named as DeepSpeed names it (from the launcher's variables)."""
    return SHM_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                             port=os.environ.get("MASTER_PORT", ""), rank=dist.get_rank())


def unlink_shm_buffer() -> None:
    """Unlink this rank's all-reduce buffer once every rank has mapped every buffer: the mappings
    stay valid and the memory is freed when the last rank exits, however it exits (SIGKILL
    included), instead of staying in /dev/shm. Only this group's own names are touched (its
    address, port and ranks; other jobs on the machine rendezvous on other ports).

    Collective where DeepSpeed makes the buffers (the CPU accelerator, every rank on this host:
    the same answer on every rank); a rank's buffer exists once its backend start-up returned."""
    from deepspeed.accelerator import get_accelerator

    world = dist.get_world_size()
    if world == 1 or get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world):
        return
    side_group.gather_objects(None)  # every rank has returned from the start-up, so has opened every buffer
    path = shm_buffer_path()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        log.debug(f"unlinked {path}")


def _address_in_use(err: BaseException) -> bool:
    text = str(err)
    return "EADDRINUSE" in text or "address already in use" in text.lower()
