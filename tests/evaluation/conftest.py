"""The shipped ToyVQA model, loaded once for the evaluation tests (whatever weights are in arrcoc/toyvqa/model)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def toy():
    pytest.importorskip("transformers")
    import arrcoc.toyvqa as toyvqa

    return toyvqa.load()
