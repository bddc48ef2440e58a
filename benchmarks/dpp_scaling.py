"""How CDPruner's greedy DPP scales: O(N k^2) for k picks of N tokens, no N x N matrix inverted per step.

Issue 18 asks that CDPruner's greedy MAP inference (``cdpruner_select``:
incremental Cholesky, Chen et al. 2018 Alg. 1) cost ``O(N k^2)`` with no
``N x N`` inverse per step.  This script times

* the greedy loop alone (``cdpruner_select`` on a precomputed similarity
  ``S`` and relevance ``r``) at a fixed ``N`` for ``k`` = 32, 64, 128, 256 and
  at a fixed ``k`` for ``N`` = 576, 1152, 2304, and the same with ``k = 1``
  (its one-off ``O(N^2)`` setup, the kernel ``r S r``, plus one step), whose
  difference is the ``k - 1`` greedy steps;
* the whole plugin call (similarity ``O(N^2 D)`` + relevance + the loop) at
  the same points, for scale;

and fits ``log ms`` against ``log k`` and ``log N`` (the local exponents
between consecutive points, and least squares).  A loop that is ``O(N k^2)``
has a ``k``-exponent between 1 (the ``O(N)`` work per step: argmax, the
kernel row, the gain update) and 2 (the ``O(N t)`` projection on the ``t``
earlier Cholesky columns, which dominates at large ``k``) and an
``N``-exponent of 1; an ``N x N`` solve or inverse per step would make it
``N^3 k``.  It also profiles one call of the loop and lists every operator
that takes an ``[B, N, N]`` operand, with its call count, and every
``linalg`` operator (there must be none).

CPU time of the calling thread (``time.thread_time``), one torch thread by
default, the minimum and median over ``--repeats`` runs after one warm-up.

    python benchmarks/dpp_scaling.py                         # N 576 for the k sweep, k 64 for the N sweep
    python benchmarks/dpp_scaling.py --fixed-n 2304 --fixed-k 128 --dim 4096
    python benchmarks/dpp_scaling.py --out /tmp/dpp_scaling.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import arrcoc
from arrcoc.state import TokenState


def load_cdpruner():
    """The plugin class and its module's public functions (through the registry, as any user gets them)."""
    cls = arrcoc.get_registry().get("compressor", "cdpruner")
    module = sys.modules[cls.__module__]
    return cls, module.cdpruner_similarity, module.cdpruner_relevance, module.cdpruner_select


def inputs(N: int, D: int, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, D, generator=g)
    query = torch.randn(B, 8, D, generator=g)
    return tokens, query, torch.ones(B, 8, dtype=torch.bool), torch.ones(B, N, dtype=torch.bool)


