"""Shared set-up of the vLLM plugin tests (they run in the vLLM environment; without vLLM they skip).

vLLM's engine runs in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
simpler, and an error at engine start reaches the test as the exception raised.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
