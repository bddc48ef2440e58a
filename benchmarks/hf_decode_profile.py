"""arrcoc's own Python work per decoding step inside ``arrcoc.hf.apply`` (a profile, beside hf_decode_overhead.py).

Wall-clock overhead per token is a small difference of two noisy times on a
shared machine; this counts what arrcoc itself does per step instead:
``cProfile`` over ``generate`` of ``--new-tokens`` and of 1 token, the
difference divided by the extra steps, summed over the functions defined in
arrcoc's files (``arrcoc/``, ``plugins/``): calls per step (exact, the same on
every run) and their own CPU time per step (cProfile's, inflated by the
profiler; compare it between versions only).  Same tiny LLaVA and pipelines
as ``hf_decode_overhead.py``.

    python benchmarks/hf_decode_profile.py
    PYTHONPATH=<another checkout> python benchmarks/hf_decode_profile.py   # the same for another version
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import warnings

import torch
from rich.console import Console
from rich.table import Table

import arrcoc
from hf_decode_overhead import PIPELINES, prompt, tiny_llava


def arrcoc_work(model, batch: dict, new_tokens: int) -> tuple[int, float]:
    """(calls, own seconds) of arrcoc's functions during one greedy generate of ``new_tokens``."""
    profile = cProfile.Profile()
    with torch.no_grad():
        profile.enable()
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        profile.disable()
    calls, seconds = 0, 0.0
    for (filename, _, _), (_, ncalls, own, _, _) in pstats.Stats(profile).stats.items():
        if "/arrcoc/" in filename or "/plugins/" in filename or "arrcoc_plugins" in filename:
            calls, seconds = calls + ncalls, seconds + own
    return calls, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, batch = tiny_llava(args.layers, args.width), prompt()
    steps = args.new_tokens - 1
    table = Table(title=f"arrcoc's own work per decoding step (tiny LLaVA {args.layers} x {args.width}, batch 1, "
                        f"{args.new_tokens} new tokens; arrcoc from {arrcoc.__file__})")
    for column in ("pipeline", "calls / step", "own CPU us / step (profiled, min)", "(median)"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for name, spec in PIPELINES.items():
        with arrcoc.hf.apply(model, spec):
            arrcoc_work(model, batch, 2)  # warm-up
            rows = []
            for _ in range(args.repeats):
                calls_n, seconds_n = arrcoc_work(model, batch, args.new_tokens)
                calls_1, seconds_1 = arrcoc_work(model, batch, 1)
                rows.append(((calls_n - calls_1) / steps, (seconds_n - seconds_1) / steps * 1e6))
        table.add_row(name, f"{statistics.median(r[0] for r in rows):.1f}", f"{min(r[1] for r in rows):.1f}",
                      f"{statistics.median(r[1] for r in rows):.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
