"""Time every registered compressor's core on synthetic token states, against the topk floor.

For each N (patch tokens), batch size and device, the state holds random
tokens ``[B, N, D]`` with a class token and the per-token inputs the
compressors read (``cls_attn``, ``cls_attn@0``, ``keys``, ``attn_from_last``)
plus a query ``[B, T, D]``. Each compressor runs with its default parameters
(the published settings), and its median time is divided by the time of one
``torch.topk`` over the same ``[B, N]`` scores keeping N / 4 — the floor for a
selection method — and by the time of that topk plus gathering the kept
``[B, N / 4, D]`` features (the floor for anything that outputs tokens). A compressor that cannot run on such a state is listed with
the reason. The target is every method within 5x of the floor at N = 576;
the ones that are not are printed after the table.

    python benchmarks/compressors.py                     # N 576 and 2880, batch 1 and 16, D 1024
    python benchmarks/compressors.py --quick             # fewer repeats
    python benchmarks/compressors.py --csv out.csv --json out.json
    python benchmarks/compressors.py --only hired,visionzip --n 576 --batch 1
    python benchmarks/compressors.py --threads 0          # torch's default CPU threads (default: 1)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings

import torch
from rich.console import Console
from rich.table import Table

from _timing import time_ms

import arrcoc
from arrcoc.errors import ArrcocError, ArrcocWarning
from arrcoc.state import TokenState

TARGET = 5.0  # x the topk floor, at N = 576


def grid_for(n: int) -> tuple[int, int]:
    """A near-square grid with ``n`` cells (576 -> 24x24, 2880 -> 48x60: five 24x24 views)."""
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def synthetic_state(B: int, N: int, D: int, device: torch.device, seed: int = 0) -> TokenState:
    g = torch.Generator(device="cpu").manual_seed(seed)
    heads_dim = 64

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    per_token = {
        "cls_attn": (2.0 * rand(B, N)).softmax(-1),  # heavy-tailed, as real CLS attention
        "cls_attn@0": (2.0 * rand(B, N)).softmax(-1),
        "keys": rand(B, N, heads_dim),
        "attn_from_last": rand(B, N).softmax(-1),
    }
    state = TokenState.from_patches(rand(B, N, D), grid_for(N), cls_token=rand(B, D), per_token=per_token)
    query = rand(B, 8, D)
    return state.replace(query=query, query_mask=torch.ones(B, 8, dtype=torch.bool, device=device))


def build(cls):
    """The plugin with its defaults, or with ``keep: 0.25`` when its defaults name no budget."""
    try:
        return cls(), "defaults"
    except ArrcocError:
        return cls(keep=0.25), "keep=0.25"


def run(args: argparse.Namespace) -> list[dict]:
    registry = arrcoc.get_registry()
    infos = registry.list("compressor")
    if args.only:
        wanted = set(args.only.split(","))
        infos = [i for i in infos if i.name in wanted]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.cpu else [])
    rows: list[dict] = []
    for device in devices:
        for N in args.n:
            for B in args.batch:
                state = synthetic_state(B, N, args.dim, device)
                scores = state.per_token["cls_attn"]
                floor = time_ms(lambda: torch.topk(scores, N // 4, dim=1), args.repeats, device, warmup=args.warmup)
                flat = state.tokens.reshape(B * N, -1)
                offsets = torch.arange(B, device=device)[:, None] * N

                def select():  # topk + gathering the kept features: the floor for any method that outputs tokens
                    index = torch.topk(scores, N // 4, dim=1).indices
                    return flat.index_select(0, (index + offsets).reshape(-1))

                gather_floor = time_ms(select, args.repeats, device, warmup=args.warmup)
                for info in infos:
                    row = {"device": device.type, "N": N, "B": B, "method": info.name, "params": "", "ms": None,
                           "topk_ms": floor, "gather_ms": gather_floor, "ratio": None, "ratio_gather": None, "tokens_out": None, "note": ""}
                    try:
                        plugin, params = build(info.cls)
                        row["params"] = params
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", ArrcocWarning)
                            with torch.inference_mode():
                                out = plugin(state)
                                row["ms"] = time_ms(lambda: plugin(state), args.repeats, device, warmup=args.warmup)
                        row["ratio"] = row["ms"] / floor
                        row["ratio_gather"] = row["ms"] / gather_floor
                        row["tokens_out"] = round(float(out.counts.float().mean()), 1)
                        if getattr(plugin, "stage", "vision") != "vision":
                            row["note"] = f"{plugin.stage} stage"
                    except (ArrcocError, NotImplementedError, TypeError) as exc:
                        row["note"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                    rows.append(row)
                    if args.verbose:
                        print(row, file=sys.stderr)
    return rows


def show(rows: list[dict], console: Console) -> None:
    table = Table(title="Compressor core time vs one torch.topk (the selection floor)")
    numeric = ("N", "B", "ms", "topk ms", "x topk", "x topk+gather", "tokens out")
    for col in ("device", "N", "B", "method", "params", "ms", "topk ms", "x topk", "x topk+gather", "tokens out", "note"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.1f}"
        if r["ratio"] is not None and r["N"] == 576 and r["ratio"] > TARGET:
            ratio = f"[red]{ratio}[/red]"
        table.add_row(r["device"], str(r["N"]), str(r["B"]), r["method"], r["params"],
                      "" if r["ms"] is None else f"{r['ms']:.2f}", f"{r['topk_ms']:.3f}", ratio,
                      "" if r["ratio_gather"] is None else f"{r['ratio_gather']:.1f}",
                      "" if r["tokens_out"] is None else str(r["tokens_out"]), r["note"])
    console.print(table)
    slow = sorted({(r["method"], r["device"]) for r in rows
                   if r["N"] == 576 and r["ratio"] is not None and r["ratio"] > TARGET})
    if slow:
        console.print(f"Not within {TARGET:g}x of the topk floor at N=576: "
                      + ", ".join(f"{m} ({d}, worst {max(r['ratio'] for r in rows if r['method'] == m and r['device'] == d and r['N'] == 576 and r['ratio'] is not None):.1f}x)"
                                  for m, d in slow))
    else:
        console.print(f"Every method that ran is within {TARGET:g}x of the topk floor at N=576.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[576, 2880], help="patch tokens per image")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 repeats after 1 warm-up")
    parser.add_argument("--only", default="", help="comma-separated compressor names")
    parser.add_argument("--cpu", action="store_true", help="CPU only, even when a GPU is available")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads on CPU (default 1: stable numbers on a shared machine; 0 = torch's default)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    show(rows, Console(width=max(Console().width, 150)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
