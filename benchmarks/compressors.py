"""Time every registered compressor's core on synthetic token states, against the selection floor.

For each N (patch tokens), batch size and device, the state holds random
tokens ``[B, N, D]`` with a class token and the per-token inputs the
compressors read (``cls_attn``, ``cls_attn@0``, ``keys``, ``attn_from_last``)
plus a query ``[B, T, D]``. Each compressor runs with its default parameters
(the published settings). Its time is divided by the **floor**: one
``torch.topk`` over the same ``[B, N]`` scores keeping N / 4 plus gathering
the kept ``[B, N / 4, D]`` features, the least any method that outputs tokens
does. On the CPU a time is the calling thread's CPU time (``time.thread_time``:
another process on a shared machine does not count), by default with one torch
thread; on CUDA it is wall time around a device synchronisation. The method
and the floor take turns in three blocks of back-to-back runs (warm caches;
a change of the machine's load hits both alike); ``x floor`` is the ratio of
their medians over ``--repeats`` runs, ``x floor (min)`` the ratio of their
fastest runs (less sensitive to a busy machine).

The target (issue 17): every selection method within 5x of the floor at
N = 576, batch 1 (the ``target`` and ``meets`` columns of those rows). The
merge methods (``tome``, ``aim_merge``) have their own target, the official
code's time on the same tensors: ``benchmarks/merge_vs_official.py``. A
compressor that cannot run on such a state is listed with the reason.

    python benchmarks/compressors.py                     # N 576 and 2880, batch 1 and 16, D 1024
    python benchmarks/compressors.py --n 576 --batch 1   # the target's setting only
    python benchmarks/compressors.py --quick             # fewer repeats
    python benchmarks/compressors.py --csv out.csv --json out.json
    python benchmarks/compressors.py --only hired,visionzip --n 576 --batch 1
    python benchmarks/compressors.py --threads 0          # torch's default CPU threads (default: 1)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

import arrcoc
from arrcoc.errors import ArrcocError, ArrcocWarning
from arrcoc.state import LLMContext, TokenState

TARGET = 5.0  # x the floor (topk + gather), at N = 576 and batch 1, for every selection method
TARGET_N, TARGET_B, TARGET_D = 576, 1, 1024
#: Merge methods: their target is the official code's time (benchmarks/merge_vs_official.py), not the floor.
MERGE_METHODS = {"tome": "merge_vs_official.py", "aim_merge": "merge_vs_official.py"}


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int,
                   rounds: int = 3) -> dict[str, tuple[float, float]]:
    """``{name: (median ms, min ms)}`` of each ``fn()`` over ``repeats`` runs.

    The functions take turns in ``rounds`` blocks (a change of the machine's load hits all of them alike);
    inside a block one function runs back to back after ``warmup`` runs, with warm caches, as a
    compressor called on one state after another would (one call of another function in between would
    leave the floor's few tens of microseconds with cold caches and inflate it several times). The
    calling thread's CPU time on the CPU, wall time around device synchronisations on CUDA.
    """
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.thread_time
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(repeats // rounds + (r < repeats % rounds)):
                if cuda:
                    torch.cuda.synchronize(device)
                start = clock()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                times[name].append(clock() - start)
    return {name: (1e3 * statistics.median(t), 1e3 * min(t)) for name, t in times.items()}


def target_of(method: str, N: int, B: int, D: int = 1024) -> str:
    """What a row is held to: ``<= 5x`` the floor for a selection method in the target's setting (N = 576,
    batch 1, D = 1024, CLIP-L's width)."""
    if method in MERGE_METHODS:
        return "official*"
    return f"<= {TARGET:g}x" if (N, B, D) == (TARGET_N, TARGET_B, TARGET_D) else ""


def grid_for(n: int) -> tuple[int, int]:
    """A near-square grid with ``n`` cells (576 -> 24x24, 2880 -> 48x60: five 24x24 views)."""
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


#: Signals an in-LLM stage reads from the model (arrcoc.plugin.LLM_SIGNALS) that :func:`llm_state` fills on the
#: synthetic state: DART's key norms and final-norm hidden states, PyramidDrop's last-token attention.
LLM_SIGNAL_FIELDS = ("key_norms", "normed_hidden", "attn_from_last_here")
PROMPT_BEFORE, TEXT_AFTER = 35, 8  # LLaVA-1.5: system prompt + "USER:" before the image, the question after it
LLM_LAYER, LLM_LAYERS = 2, 32  # an in-LLM stage acting at decoder layer 2 of LLaVA-1.5-7B's 32


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
    query = rand(B, TEXT_AFTER, D)  # the instruction (cdpruner, dart_pre): [B, T, D]
    return state.replace(query=query, query_mask=torch.ones(B, TEXT_AFTER, dtype=torch.bool, device=device))


def llm_state(state: TokenState, needs: frozenset[str], layer: int = LLM_LAYER, seed: int = 1) -> TokenState:
    """``state`` as an in-LLM stage gets it at decoder ``layer`` of :data:`LLM_LAYERS` (contract of the hf engine):
    ``per_token["llm_slot"]``, ``state.llm`` (an :class:`~arrcoc.state.LLMContext` with the layer, the input
    visual counts, the positions and the text after the image) and, of :data:`LLM_SIGNAL_FIELDS`, the signals
    in ``needs`` (the engine fills only those): ``key_norms`` ``[B, N]`` with ``llm.text_key_norms`` ``[B, T]``
    (L1 norms of 32 x 128 post-rotary keys: positive, about 0.8 x 4096), ``normed_hidden`` ``[B, N, D]`` with
    ``llm.text_normed_hidden`` ``[B, T, D]``, ``attn_from_last_here`` ``[B, N]`` (softmax attention)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, N, D = state.tokens.shape
    device, T = state.device, TEXT_AFTER

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    per_token = {k: v for k, v in state.per_token.items()}
    per_token["llm_slot"] = torch.arange(N, device=device).expand(B, N).contiguous()
    text: dict[str, torch.Tensor] = {}
    if "key_norms" in needs:
        per_token["key_norms"] = 3277.0 + 60.0 * rand(B, N)
        text["text_key_norms"] = 3277.0 + 60.0 * rand(B, T)
    if "normed_hidden" in needs:
        per_token["normed_hidden"] = rand(B, N, D).to(state.dtype)
        text["text_normed_hidden"] = rand(B, T, D).to(state.dtype)
    if "attn_from_last_here" in needs:
        per_token["attn_from_last_here"] = (2.0 * rand(B, N)).softmax(-1)
    fields = {f.name for f in dataclasses.fields(LLMContext)}
    context = dict(
        layer=layer, num_layers=LLM_LAYERS, input_visual_counts=state.counts.clone(),
        text_mask=torch.ones(B, T, dtype=torch.bool, device=device),
        visual_positions=PROMPT_BEFORE + torch.arange(N, device=device).expand(B, N).contiguous(),
        text_positions=PROMPT_BEFORE + N + torch.arange(T, device=device).expand(B, T).contiguous(),
        **text,
    )
    llm = LLMContext(**{k: v for k, v in context.items() if k in fields})
    return state.replace(cls=None, per_token=per_token, llm=llm)


def state_for(plugin, state: TokenState) -> TokenState:
    """The state a plugin is timed on: an in-LLM stage that reads one of the engine's new signals gets
    :func:`llm_state` at the first decoder layer it acts at (of :data:`LLM_SIGNAL_FIELDS` the ones it needs);
    every other plugin the plain synthetic state (as before)."""
    needs = frozenset(plugin.requirements()) if hasattr(plugin, "requirements") else frozenset(plugin.needs)
    if getattr(plugin, "stage", "vision") == "llm" and needs & set(LLM_SIGNAL_FIELDS):
        return llm_state(state, needs, layer=min(plugin.llm_layers(LLM_LAYERS)))
    return state


def int_list(text: str) -> list[int]:
    """``"576,2304"`` -> ``[576, 2304]`` (one value or several, comma-separated)."""
    return [int(v) for v in text.split(",") if v.strip()]


def append_csv(path: str, row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` (a header first when the file is new)."""
    fresh = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if fresh:
            writer.writeheader()
        writer.writerow(row)


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
        missing = wanted - {i.name for i in infos}
        if missing:
            print(f"not registered (skipped): {', '.join(sorted(missing))}", file=sys.stderr)
        infos = [i for i in infos if i.name in wanted]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.cpu else [])
    rows: list[dict] = []
    for device in devices:
        for D in args.dim:
            for N in args.n:
                for B in args.batch:
                    rows += time_setting(infos, device, N, D, B, args)
    return rows


def time_setting(infos: list, device: torch.device, N: int, D: int, B: int, args: argparse.Namespace) -> list[dict]:
    """One row per compressor at ``N`` tokens of width ``D``, batch ``B``, against the floor."""
    state = synthetic_state(B, N, D, device)
    scores = state.per_token["cls_attn"]
    flat = state.tokens.reshape(B * N, -1)
    offsets = torch.arange(B, device=device)[:, None] * N

    def select():  # topk + gathering the kept features: the floor for any method that outputs tokens
        index = torch.topk(scores, N // 4, dim=1).indices
        return flat.index_select(0, (index + offsets).reshape(-1))

    def topk():
        return torch.topk(scores, N // 4, dim=1)

    rows = []
    for info in infos:
        row = {"device": device.type, "N": N, "D": D, "B": B, "method": info.name, "params": "", "ms": None,
               "min_ms": None, "floor_ms": None, "floor_min_ms": None, "topk_ms": None, "ratio": None,
               "ratio_min": None, "ratio_topk": None, "target": target_of(info.name, N, B, D), "meets": None,
               "tokens_out": None, "note": ""}
        try:
            plugin, params = build(info.cls)
            row["params"] = params
            given = state_for(plugin, state)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ArrcocWarning)
                with torch.inference_mode():
                    out = plugin(given)
                    t = interleaved_ms({"method": lambda: plugin(given), "floor": select, "topk": topk},
                                       args.repeats, device, args.warmup)
            (row["ms"], row["min_ms"]), (row["floor_ms"], row["floor_min_ms"]) = t["method"], t["floor"]
            row["topk_ms"] = t["topk"][0]
            row["ratio"] = row["ms"] / row["floor_ms"]
            row["ratio_min"] = row["min_ms"] / row["floor_min_ms"]
            row["ratio_topk"] = row["ms"] / row["topk_ms"]
            if row["target"].startswith("<="):
                row["meets"] = row["ratio"] <= TARGET
            row["tokens_out"] = round(float(out.counts.float().mean()), 1)
            if getattr(plugin, "stage", "vision") != "vision":
                row["note"] = f"{plugin.stage} stage"
        except (ArrcocError, NotImplementedError, TypeError) as exc:
            row["note"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
        rows.append(row)
        if args.verbose:
            print(row, file=sys.stderr, flush=True)
        if args.progress_csv:
            append_csv(args.progress_csv, row)
    return rows


def show(rows: list[dict], console: Console) -> None:
    table = Table(title="Compressor core time vs the floor (one torch.topk keeping N/4 + gathering the kept [B, N/4, D])")
    numeric = ("N", "D", "B", "ms", "floor ms", "x floor", "x floor (min)", "tokens out")
    for col in ("device", "N", "D", "B", "method", "params", "ms", "floor ms", "x floor", "target", "meets", "x floor (min)",
                "tokens out", "note"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.1f}"
        meets = {None: "", True: "yes", False: "[red]no[/red]"}[r["meets"]]
        if r["meets"] is False:
            ratio = f"[red]{ratio}[/red]"
        table.add_row(r["device"], str(r["N"]), str(r["D"]), str(r["B"]), r["method"], r["params"],
                      "" if r["ms"] is None else f"{r['ms']:.3f}", "" if r["floor_ms"] is None else f"{r['floor_ms']:.4f}",
                      ratio, r["target"], meets, "" if r["ratio_min"] is None else f"{r['ratio_min']:.1f}",
                      "" if r["tokens_out"] is None else str(r["tokens_out"]), r["note"])
    console.print(table)
    held = [r for r in rows if r["meets"] is not None]
    slow = [r for r in held if not r["meets"]]
    setting = f"N={TARGET_N}, batch {TARGET_B}"
    if not held:
        console.print(f"No selection method ran at {setting}: the target was not measured.")
    elif slow:
        console.print(f"Not within {TARGET:g}x of the floor at {setting}: "
                      + ", ".join(f"{r['method']} ({r['device']}, {r['ratio']:.1f}x)" for r in slow))
    else:
        console.print(f"Every selection method that ran is within {TARGET:g}x of the floor at {setting}.")
    if any(r["method"] in MERGE_METHODS for r in rows):
        console.print("* merge methods (tome, aim_merge) are held to the official code's time on the same tensors: "
                      "python benchmarks/merge_vs_official.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int_list, nargs="+", default=[[576, 2880]],
                        help="patch tokens per image (space- or comma-separated: 576,2304,2880)")
    parser.add_argument("--batch", type=int_list, nargs="+", default=[[1, 16]], help="batch sizes (as --n)")
    parser.add_argument("--dim", type=int_list, nargs="+", default=[[1024]], help="token widths D (as --n)")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs of each method (and of the floor)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each block of timed runs")
    parser.add_argument("--quick", action="store_true", help="3 repeats after 1 warm-up")
    parser.add_argument("--only", default="", help="comma-separated compressor names")
    parser.add_argument("--cpu", action="store_true", help="CPU only, even when a GPU is available")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads on CPU (default 1: stable numbers on a shared machine; 0 = torch's default)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--progress-csv", default=None,
                        help="append each row to this CSV file as soon as it is measured (a long grid keeps what it "
                        "timed if stopped)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    args.n, args.batch, args.dim = (sum(lists, []) for lists in (args.n, args.batch, args.dim))
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    show(rows, Console(width=max(Console().width, 160)))
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
