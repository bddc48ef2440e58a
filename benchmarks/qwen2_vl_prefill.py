"""Prefill cost of a Qwen2-VL-shaped model: ``prefill.py --family qwen2_vl`` (kept so the commands in the docs run).

    python benchmarks/qwen2_vl_prefill.py --threads 1 --repeats 4
"""

from prefill import main

if __name__ == "__main__":
    main(family="qwen2_vl")
