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
    from tests.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))
