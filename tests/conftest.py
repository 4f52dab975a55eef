import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_for_optim_tests(request):
    """The optimizer tests use small matrices; on a shared 2-core machine torch's intra-op threads
    spin against other work and make a 256×1024 SVD take seconds instead of ~20 ms. Only the
    ``test_optim_*`` modules are affected, and the previous setting is restored."""
    if not request.node.path.name.startswith("test_optim_"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA + BPE tokenizer directory (shared by the runner tests)."""
    from tests.support.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True, scope="module")
def _remove_leftover_shared_memory():
    """DeepSpeed's CPU all-reduce makes a 66 MB buffer per rank in /dev/shm (a RAM-backed tmpfs);
    runs and run_ranks unlink theirs once every rank has started, but a group killed during its
    start-up (or a test that starts DeepSpeed's backend itself) may leave them, and many fill the
    machine's memory. After each test module, every such buffer created while it ran and mapped by no
    live process is removed: a group still starting (another session's, on a shared machine) has
    its buffers mapped, and keeps them."""
    import glob
    import os
    import time

    started = time.time()
    yield
    leftovers = [p for p in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*") if _mtime(p) >= started - 1]
    if not leftovers:
        return
    mapped = _mapped_files()
    for path in leftovers:
        if path not in mapped:
            try:
                os.remove(path)
            except OSError:
                pass


def _mtime(path: str) -> float:
    import os

    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _mapped_files() -> set[str]:
    """Every file some live process maps (from /proc/<pid>/maps; the processes this user can read)."""
    import glob

    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as handle:
                mapped.update(line.split(None, 5)[5].strip() for line in handle if line.count(" ") >= 5
                              and "/dev/shm/" in line)
        except (OSError, IndexError):
            pass
    return mapped


@pytest.fixture
def fault_plan():
    """Install a fault plan (gorp_ds/faults.py: ``install(write_fault=("results", 3))``) for one test,
    with fresh write counters; the plan from before and empty counters afterwards."""
    from gorp_ds import faults

    before = faults.current()

    def install(**fields) -> None:
        faults._WRITES.clear()
        faults.install(faults.FaultPlan(**fields))

    yield install
    faults._WRITES.clear()
    faults.install(before)

