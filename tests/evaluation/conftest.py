"""The shipped ToyVQA model, loaded once for the evaluation tests (whatever weights are in arrcoc/toyvqa/model)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is much faster than two on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy():
    pytest.importorskip("transformers")
    import arrcoc.toyvqa as toyvqa

    return toyvqa.load()
