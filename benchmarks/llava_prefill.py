"""Prefill cost of a LLaVA-1.5-shaped model: ``prefill.py --family llava`` (kept so the commands in the docs run).

    python benchmarks/llava_prefill.py --out out/llava_prefill.md
    python benchmarks/llava_prefill.py --threads 1 --clock thread --ratios 64,144 --repeats 2   # interleaved, minima
"""

from prefill import main

if __name__ == "__main__":
    main(family="llava")
