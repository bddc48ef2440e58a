"""Time arrcoc's merge methods against the official merge code on the same tensors.

ToMe: ``tome.merge.bipartite_soft_matching`` + ``merge_wavg`` (facebookresearch/ToMe ``tome/merge.py``)
against the ``tome`` compressor (metric = the keys, size-weighted). AIM: the official
``bipartite_soft_matching_merge`` (dragonlzm/AIM ``llava/model/token_merge.py``, metric = the features,
``scatter_reduce(mode="mean")``) called twice as ``llava/model/llava_arch.py`` does (``r = N // 2`` then
``N // 4``) against the ``aim_merge`` compressor (defaults: ``keep [0.5, 0.5]``). The official functions are
re-written here from reading them (see /work/shared/METHODS.md); they work on one padded ``[B, N, C]`` tensor,
while arrcoc's also carry sizes, positions and origin and accept ragged batches.

The issue's target: every ratio (arrcoc / official) <= 1.0. The two run alternately, median of each.

    python benchmarks/merge_vs_official.py                  # N 576, D 1024, batch 1 and 8, one CPU thread
    python benchmarks/merge_vs_official.py --repeats 200 --batch 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

from arrcoc.errors import ArrcocWarning
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.aim import AIMMerge
from arrcoc_plugins.compressors.tome import ToMe

TARGET = 1.0  # x the official code's time


# ----------------------------------------------------------- official code, re-written
def official_tome_matching(metric: torch.Tensor, r: int, class_token: bool = False):
    """``tome.merge.bipartite_soft_matching`` (no distill token): returns its ``merge(x, mode)``."""
    protected = int(class_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def official_merge_wavg(merge, x: torch.Tensor, size: torch.Tensor | None = None):
    """``tome.merge.merge_wavg``."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def official_tome(x: torch.Tensor, metric: torch.Tensor, r: int):
    return official_merge_wavg(official_tome_matching(metric, r), x)


def official_aim_merge(metric: torch.Tensor, r: int, x: torch.Tensor, mode: str = "mean"):
    """AIM's ``bipartite_soft_matching_merge`` (ToMe's matching, metric = x, one scatter_reduce)."""
    t = metric.shape[1]
    r = min(r, t // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)


def official_aim(x: torch.Tensor):
    """``llava_arch.py``: ``r = N // 2`` then ``r = N // 4`` of the original count, metric = the features."""
    n = x.shape[1]
    x = official_aim_merge(x, n // 2, x)
    return official_aim_merge(x, n // 4, x)


# ------------------------------------------------------------------------ the runs
def tensors(B: int, N: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g), torch.randn(B, N, 64, generator=g)


def grid_for(n: int) -> tuple[int, int]:
    h = math.isqrt(n)
    while n % h:
        h -= 1
    return h, n // h


def cases(B: int, N: int, D: int):
    """(method, setting, official fn, arrcoc fn, check) on the same tensors."""
    x, keys = tensors(B, N, D)
    tome_state = TokenState.from_patches(x, grid_for(N), per_token={"keys": keys})
    plain_state = TokenState.from_patches(x, grid_for(N))
    out = []
    for r in (8, N // 4):
        plugin = ToMe(r=r)
        out.append(("tome", f"r={r}", lambda r=r: official_tome(x, keys, r), lambda p=plugin: p(tome_state)))
    aim = AIMMerge()
    out.append(("aim_merge", "keep [0.5, 0.5]", lambda: official_aim(x), lambda: aim(plain_state)))
    return out


def interleaved_ms(first, second, repeats: int, warmup: int) -> tuple[float, float, float, float]:
    """Median CPU milliseconds of this thread for ``first()`` and ``second()``, run alternately, so that a change
    in the machine's load hits both alike (CPU time, not wall time: on a shared machine the wall time is mostly
    waiting; torch runs on this thread with --threads 1)."""
    for _ in range(warmup):
        first(), second()
    a, b = [], []
    for _ in range(repeats):
        start = time.thread_time()
        first()
        mid = time.thread_time()
        second()
        a.append(mid - start)
        b.append(time.thread_time() - mid)
    return 1e3 * statistics.median(a), 1e3 * statistics.median(b), 1e3 * min(a), 1e3 * min(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=576)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0 = torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() != 1:
        print("note: with more than one thread, the CPU time of this thread misses the others' work")
    table = Table(title=f"arrcoc merge vs official, CPU, {torch.get_num_threads()} thread(s), N={args.n}, D={args.dim}, "
                        f"median CPU time of {args.repeats} interleaved runs")
    for col in ("method", "setting", "B", "official ms", "arrcoc ms", "ratio", "ratio of the min"):
        table.add_column(col, justify="left" if col in ("method", "setting") else "right")
    worst = 0.0
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", ArrcocWarning)
        for B in args.batch:
            for method, setting, official, ours in cases(B, args.n, args.dim):
                t_off, t_ours, min_off, min_ours = interleaved_ms(official, ours, args.repeats, args.warmup)
                ratio = t_ours / t_off
                worst = max(worst, ratio)
                shown = f"{ratio:.2f}" if ratio <= TARGET else f"[red]{ratio:.2f}[/red]"
                table.add_row(method, setting, str(B), f"{t_off:.3f}", f"{t_ours:.3f}", shown, f"{min_ours / min_off:.2f}")
    console = Console(width=120)
    console.print(table)
    console.print(f"worst ratio {worst:.2f} (target <= {TARGET:g})")


if __name__ == "__main__":
    main()
