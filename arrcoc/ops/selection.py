"""Which tokens: budgets in arrcoc's one vocabulary, and top-k with ties broken by index."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from ..errors import BudgetError, StateError
from ..state import TokenState
from ._checks import check_mask, checks_enabled, per_row_count
from .moving import _rebuild, keep

__all__ = ["resolve_keep", "topk_per_row", "TopK", "topk", "keep_topk"]


def resolve_keep(keep: float | int, counts: torch.Tensor, *, where: str = "keep") -> torch.Tensor:
    """Tokens to keep per image from the one budget vocabulary of arrcoc.

    ``keep`` is a ratio when it is a float in (0, 1] (``floor(n * keep)``,
    at least 1, like the official ``int(N * rate)`` of HiRED / FastV), or an
    absolute count when it is an int >= 1.  A count larger than an image's
    tokens is an error, not a clip (the user's budget: checked always, one
    device sync for a count).  A row with no tokens (inside an LLM: a prompt
    without an image) keeps 0 under either form.

    Returns ``[B]`` int64 on ``counts.device``.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise BudgetError(f"{where}: expected a ratio in (0, 1] or a count >= 1, got {keep!r}")
    if counts.dtype != torch.int64:  # (no call for a no-op cast)
        counts = counts.to(torch.int64)
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise BudgetError(f"{where}: a ratio must lie in (0, 1], got {keep}")
        # floor(n * keep) in float64 like Python's int(N * rate) (n <= 2^53: exact; the cast truncates, which is
        # the floor of a product >= 0); elementwise over [B], no matmul
        return counts.double().mul_(keep).to(torch.int64).clamp_(min=1).minimum(counts)
    if keep < 1:
        raise BudgetError(f"{where}: a count must be >= 1, got {keep}")
    present = counts > 0
    if counts.numel():
        # The fewest tokens of a row that has any (a text-only prompt's empty row asks for nothing).
        fewest = int(counts.masked_fill(~present, torch.iinfo(torch.int64).max).min())
        if fewest < keep:
            raise BudgetError(f"{where}: asked to keep {keep} tokens, but an image has only {fewest}")
    return torch.full_like(counts, keep).masked_fill_(~present, 0)


#: The float32 magnitude bits that every NaN is ranked at: just above +inf's (0x7f800000), so all NaNs tie
#: (broken by index) above every number, as ``torch.sort`` ranks them.
_NAN_BITS = 0x7F800001
#: Index bits of the ranking key at most: ``1 + 32 + bits`` must fit an int64's 63 value bits.
_MAX_INDEX_BITS = 29


