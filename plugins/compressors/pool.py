"""``pool``: uniform spatial average pooling of the patch grid (a baseline).

The grid ``H0 x W0`` is cut into ``h x w`` non-overlapping cells and each
cell becomes one token: the plain mean of its patches (what LLaVA-style
"pool the visual tokens" baselines and ``torch.nn.functional.avg_pool2d``
do).  Patch row ``r`` falls in cell row ``floor(r * h / H0)`` (``grid``) or
``r // stride`` (``stride``; the last cell is smaller when the stride does
not divide the grid, like ``avg_pool2d(ceil_mode=True)`` which divides by the
real patch count).  When ``h`` divides ``H0`` (and ``w`` ``W0``) this is
exactly ``avg_pool2d(kernel=stride)``.

It is done as a merge through :func:`arrcoc.ops.merge` (every patch of a
cell merges into the cell's first patch), so ``size`` (patches per cell),
``positions`` (cell centroids), ``origin`` and every ``per_token`` field
(averaged) stay right.  Output tokens are in raster order of the cells.

Pooling needs the full, uncompressed grid (one token per patch in raster
order): run it first, before any other compressor.
"""

from __future__ import annotations

import functools
import math

import torch
from pydantic import Field, model_validator

from arrcoc import ops
from arrcoc.errors import BudgetError, StateError, record_warning
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Compressor, Keep, Params, budget_count
from arrcoc.state import TokenState


def cell_of_patches(grid: tuple[int, int], cells: tuple[int, int] | None = None,
                    stride: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cell index (raster order over the ``h x w`` cells) of every patch, and ``(h, w)``."""
    H, W = grid
    if (cells is None) == (stride is None):
        raise StateError("cell_of_patches: pass exactly one of cells=(h, w) or stride=(sh, sw)")
    rows, cols = torch.arange(H), torch.arange(W)
    if cells is not None:
        h, w = cells
        if not (1 <= h <= H and 1 <= w <= W):
            raise BudgetError(f"pool: target grid {h}x{w} must lie within the {H}x{W} patch grid (each side >= 1)")
        r, c = torch.div(rows * h, H, rounding_mode="floor"), torch.div(cols * w, W, rounding_mode="floor")
    else:
        sh, sw = stride
        h, w = math.ceil(H / sh), math.ceil(W / sw)
        r, c = torch.div(rows, sh, rounding_mode="floor"), torch.div(cols, sw, rounding_mode="floor")
    return (r[:, None] * w + c[None, :]).reshape(-1), (h, w)


def grid_for_count(grid: tuple[int, int], count: int) -> tuple[int, int]:
    """The ``h x w`` cell grid with about ``count`` cells and the aspect ratio of ``grid``."""
    H, W = grid
    h = min(H, max(1, round(math.sqrt(count * H / W))))
    w = min(W, max(1, round(count / h)))
    return h, w


def check_full_grid(state: TokenState, who: str) -> None:
    """Raise unless every image still has one token per original patch, in raster order."""
    N0 = state.grid[0] * state.grid[1]
    identity = torch.arange(N0, device=state.device).expand(state.B, N0)
    # One device sync for both checks (the shapes are checked first, on the host).
    if state.N != N0 or not bool((state.origin == identity).all() & state.mask.all()):
        raise StateError(
            f"{who}: needs the full, uncompressed {state.grid[0]}x{state.grid[1]} patch grid (one token per "
            f"patch in raster order), got {state.token_counts()} tokens per image (class token included) "
            "after earlier compression; put it before any other compressor"
        )


@functools.lru_cache(maxsize=64)
def _cell_merges(grid: tuple[int, int], cells: tuple[int, int] | None, stride: tuple[int, int] | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src [M], dst [M])`` on the CPU: every patch that is not its cell's first merges into that first patch.

    Depends on the grid and the cells only, so it is built once per setting (a cache), not per call.
    """
    cell, _ = cell_of_patches(grid, cells, stride)
    N0 = cell.numel()
    # Each cell's first patch (smallest index) is its destination; the others merge into it.
    first = torch.full((N0,), N0, dtype=torch.int64).scatter_reduce(0, cell, torch.arange(N0), reduce="amin")
    dst_all = first[cell]
    src = torch.nonzero(dst_all != torch.arange(N0)).squeeze(1)
    return src, dst_all[src]


def pool(state: TokenState, cells: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
         *, checked: bool = False) -> TokenState:
    """Average-pool the full patch grid into ``cells`` (h, w) or by ``stride`` (sh, sw).

    ``checked``: the caller has already run :func:`check_full_grid` on ``state``.
    """
    if not checked:
        check_full_grid(state, "pool")
    src, dst = _cell_merges(tuple(state.grid), None if cells is None else tuple(cells),
                            None if stride is None else tuple(stride))
    B = state.B
    src = src.to(state.device).expand(B, -1).contiguous()
    dst = dst.to(state.device).expand(B, -1).contiguous()
    return ops.merge(state, src, dst, weights=torch.ones_like(state.size))


class PoolParams(Params):
    grid: tuple[int, int] | None = Field(None, description="Target cell grid [h, w], e.g. [12, 12].")
    stride: int | tuple[int, int] | None = Field(
        None, description="Cell size in patches (int or [sh, sw]); the last cell is smaller if it does not divide."
    )
    keep: Keep | None = Field(
        None, description="Alternatively a budget (ratio or count): the grid with about that many cells and "
        "the patch grid's aspect ratio (a warning says when it cannot be met exactly).",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> "PoolParams":
        given = [n for n in ("grid", "stride", "keep") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, stride or keep, got {given or 'none'}")
        if self.grid is not None and min(self.grid) < 1:
            raise ValueError(f"grid sides must be >= 1, got {list(self.grid)}")
        if self.stride is not None:
            s = (self.stride, self.stride) if isinstance(self.stride, int) else self.stride
            if min(s) < 1:
                raise ValueError(f"stride must be >= 1, got {self.stride}")
        return self


class Pool(Compressor):
    """Uniform spatial average pooling of the full patch grid to a coarser grid (baseline)."""

    name = "pool"
    Params = PoolParams

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        return 1.0, float(context.tokens)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        # `keep` as a count: the cell grid with about that many cells and the patch grid's aspect ratio
        # (grid_for_count); the nearest grid may miss the count by a few cells, as the warning says.
        rest = {k: v for k, v in params.items() if k not in ("grid", "stride", "keep")}
        return {**rest, "keep": budget_count(target, context.tokens)}

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        if p.stride is not None:
            s = (p.stride, p.stride) if isinstance(p.stride, int) else tuple(p.stride)
            return pool(state, stride=s)
        if p.grid is not None:
            return pool(state, cells=tuple(p.grid))
        check_full_grid(state, "pool")
        N0 = state.grid[0] * state.grid[1]
        count = int(ops.resolve_keep(p.keep, torch.tensor([N0]), where="pool: keep")[0])
        cells = grid_for_count(state.grid, count)
        if cells[0] * cells[1] != count:
            record_warning(
                f"pool: keep={p.keep} asks for {count} tokens; the nearest {cells[0]}x{cells[1]} grid gives "
                f"{cells[0] * cells[1]}"
            )
        return pool(state, cells=cells, checked=True)


@hookimpl
def arrcoc_register_plugins(register):
    register(Pool)
