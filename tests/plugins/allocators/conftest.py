"""Registers a stand-in ``mipmap`` pyramid only when the real one is not installed (see standin_mipmap.py)."""

import pytest

from standin_mipmap import ensure_mipmap


@pytest.fixture(autouse=True, scope="session")
def _mipmap():
    ensure_mipmap()
    yield
