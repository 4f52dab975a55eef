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
    machine's memory. After each test module, every such buffer created while it ran is removed: its
    processes have ended by then (tests run one module at a time)."""
    import glob
    import os
    import time

    started = time.time()
    yield
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.stat(path).st_mtime >= started - 1:
                os.remove(path)
        except OSError:
            pass
