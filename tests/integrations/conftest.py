"""Shared set-up of the Hugging Face integration tests (tiny models: tiny_models.py)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (tests/conftest.py)."""
