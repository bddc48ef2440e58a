"""Shared test configuration: the Hypothesis profiles of the property tests (tests/property/).

``ci`` (default): few examples, derandomized (the same examples on every
run), no deadline, no example database — the whole property suite stays well
under two minutes on two slow cores.  ``deep``: many random examples, for a
hunt before a release: ``HYPOTHESIS_PROFILE=deep python -m pytest tests/property``.
"""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without Hypothesis
    pass
else:
    _slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "ci", max_examples=15, deadline=None, derandomize=True, database=None,
        suppress_health_check=_slow, print_blob=True,
    )
    settings.register_profile(
        "deep", max_examples=400, deadline=None, suppress_health_check=_slow, print_blob=True,
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is far faster than two on a shared, loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
