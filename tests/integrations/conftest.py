"""Shared set-up of the Hugging Face integration tests (tiny models: tiny_models.py)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is ~50x faster than two on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
