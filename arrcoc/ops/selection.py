"""Which tokens: budgets in arrcoc's one vocabulary, and top-k with ties broken by index."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from ..errors import BudgetError, StateError
from ..state import TokenState
from ._checks import check_mask, checks_enabled, per_row_count
from .moving import keep

__all__ = ["resolve_keep", "topk_per_row", "TopK", "topk", "keep_topk"]


def resolve_keep(keep: float | int, counts: torch.Tensor, *, where: str = "keep") -> torch.Tensor:
    """Tokens to keep per image from the one budget vocabulary of arrcoc.

    ``keep`` is a ratio when it is a float in (0, 1] (``floor(n * keep)``,
    at least 1, like the official ``int(N * rate)`` of HiRED / FastV), or an
    absolute count when it is an int >= 1.  A count larger than an image's
    tokens is an error, not a clip (the user's budget: checked always, one
    device sync for a count).

    Returns ``[B]`` int64 on ``counts.device``.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise BudgetError(f"{where}: expected a ratio in (0, 1] or a count >= 1, got {keep!r}")
    counts = counts.to(torch.int64)
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise BudgetError(f"{where}: a ratio must lie in (0, 1], got {keep}")
        # floor(n * keep) in float64 like Python's int(N * rate) (n <= 2^53: exact); elementwise over [B], no matmul
        return torch.floor(counts.double() * keep).to(torch.int64).clamp(min=1).minimum(counts)
    if keep < 1:
        raise BudgetError(f"{where}: a count must be >= 1, got {keep}")
    if counts.numel():
        fewest = int(counts.min())
        if fewest < keep:
            raise BudgetError(f"{where}: asked to keep {keep} tokens, but an image has only {fewest}")
    return torch.full_like(counts, keep)


def topk_per_row(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    order: str = "score",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked, ragged top-k over the last dim of ``scores`` ``[B, N]``.

    ``k`` is an int or a ``[B]`` tensor of per-row counts.  Masked entries are
    never selected, ties go to the lower index.  With
    :func:`arrcoc.ops.checking` on, NaN scores of real tokens and a ``k``
    outside ``[0, count]`` are errors (a ``k`` past a row's count would select
    a padded slot, which the stage boundary refuses: its size is 0).
    ``order="score"`` returns indices by decreasing score, ``"position"`` in
    increasing index order (the original token order).

    Returns ``(index [B, K], valid [B, K])`` with ``K = max(k)``.
    """
    if scores.ndim != 2:
        raise StateError(f"topk_per_row: expected scores [B, N], got shape {list(scores.shape)}")
    if order not in ("score", "position"):
        raise StateError(f"topk_per_row: order must be 'score' or 'position', got {order!r}")
    B, N = scores.shape
    if mask is not None:
        check_mask(mask, (B, N), "topk_per_row")
    k_rows = per_row_count(k, B, scores.device, "topk_per_row: k")
    if isinstance(k, numbers.Integral) and not 0 <= k <= N:  # (a host int: no sync)
        raise BudgetError(f"topk_per_row: asked for {k} tokens, rows have {N} slots")
    if checks_enabled():
        real = scores if mask is None else scores[mask]
        if torch.isnan(real).any():
            raise StateError("topk_per_row: scores contain NaN")
        counts = torch.full((B,), N, device=scores.device) if mask is None else mask.sum(1)
        if bool((k_rows > counts).any()) or bool((k_rows < 0).any()):
            raise BudgetError(
                f"topk_per_row: asked for {k_rows.tolist()} tokens, rows have {counts.tolist()}"
            )
    if isinstance(k, numbers.Integral):
        K = int(k) if B else 0
    else:
        K = int(k_rows.max()) if B else 0  # the output's width: the op's one device sync
    # Stable descending sort breaks ties by index; then (ragged rows) a stable sort on the
    # mask puts masked entries last even when real scores are -inf.
    index = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    if mask is not None:
        last = torch.sort((~mask.gather(1, index)).to(torch.int8), dim=1, stable=True).indices
        index = index.gather(1, last)
    index = index[:, :K]
    if isinstance(k, numbers.Integral):
        valid = torch.ones(B, K, dtype=torch.bool, device=scores.device)
    else:
        valid = torch.arange(K, device=scores.device)[None, :] < k_rows[:, None]
    if order == "position":
        index = torch.sort(index.masked_fill(~valid, N), dim=1).values.masked_fill(~valid, 0)
    return index, valid


class TopK(NamedTuple):
    """What :func:`topk` returns, like ``torch.topk``'s."""

    values: torch.Tensor
    indices: torch.Tensor


def topk(values: torch.Tensor, k: int, dim: int = -1, *, largest: bool = True) -> TopK:
    """``torch.topk(values, k, dim, largest, sorted=True)`` with ties broken by index (lower index first).

    ``torch.topk`` leaves the order of equal values to its kernel, which
    depends on the length of the dimension: a padded row of a ragged batch
    and the same row alone can pick different tied entries.  A stable sort
    cannot.  Unmasked and without per-row counts (see :func:`topk_per_row`
    for those); like ``torch.sort``, NaN counts as the largest value.
    Returns ``TopK(values, indices)``.
    """
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 0 <= k <= values.shape[dim]:
        raise StateError(f"topk: k must be an int in [0, {values.shape[dim]}], got {k!r}")
    out = torch.sort(values, dim=dim, descending=largest, stable=True)
    return TopK(out.values.narrow(dim, 0, k), out.indices.narrow(dim, 0, k))


def keep_topk(
    state: TokenState, scores: torch.Tensor, k: int | torch.Tensor, *, order: str = "position"
) -> TokenState:
    """Keep each image's ``k`` highest-scoring real tokens (original order by default)."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(state.mask.shape):
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise StateError(
            f"keep_topk: scores must be [B, N]={list(state.mask.shape)} (one per token slot), got {got}"
        )
    index, valid = topk_per_row(scores, k, state.mask, order=order)
    return keep(state, index, valid)
