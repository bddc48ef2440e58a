"""Shared set-up of the vLLM plugin tests (they run in the vLLM environment; without vLLM they skip).

vLLM's engine runs in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
simpler, and an error at engine start reaches the test as the exception raised.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# vLLM's CPU build still compiles a few kernels with inductor; its pool of compile workers failed once on a
# loaded 2-core machine (BlockingIOError: Resource temporarily unavailable): compile in the test process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    """The shipped ToyVQA model in transformers (float32, as the engines run it) and its processor."""
    import arrcoc.toyvqa as toyvqa

    model, processor = toyvqa.load(dtype=__import__("torch").float32)
    return model, processor