def _ranking_key(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """int64 ``[B, N]`` keys in the order of the ranking, largest first and all distinct.

    The order is that of a stable descending sort of ``scores.float()`` followed by a stable
    sort that puts masked entries last: real before masked, then the float32 score (NaN above
    +inf, ``-0.0 == 0.0``), then the lower index.  A float32's magnitude bits order like its
    magnitude, so ``+-magnitude`` is an int32 that orders like the float (``-0.0`` and ``0.0``
    both give 0; a NaN tests neither ``< 0`` nor above ``_NAN_BITS``).  The key packs
    ``[real: 1 bit | score: 32 bits | N - 1 - index: bits]``, so ``torch.topk`` of it is exact
    (no ties left for its kernel to order) with a few elementwise ops instead of full sorts.
    """
    s = scores if scores.dtype == torch.float32 else scores.float()  # (no call for a no-op cast: a few us each)
    N = s.shape[1]
    bits = max(1, (N - 1).bit_length())
    magnitude = s.abs().view(torch.int32).clamp_(max=_NAN_BITS)
    score = torch.where(s < 0, magnitude.neg(), magnitude)
    reverse_index = torch.arange(N - 1, -1, -1, device=s.device)
    key = torch.add(reverse_index, score, alpha=1 << bits)  # int64 (type promotion), computed in int64
    if mask is not None:
        key.add_(mask, alpha=1 << (32 + bits))
    return key


def _topk_rows(
    scores: torch.Tensor, k: int | torch.Tensor, mask: torch.Tensor | None, order: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`topk_per_row` plus whether every row keeps ``K`` (``valid`` all True)."""
    if scores.ndim != 2:
        raise StateError(f"topk_per_row: expected scores [B, N], got shape {list(scores.shape)}")
    if order not in ("score", "position"):
        raise StateError(f"topk_per_row: order must be 'score' or 'position', got {order!r}")
    B, N = scores.shape
    if mask is not None:
        check_mask(mask, (B, N), "topk_per_row")
    # (a tensor is no numbers.Integral: the abstract class's isinstance check is the slow one, so it goes last)
    host_k = not isinstance(k, torch.Tensor) and isinstance(k, numbers.Integral) and not isinstance(k, bool)
    if host_k and not 0 <= k <= N:  # (a host int: no sync)
        raise BudgetError(f"topk_per_row: asked for {k} tokens, rows have {N} slots")
    checks = checks_enabled()
    device = scores.device
    k_rows = None if host_k and not checks else per_row_count(k, B, device, "topk_per_row: k")
    if checks:
        real = scores if mask is None else scores[mask]
        if torch.isnan(real).any():
            raise StateError("topk_per_row: scores contain NaN")
        counts = torch.full((B,), N, device=device) if mask is None else mask.sum(1)
        if bool((k_rows > counts).any()) or bool((k_rows < 0).any()):
            raise BudgetError(
                f"topk_per_row: asked for {k_rows.tolist()} tokens, rows have {counts.tolist()}"
            )
    if host_k or not B:
        K, full = (int(k) if B else 0), True
    else:
        per_row = k_rows.tolist()  # the output's width: the op's one device sync ([B] ints: fewer ops than a max)
        K = max(per_row)
        full = min(per_row) == K
    if N > 1 << _MAX_INDEX_BITS:  # (no room for the index in the key: full stable sorts)
        index = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
        if mask is not None:
            last = torch.sort((~mask.gather(1, index)).to(torch.int8), dim=1, stable=True).indices
            index = index.gather(1, last)
        index = index[:, :K]
    else:
        # Rows of one width in position order need no ranking among the kept: an unsorted top-k.
        key = _ranking_key(scores, mask)
        index = torch.topk(key, K, dim=1, sorted=not (full and order == "position")).indices
    if full:
        valid = torch.ones(B, K, dtype=torch.bool, device=device)
        if order == "position":
            index = torch.sort(index, dim=1).values
        return index, valid, True
    valid = torch.arange(K, device=device)[None, :] < k_rows[:, None]
    if order == "position":
        index = torch.sort(index.masked_fill(~valid, N), dim=1).values.masked_fill(~valid, 0)
    return index, valid, False


def topk_per_row(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    order: str = "score",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked, ragged top-k over the last dim of ``scores`` ``[B, N]``.

    ``k`` is an int or a ``[B]`` tensor of per-row counts.  Masked entries are
    never selected, ties go to the lower index.  Scores of any floating dtype
    are ranked as their float32 values (NaN above every number, ``-0.0`` equal
    to ``0.0``).  With :func:`arrcoc.ops.checking` on, NaN scores of real
    tokens and a ``k`` outside ``[0, count]`` are errors (a ``k`` past a row's
    count would select a padded slot, which the stage boundary refuses: its
    size is 0).  ``order="score"`` returns indices by decreasing score,
    ``"position"`` in increasing index order (the original token order).

    Returns ``(index [B, K], valid [B, K])`` with ``K = max(k)``; one device
    sync for a tensor ``k`` (``K``), none for an int.
    """
    index, valid, _ = _topk_rows(scores, k, mask, order)
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
    if not isinstance(scores, torch.Tensor) or scores.shape != state.mask.shape:
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise StateError(
            f"keep_topk: scores must be [B, N]={list(state.mask.shape)} (one per token slot), got {got}"
        )
    index, valid, full = _topk_rows(scores, k, state.mask, order)
    if checks_enabled():
        return keep(state, index, valid)  # (with its checks of the index and of ``origin``)
    # What keep() would do, less what the top-k already guarantees: the index is in [0, N), unique per
    # row (on real tokens when k fits each row's count, which checking() verifies), its valid entries
    # come first and the width is the most kept (no packing sort, no second sync for the width).
    if full:
        return _rebuild(state, index, valid, True, index, state.origin)[0]
    index = index.masked_fill(~valid, 0)
    sink = index.masked_fill(~valid, state.N)  # invalid entries -> the dummy slot N
    return _rebuild(state, index, valid, False, sink, state.origin)[0]