def cpu_ms(fn, repeats: int) -> tuple[float, float]:
    """``(min, median)`` ms of the calling thread's CPU time over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(1e3 * (time.thread_time() - start))
    return min(times), statistics.median(times)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent of ``y ~ x^p``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def sweep(points: list[tuple[int, int]], D: int, B: int, repeats: int) -> list[dict]:
    cls, similarity_of, relevance_of, select = load_cdpruner()
    rows = []
    for N, k in points:
        tokens, query, query_mask, mask = inputs(N, D, B)
        with torch.inference_mode():
            S = similarity_of(tokens, mask)
            r = relevance_of(tokens, query, query_mask, mask)
            budget = torch.full((B,), k, dtype=torch.int64)
            loop_min, loop_med = cpu_ms(lambda: select(S, r, mask, budget), repeats)
            # k = 1: the loop's one-off O(N^2) setup (the kernel r S r, its diagonal) and a single step
            one = torch.ones(B, dtype=torch.int64)
            setup_min, _ = cpu_ms(lambda: select(S, r, mask, one), repeats)
            plugin = cls(keep=k)
            state = TokenState.from_patches(tokens, (1, N)).replace(query=query, query_mask=query_mask)
            call_min, call_med = cpu_ms(lambda: plugin(state), repeats)
        steps = max(loop_min - setup_min, 1e-3)
        rows.append({"N": N, "k": k, "loop_min": loop_min, "loop_med": loop_med, "call_min": call_min,
                     "call_med": call_med, "setup_min": setup_min, "steps_min": steps,
                     "steps_per_Nk2_ns": 1e6 * steps / (B * N * k * k)})
        print(f"N={N:5d} k={k:4d}  loop {loop_min:8.2f} ms (median {loop_med:8.2f}, k=1 {setup_min:8.2f})  call "
              f"{call_min:8.2f} ms", file=sys.stderr, flush=True)
    return rows


def profile_ops(N: int, k: int, D: int, B: int) -> tuple[list[tuple[str, int, str]], list[str]]:
    """Operators of one greedy loop that read an ``[B, N, N]`` operand (name, calls, shapes), and any linalg op."""
    _, similarity_of, relevance_of, select = load_cdpruner()
    tokens, query, query_mask, mask = inputs(N, D, B)
    with torch.inference_mode():
        S = similarity_of(tokens, mask)
        r = relevance_of(tokens, query, query_mask, mask)
        budget = torch.full((B,), k, dtype=torch.int64)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            select(S, r, mask, budget)
    square, linalg = [], []
    for event in prof.key_averages(group_by_input_shape=True):
        shapes = str(event.input_shapes)
        if f"[{B}, {N}, {N}]" in shapes:
            square.append((event.key, event.count, shapes))
        if "linalg" in event.key or any(w in event.key for w in ("inverse", "solve", "cholesky", "lu_factor")):
            linalg.append(event.key)
    return square, linalg


def table(rows: list[dict]) -> str:
    lines = ["| N | k | cdpruner_select ms (min) | median | of it k = 1 (setup: r S r, one step) | the k - 1 further "
             "steps | ns per B N k^2 of the steps | whole call ms (min) | call median |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['k']} | {r['loop_min']:.2f} | {r['loop_med']:.2f} | {r['setup_min']:.2f} | "
                     f"{r['steps_min']:.2f} | {r['steps_per_Nk2_ns']:.3f} | {r['call_min']:.2f} | {r['call_med']:.2f} |")
    return "\n".join(lines)


def exponents(rows: list[dict], key: str, value: str) -> str:
    xs, ys = [r[key] for r in rows], [r[value] for r in rows]
    local = ", ".join(f"{xs[i]}->{xs[i + 1]}: {math.log(ys[i + 1] / ys[i]) / math.log(xs[i + 1] / xs[i]):.2f}"
                      for i in range(len(xs) - 1))
    return f"least squares {slope(xs, ys):.2f} (local {local})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed-n", type=int, default=576, help="N of the k sweep")
    parser.add_argument("--ks", default="32,64,128,256")
    parser.add_argument("--fixed-k", type=int, default=64, help="k of the N sweep")
    parser.add_argument("--ns", default="576,1152,2304")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="write the markdown here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(v) for v in args.ks.split(",")]
    ns = [int(v) for v in args.ns.split(",")]
    by_k = sweep([(args.fixed_n, k) for k in ks], args.dim, args.batch, args.repeats)
    by_n = sweep([(n, args.fixed_k) for n in ns], args.dim, args.batch, args.repeats)
    square, linalg = profile_ops(args.fixed_n, max(ks), args.dim, args.batch)
    text = "\n".join([
        f"## CDPruner greedy DPP scaling (D = {args.dim}, batch {args.batch}, {torch.get_num_threads()} thread(s), "
        f"CPU time, min of {args.repeats} runs)",
        "",
        f"### k sweep at N = {args.fixed_n}",
        "",
        table(by_k),
        "",
        f"exponent in k of the greedy steps (k = 1 subtracted): {exponents(by_k, 'k', 'steps_min')}; of "
        f"cdpruner_select: {exponents(by_k, 'k', 'loop_min')}; of the whole call: {exponents(by_k, 'k', 'call_min')}",
        "",
        f"### N sweep at k = {args.fixed_k}",
        "",
        table(by_n),
        "",
        f"exponent in N of the greedy steps (k = 1 subtracted): {exponents(by_n, 'N', 'steps_min')}; of "
        f"cdpruner_select (its setup r S r is O(N^2)): {exponents(by_n, 'N', 'loop_min')}; of the whole call "
        f"(the similarity is O(N^2 D)): {exponents(by_n, 'N', 'call_min')}",
        "",
        f"### Operators of one greedy loop (N = {args.fixed_n}, k = {max(ks)}) with an [B, N, N] operand",
        "",
        *[f"- `{name}` x {count}: {shapes}" for name, count, shapes in square],
        "",
        f"linalg / inverse / solve / cholesky operators: {', '.join(linalg) if linalg else 'none'}",
        "",
    ])
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
