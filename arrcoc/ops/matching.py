"""Which tokens merge: ToMe's bipartite soft matching, batched over ragged rows."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import BudgetError, StateError
from ._checks import check_mask, per_row_count
from .scores import similarity_key

__all__ = ["Matching", "bipartite_match", "bipartite_merges"]


class Matching(NamedTuple):
    """Pairs ``src[b, i] -> dst[b, i]`` (token indices), real where ``valid``."""

    src: torch.Tensor
    dst: torch.Tensor
    valid: torch.Tensor


def _merges_per_row(r: int | torch.Tensor, counts: torch.Tensor, B: int, device: torch.device, what: str
                    ) -> tuple[torch.Tensor, int]:
    """``(r_used [B], R = max r_used)``: ``r`` clamped per image to ``count // 2`` (one device sync for ``R``).

    A negative ``r`` is the caller's budget error (checked with the same sync)."""
    r_req = per_row_count(r, B, device, f"{what}: r")
    r_used = torch.minimum(r_req, torch.div(counts, 2, rounding_mode="floor"))
    if not B:
        return r_used, 0
    R, negative = torch.stack([r_used.max(), (r_req < 0).any().to(torch.int64)]).tolist()
    if negative:
        raise BudgetError(f"{what}: r must be >= 0, got {r_req.tolist()}")
    return r_used, R


def _ranked_edges(metric: torch.Tensor, counts: torch.Tensor, class_token: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every A token's best edge, best first (the official ``edge_idx``): ``(src, dst)`` ``[B, |A|]``.

    Official ``scores = a @ b.transpose(-1, -2)`` of the normalised metric,
    with :func:`similarity_key` as a rounding-proof ranking key; A tokens of
    the padding rank last.  No device sync.
    """
    N = metric.shape[1]
    device = metric.device
    a_idx = torch.arange(1 if class_token else 0, N, 2, device=device)
    b_idx = torch.arange(0 if class_token else 1, N, 2, device=device)
    scores = similarity_key(metric[:, 1 if class_token else 0::2], metric[:, 0 if class_token else 1::2])
    b_real = b_idx[None, :] < counts[:, None]
    scores = scores.masked_fill_(~b_real[:, None, :], float("-inf"))
    node_max, node_idx = scores.max(dim=-1)  # first index among equal keys
    a_real = a_idx[None, :] < counts[:, None]
    node_max = node_max.masked_fill_(~a_real, float("-inf"))
    edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    return a_idx[edge_idx], b_idx[node_idx.gather(1, edge_idx)]


def bipartite_match(
    metric: torch.Tensor,
    r: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    class_token: bool = False,
) -> tuple[Matching, torch.Tensor]:
    """ToMe's bipartite soft matching (Bolya et al. 2023, Sec. 3; official
    ``tome.merge.bipartite_soft_matching``), batched over ragged rows.

    Tokens alternate between set A and set B; every A token proposes its most
    similar B token (cosine of ``metric``), and the ``r`` A tokens with the
    most similar partners merge into them.  ``class_token=True`` reproduces
    the official layout where a class token sits before these tokens: it is
    the first A token and never merges, so A holds the odd-indexed tokens
    here and B the even ones.  ``r`` is clamped per image to ``n // 2``, as
    the official ``r = min(r, (t - protected) // 2)`` does.

    Args:
        metric: ``[B, N, C]`` features to compare (ToMe: keys averaged over heads).
        r: merges per image (int or ``[B]``).
        mask: ``[B, N]`` real tokens (a prefix of each row).

    Returns:
        ``(Matching(src, dst, valid) of shape [B, max r], r_used [B])``.
    """
    if metric.ndim != 3:
        raise StateError(f"bipartite_match: expected metric [B, N, C], got shape {list(metric.shape)}")
    B, N, _ = metric.shape
    device = metric.device
    if mask is not None:
        check_mask(mask, (B, N), "bipartite_match")
    counts = mask.sum(1) if mask is not None else torch.full((B,), N, device=device)
    r_used, R = _merges_per_row(r, counts, B, device, "bipartite_match")
    if R == 0:  # nothing to merge (also when a set is empty: a single token)
        empty = torch.zeros(B, 0, dtype=torch.int64, device=device)
        return Matching(empty, empty.clone(), empty.bool()), r_used
    src, dst = _ranked_edges(metric, counts, class_token)
    valid = torch.arange(R, device=device)[None, :] < r_used[:, None]
    return Matching(src[:, :R], dst[:, :R], valid), r_used


def bipartite_merges(
    metric: torch.Tensor, r: int | torch.Tensor, mask: torch.Tensor | None = None, *, class_token: bool = False
) -> tuple[Matching, torch.Tensor, torch.Tensor]:
    """:func:`bipartite_match` for ``r`` merges, plus the sort key ``[B, N]``
    of the order ToMe's merge returns the tokens in (pass it to :func:`merge`
    as ``order``).

    The official ``tome.merge`` output is ``cat([unmerged A, all B])``: the
    unmerged A tokens in index order with a class token, in decreasing order
    of their best edge without one, then every B token; an image with nothing
    to merge keeps its order (``do_nothing``).  The next matching alternates
    A/B over *that* order, so iterated merging depends on it.

    Returns ``(Matching of the r merges, r_used [B], order key [B, N])``.
    """
    if metric.ndim != 3:
        raise StateError(f"bipartite_merges: expected metric [B, N, C], got shape {list(metric.shape)}")
    B, N = metric.shape[:2]
    device = metric.device
    if mask is not None:
        check_mask(mask, (B, N), "bipartite_merges")
        counts = mask.sum(1)
    else:
        counts = torch.full((B,), N, device=device)
    r_used, R = _merges_per_row(r, counts, B, device, "bipartite_merges")
    index = torch.arange(N, device=device).expand(B, N)
    if R == 0:
        empty = torch.zeros(B, 0, dtype=torch.int64, device=device)
        return Matching(empty, empty.clone(), empty.bool()), r_used, index
    # Every A token's best edge, best first; the first ``r_used`` of them merge.  Capped at n // 2 ranked
    # edges, the list leaves out at most one A token (odd n): the last-ranked one.
    src, dst = _ranked_edges(metric, counts, class_token)
    ranks = torch.arange(src.shape[1], device=device)[None, :]
    merges = Matching(src[:, :R], dst[:, :R], ranks[:, :R] < r_used[:, None])
    return merges, r_used, _bipartite_order_key(src, ranks < (counts // 2)[:, None], r_used, class_token, N)


def _bipartite_order_key(src: torch.Tensor, ranked: torch.Tensor, r_used: torch.Tensor, class_token: bool,
                         N: int) -> torch.Tensor:
    """The official output order as a sort key: A tokens (index order with a class token, else by edge rank; an
    unranked one last among A), then B tokens; ``do_nothing`` (the identity) where nothing merges."""
    B = src.shape[0]
    device = src.device
    index = torch.arange(N, device=device).expand(B, N)
    is_a = (index % 2) == (1 if class_token else 0)
    key = torch.where(is_a, index, index + N)
    if not class_token:  # A tokens by edge rank; an unranked one (odd count) last among A
        rank = torch.full((B, N + 1), N - 1, dtype=torch.int64, device=device)
        sink = torch.where(ranked, src, torch.full_like(src, N))
        rank.scatter_(1, sink, torch.arange(sink.shape[1], device=device).expand_as(sink).contiguous())
        key = torch.where(is_a, rank[:, :N], key)
    return torch.where(r_used[:, None] > 0, key, index)
