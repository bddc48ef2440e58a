"""The only code that moves tokens.

A plugin decides *what* to keep or merge (indices); these functions do *how*,
once, for every field of a :class:`~arrcoc.state.TokenState`: ``tokens``,
``mask``, ``size``, ``positions``, ``origin`` and each ``per_token`` tensor
stay aligned, ragged batches stay packed (real tokens first), and nothing is
silently dropped: bad indices raise :class:`~arrcoc.errors.StateError`.

Everything is batched and vectorised; ties are broken by index.  Rankings
by cosine use :func:`similarity_key`, so that equal cosines are equal
whatever the batch they are computed in.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping, NamedTuple

import torch

from ..errors import BudgetError, InputError, StateError
from ..state import TokenState

__all__ = [
    "Matching",
    "TopK",
    "bipartite_match",
    "bipartite_merges",
    "check_scores",
    "cosine",
    "gather_rows",
    "keep",
    "keep_topk",
    "merge",
    "normalize_scores",
    "pack",
    "query_similarity",
    "patches_to_tokens",
    "resolve_keep",
    "similarity_key",
    "topk",
    "topk_per_row",
    "unmerge",
]


# --------------------------------------------------------------------- budgets
def resolve_keep(keep: float | int, counts: torch.Tensor, *, where: str = "keep") -> torch.Tensor:
    """Tokens to keep per image from the one budget vocabulary of arrcoc.

    ``keep`` is a ratio when it is a float in (0, 1] (``floor(n * keep)``,
    at least 1, like the official ``int(N * rate)`` of HiRED / FastV), or an
    absolute count when it is an int >= 1.  A count larger than an image's
    tokens is an error, not a clip.

    Returns ``[B]`` int64 on ``counts.device``.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise BudgetError(f"{where}: expected a ratio in (0, 1] or a count >= 1, got {keep!r}")
    counts = counts.to(torch.int64)
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise BudgetError(f"{where}: a ratio must lie in (0, 1], got {keep}")
        return torch.floor(counts.double() * keep).to(torch.int64).clamp(min=1).minimum(counts)
    if keep < 1:
        raise BudgetError(f"{where}: a count must be >= 1, got {keep}")
    if counts.numel() and bool((counts < keep).any()):
        raise BudgetError(
            f"{where}: asked to keep {keep} tokens, but an image has only {int(counts.min())}"
        )
    return torch.full_like(counts, keep)


# ------------------------------------------------------------------- selection
def topk_per_row(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    order: str = "score",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked, ragged top-k over the last dim of ``scores`` ``[B, N]``.

    ``k`` is an int or a ``[B]`` tensor of per-row counts.  Masked entries are
    never selected, ties go to the lower index, NaN scores are an error.
    ``order="score"`` returns indices by decreasing score, ``"position"`` in
    increasing index order (the original token order).

    Returns ``(index [B, K], valid [B, K])`` with ``K = max(k)``.
    """
    if scores.ndim != 2:
        raise StateError(f"topk_per_row: expected scores [B, N], got shape {list(scores.shape)}")
    if order not in ("score", "position"):
        raise StateError(f"topk_per_row: order must be 'score' or 'position', got {order!r}")
    B, N = scores.shape
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=scores.device)
    _check_mask(mask, (B, N), "topk_per_row")
    if torch.isnan(scores[mask]).any():
        raise StateError("topk_per_row: scores contain NaN")
    counts = mask.sum(1)
    k_rows = _per_row_count(k, B, scores.device, "topk_per_row: k")
    if bool((k_rows > counts).any()) or bool((k_rows < 0).any()):
        raise BudgetError(
            f"topk_per_row: asked for {k_rows.tolist()} tokens, rows have {counts.tolist()}"
        )
    K = int(k_rows.max()) if B else 0
    # Stable descending sort breaks ties by index; then a stable sort on the
    # mask puts masked entries last even when real scores are -inf.
    index = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    last = torch.sort((~mask.gather(1, index)).to(torch.int8), dim=1, stable=True).indices
    index = index.gather(1, last)[:, :K]
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


def _check_mask(mask: object, shape: tuple[int, ...], what: str, name: str = "mask", dims: str = "[B, N]") -> None:
    """``mask`` must be a bool tensor of ``shape`` (a shape check: no device sync)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        raise StateError(f"{what}: {name} must be a bool tensor {dims}={list(shape)}, got {_describe(mask)}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def _per_row_count(k: int | torch.Tensor, B: int, device: torch.device, what: str) -> torch.Tensor:
    """An int or an integer ``[B]`` (or scalar) tensor -> int64 ``[B]`` on ``device``; anything else is an error."""
    integral = isinstance(k, numbers.Integral) and not isinstance(k, bool)
    if isinstance(k, torch.Tensor):
        integral = not k.is_floating_point() and not k.is_complex() and k.dtype != torch.bool and k.ndim <= 1
        integral = integral and (k.ndim == 0 or k.shape[0] == B)
    if not integral:
        got = f"a tensor of shape {list(k.shape)} dtype {k.dtype}" if isinstance(k, torch.Tensor) else repr(k)
        raise StateError(f"{what}: expected an int or an integer tensor [B={B}], got {got}")
    return torch.as_tensor(k, device=device, dtype=torch.int64).expand(B)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pairwise cosine similarity ``[..., N, C] x [..., M, C] -> [..., N, M]``."""
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-1]:
        raise StateError(
            f"cosine: expected [..., N, C] and [..., M, C] with one C, got {list(a.shape)} and {list(b.shape)}"
        )
    # Divide the [N, M] products by the norms rather than normalising the
    # [N, C] inputs: O(NM) divisions instead of O(NC) (M is often a few words).
    norms = a.norm(dim=-1).clamp_min(eps)[..., :, None] * b.norm(dim=-1).clamp_min(eps)[..., None, :]
    return (a @ b.transpose(-1, -2)) / norms


#: :func:`similarity_key` snaps cosines to multiples of this (about float32's resolution near 1).
SIMILARITY_GRID = 2.0 ** -24


def similarity_key(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise cosine ``[..., N, C] x [..., M, C] -> [..., N, M]`` to *rank* by: float64, snapped
    to multiples of :data:`SIMILARITY_GRID`.

    A matrix product rounds differently with its shape, so the same cosine
    computed in a ragged batch and for the image alone can differ in the last
    float32 bits, and mathematically equal cosines (duplicate tokens, two
    uniform regions, orthogonal vectors) would be ordered by that noise
    rather than by index.  Computed from the inputs in float64, the noise
    stays far below the grid, so equal cosines get equal keys and the stable
    sorts, :func:`topk` and first-index ``max`` / ``argmax`` here break the tie
    by index.  Cosines closer than the grid (below float32's resolution) tie.
    Returns float64 (float32 on devices without float64, e.g. MPS, where the
    tie guarantee does not hold).
    """
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-1]:
        raise StateError(
            f"similarity_key: expected [..., N, C] and [..., M, C] with one C, got {list(a.shape)} and {list(b.shape)}"
        )
    dtype = torch.float32 if a.device.type == "mps" else torch.float64
    x, y = a.to(dtype), b.to(dtype)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.round((x @ y.transpose(-1, -2)) / SIMILARITY_GRID) * SIMILARITY_GRID


def query_similarity(
    tokens: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor | None = None, reduce: str = "max"
) -> torch.Tensor:
    """Cosine of each token ``[B, N, D]`` with each query token ``[B, T, D]``,
    reduced over the real query tokens (``max``: the best word; ``mean``) -> float32 ``[B, N]``."""
    if reduce not in ("max", "mean"):
        raise StateError(f"query_similarity: reduce must be 'max' or 'mean', got {reduce!r}")
    if tokens.ndim != 3 or query.ndim != 3 or query.shape[0] != tokens.shape[0] or query.shape[-1] != tokens.shape[-1]:
        raise StateError(
            f"query_similarity: expected tokens [B, N, D] and query [B, T, D], got {list(tokens.shape)} and "
            f"{list(query.shape)}"
        )
    if query_mask is not None:
        _check_mask(query_mask, tuple(query.shape[:2]), "query_similarity", "query_mask", "[B, T]")
    sim = similarity_key(tokens, query, eps=1e-6).float()  # [B, N, T]; equal cosines stay equal in any batch
    if query_mask is None:
        return sim.amax(-1) if reduce == "max" else sim.mean(-1)
    real = query_mask[:, None, :]
    if reduce == "max":
        return sim.masked_fill(~real, float("-inf")).amax(-1)
    return (sim * real).sum(-1) / real.sum(-1).clamp_min(1)


def check_scores(scores: torch.Tensor, mask: torch.Tensor, where: str) -> torch.Tensor:
    """``scores`` as float32 ``[B, N]`` after checking its shape and that every real token's score is finite."""
    if tuple(scores.shape) != tuple(mask.shape):
        raise InputError(f"{where} must be [B, N]={list(mask.shape)}, got {list(scores.shape)}")
    scores = scores.float()
    real = scores[mask]
    if not bool(torch.isfinite(real).all()):
        raise InputError(
            f"{where} has {int(torch.isnan(real).sum())} NaN and {int(torch.isinf(real).sum())} infinite "
            "values on real tokens; expected finite scores"
        )
    return scores


def normalize_scores(scores: torch.Tensor, mask: torch.Tensor, how: str = "rank", *, rtol: float = 1e-5) -> torch.Tensor:
    """Per-image normalisation of ``scores`` ``[B, N]`` over the real tokens -> float32; padded entries 0.

    ``minmax``: ``(s - min) / (max - min)`` in [0, 1];
    ``rank``: average rank (ties share it) over ``n - 1``, in [0, 1] (0.5 for a
    single token; ``±inf`` rank like any value); ``zscore``: ``(s - mean) / std``
    (population std); ``none``: unchanged.  NaN scores
    (and, for ``minmax`` / ``zscore``, infinite ones) of real tokens are a
    :class:`~arrcoc.errors.StateError`; padded entries are not looked at.

    A near-constant row gives 0 for ``minmax`` and ``zscore``: one whose
    spread (``max - min``, resp. the std) is at most ``rtol`` times its
    largest magnitude.  Rounding noise (float32 differs in the last bits
    when the same scores are computed in a batch or alone) is then not
    stretched to [0, 1], and the result does not depend on the batch; the
    test is relative, so a rescaled row normalises the same.
    """
    if how not in ("minmax", "rank", "zscore", "none"):
        raise StateError(f"normalize_scores: how must be 'minmax', 'rank', 'zscore' or 'none', got {how!r}")
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(mask.shape):
        raise StateError(
            f"normalize_scores: scores must be [B, N]={list(mask.shape)} like the mask, got {_describe(scores)}"
        )
    s = scores.float()
    if how == "none" or s.shape[1] == 0:  # nothing to normalise (no token slot at all)
        return s.masked_fill(~mask, 0.0)
    real = s[mask]
    if bool(torch.isnan(real).any()) or (how != "rank" and not bool(torch.isfinite(real).all())):
        raise StateError(f"normalize_scores: scores of real tokens contain NaN{'' if how == 'rank' else ' or inf'} (how={how!r})")
    n = mask.sum(1, keepdim=True).float()
    if how == "minmax":
        lo = s.masked_fill(~mask, float("inf")).amin(1, keepdim=True)
        hi = s.masked_fill(~mask, float("-inf")).amax(1, keepdim=True)
        span = hi - lo
        flat = span <= rtol * torch.maximum(lo.abs(), hi.abs())
        out = torch.where(flat, torch.zeros_like(s), (s - lo) / span.clamp_min(torch.finfo(torch.float32).tiny))
    elif how == "rank":
        x = s.masked_fill(~mask, float("inf")).contiguous()
        ordered = torch.sort(x, dim=1).values.contiguous()
        below = torch.searchsorted(ordered, x, right=False)  # real scores strictly smaller
        # real scores smaller or equal (a real +inf would also count the padding's +inf: clamp to n)
        upto = torch.minimum(torch.searchsorted(ordered, x, right=True), n.long())
        rank0 = (below + upto - 1).float() / 2.0  # 0-based average rank
        out = torch.where(n > 1, rank0 / (n - 1).clamp_min(1.0), torch.full_like(rank0, 0.5))
    else:  # zscore
        x = s.masked_fill(~mask, 0.0)
        mean = x.sum(1, keepdim=True) / n.clamp_min(1.0)
        centred = (x - mean) * mask
        std = (centred.square().sum(1, keepdim=True) / n.clamp_min(1.0)).sqrt()
        flat = std <= rtol * x.abs().amax(1, keepdim=True)
        out = torch.where(flat, torch.zeros_like(centred), centred / std.clamp_min(torch.finfo(torch.float32).tiny))
    return out.masked_fill(~mask, 0.0)


class Matching(NamedTuple):
    """Pairs ``src[b, i] -> dst[b, i]`` (token indices), real where ``valid``."""

    src: torch.Tensor
    dst: torch.Tensor
    valid: torch.Tensor


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
        _check_mask(mask, (B, N), "bipartite_match")
    counts = mask.sum(1) if mask is not None else torch.full((B,), N, device=device)
    r_req = _per_row_count(r, B, device, "bipartite_match: r")
    if bool((r_req < 0).any()):
        raise BudgetError(f"bipartite_match: r must be >= 0, got {r_req.tolist()}")
    r_used = torch.minimum(r_req, torch.div(counts, 2, rounding_mode="floor"))
    R = int(r_used.max()) if B else 0
    if R == 0:  # nothing to merge (also when a set is empty: a single token)
        empty = torch.zeros(B, 0, dtype=torch.int64, device=device)
        return Matching(empty, empty.clone(), empty.bool()), r_used

    a_idx = torch.arange(1 if class_token else 0, N, 2, device=device)
    b_idx = torch.arange(0 if class_token else 1, N, 2, device=device)
    # Official ``scores = a @ b.transpose(-1, -2)`` of the normalised metric, as a rounding-proof ranking key.
    scores = similarity_key(metric[:, a_idx], metric[:, b_idx])
    b_real = b_idx[None, :] < counts[:, None]
    scores = scores.masked_fill(~b_real[:, None, :], float("-inf"))
    node_max, node_idx = scores.max(dim=-1)
    a_real = a_idx[None, :] < counts[:, None]
    node_max = node_max.masked_fill(~a_real, float("-inf"))
    edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[:, :R]
    src = a_idx[edge_idx]
    dst = b_idx[node_idx.gather(1, edge_idx)]
    valid = torch.arange(R, device=device)[None, :] < r_used[:, None]
    return Matching(src, dst, valid), r_used


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
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=metric.device)
    _check_mask(mask, (B, N), "bipartite_merges")
    # Every A token's best edge, best first (the official ``edge_idx``); the
    # first ``r_used`` of them merge.  Capped at n // 2, the list leaves out
    # at most one A token (odd n): the last-ranked one.
    ranked, _ = bipartite_match(metric, N, mask, class_token=class_token)
    r_req = _per_row_count(r, B, metric.device, "bipartite_merges: r")
    if bool((r_req < 0).any()):
        raise BudgetError(f"bipartite_merges: r must be >= 0, got {r_req.tolist()}")
    r_used = torch.minimum(r_req, mask.sum(1) // 2)
    R = int(r_used.max()) if B else 0
    first = torch.arange(ranked.src.shape[1], device=metric.device)[None, :] < r_used[:, None]
    merges = Matching(ranked.src[:, :R], ranked.dst[:, :R], (ranked.valid & first)[:, :R])
    return merges, r_used, _bipartite_order_key(ranked, r_used, mask, class_token)


def _bipartite_order_key(ranked: Matching, r_used: torch.Tensor, mask: torch.Tensor, class_token: bool) -> torch.Tensor:
    B, N = mask.shape
    index = torch.arange(N, device=mask.device).expand(B, N)
    is_a = (index % 2) == (1 if class_token else 0)
    key = torch.where(is_a, index, index + N)
    if not class_token:  # A tokens by edge rank; an unranked one (odd count) last among A
        rank = torch.full((B, N + 1), N - 1, dtype=torch.int64, device=mask.device)
        sink = torch.where(ranked.valid, ranked.src, torch.full_like(ranked.src, N))
        rank.scatter_(1, sink, torch.arange(sink.shape[1], device=mask.device).expand_as(sink).contiguous())
        key = torch.where(is_a, rank[:, :N], key)
    return torch.where(r_used[:, None] > 0, key, index)


# ------------------------------------------------------------- moving tokens
def _check_rows(index: object, valid: object, B: int, N: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, valid)`` after checking an int64 index ``[B, K]`` into ``N`` slots
    (``valid`` defaults to all True); returns the index with invalid entries set to 0."""
    if not isinstance(index, torch.Tensor) or index.ndim != 2 or index.shape[0] != B or index.dtype != torch.int64:
        got = f"shape {list(index.shape)} dtype {index.dtype}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise StateError(f"{what}: expected an int64 index [B={B}, K], got {got}")
    if valid is None:
        valid = torch.ones_like(index, dtype=torch.bool)
    if not isinstance(valid, torch.Tensor) or valid.shape != index.shape or valid.dtype != torch.bool:
        raise StateError(f"{what}: valid must be a bool tensor of shape {list(index.shape)}")
    if bool(((index < 0) | (index >= N))[valid].any()):
        raise StateError(f"{what}: indices must lie in [0, {N})")
    return index.masked_fill(~valid, 0), valid


def _check_index(state: TokenState, index: object, valid: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    safe, valid = _check_rows(index, valid, state.B, state.N, what)
    if not bool(state.mask.gather(1, safe)[valid].all()):
        raise StateError(f"{what}: an index points at a padded (masked) token slot")
    return safe, valid


def _check_origin(state: TokenState, what: str) -> None:
    """``state.origin`` must point at token slots or be -1 (one device sync).

    ``TokenState`` checks shapes only; a bad value would index past the tokens.
    """
    origin = state.origin
    bad = (origin < -1) | (origin >= state.N)
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise StateError(
            f"{what}: TokenState.origin: values must lie in [-1, {state.N}) (a token slot, or -1 for a dropped "
            f"patch), got {int(origin[b, p])} for patch {p} of image {b}"
        )


def _flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """Row ids into a ``[B * n, ...]`` flattening for a per-row ``index`` ``[B, K]``."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * n).reshape(-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k]]`` for ``x`` ``[B, N, ...]``; invalid slots are zero.

    One ``index_select`` over flattened rows: several times faster than
    ``gather`` with an index expanded over the channels.  Valid indices must
    lie in ``[0, N)``.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise StateError(f"gather_rows: expected x [B, N, ...], got {_describe(x)}")
    safe, valid = _check_rows(index, valid, x.shape[0], x.shape[1], "gather_rows")
    return _gather_rows(x, safe, valid)


def _gather_rows(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`gather_rows` without the checks, for indices already checked."""
    B, N = x.shape[:2]
    out = x.reshape(B * N, *x.shape[2:]).index_select(0, _flat_rows(index, N))
    out = out.view(*index.shape, *x.shape[2:])
    if bool(valid.all()):
        return out
    fill = valid.view(*valid.shape, *([1] * (x.ndim - 2)))
    return out.masked_fill(~fill, 0) if out.dtype != torch.bool else out & fill


def keep(state: TokenState, index: torch.Tensor, valid: torch.Tensor | None = None) -> TokenState:
    """Keep the tokens ``index`` ``[B, K]`` (where ``valid``), in that order.

    Every per-token field is gathered, dropped patches get ``origin = -1``,
    and real tokens are packed to the front of each row.  Indices must point
    at real tokens and be unique per row.
    """
    safe, valid = _check_index(state, index, valid, "keep")
    _check_origin(state, "keep")
    return _keep(state, safe, valid)


def _keep(state: TokenState, safe: torch.Tensor, valid: torch.Tensor) -> TokenState:
    """:func:`keep` of checked indices (invalid entries 0)."""
    B, N = state.mask.shape
    # Pack real entries first (stable: keeps the caller's order), trim padding.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    safe, valid = safe.gather(1, order), valid.gather(1, order)
    K = int(valid.sum(1).max()) if B else 0
    safe, valid = safe[:, :K], valid[:, :K]

    sink = torch.where(valid, safe, torch.full_like(safe, N))  # invalid -> dummy slot N
    hits = torch.zeros(B, N + 1, dtype=torch.int64, device=state.device)
    hits.scatter_add_(1, sink, torch.ones_like(sink))
    if bool((hits[:, :N] > 1).any()):
        raise StateError("keep: an index appears more than once in a row")
    new_slot = torch.full((B, N + 1), -1, dtype=torch.int64, device=state.device)
    new_slot.scatter_(1, sink, torch.arange(K, device=state.device).expand(B, K).contiguous())
    new_slot[:, N] = -1
    origin = state.origin
    moved = new_slot.gather(1, origin.clamp(min=0))
    origin = torch.where(origin >= 0, moved, origin)

    return dataclasses.replace(
        state,
        tokens=_gather_rows(state.tokens, safe, valid),
        mask=valid.clone(),
        size=_gather_rows(state.size, safe, valid),
        positions=_gather_rows(state.positions, safe, valid),
        origin=origin,
        per_token={k: _gather_rows(v, safe, valid) for k, v in state.per_token.items()},
    )


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


def merge(
    state: TokenState,
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    reduce: Mapping[str, str] | None = None,
    order: torch.Tensor | None = None,
) -> TokenState:
    """Merge token ``src[b, i]`` into ``dst[b, i]`` and remove the sources.

    Each destination becomes the weighted average of itself and everything
    merged into it, ``x_d = sum_i w_i x_i / sum_i w_i`` (ToMe's
    ``merge_wavg``: ``weights`` defaults to ``size``; pass ones for a plain
    mean).  ``size`` adds up (total size is conserved), ``positions`` are
    size-weighted centroids, ``origin`` follows the sources to their
    destination.  Floating ``per_token`` fields are averaged like the tokens
    unless ``reduce[name]`` is ``"sum"`` (e.g. attention mass) or ``"dst"``
    (keep the destination's value); other dtypes keep the destination's.

    Survivors keep their original order, or, given ``order`` (a ``[B, N]``
    sort key of the tokens before merging, e.g. :func:`bipartite_order_key`),
    come out sorted by it.  Sources must be unique and must not also be
    destinations.
    """
    src_safe, valid = _check_index(state, src, valid, "merge(src)")
    if not isinstance(dst, torch.Tensor) or dst.shape != src.shape:
        raise StateError(f"merge: dst must be an int64 index of the shape of src {list(src.shape)}, got {_describe(dst)}")
    dst_safe, _ = _check_index(state, dst, valid, "merge(dst)")
    _check_origin(state, "merge")
    B, N = state.mask.shape
    device = state.device
    reduce = dict(reduce or {})
    for name, how in reduce.items():
        if name not in state.per_token or how not in ("mean", "sum", "dst"):
            raise StateError(
                f"merge: reduce[{name!r}]={how!r}; expected a per_token field "
                f"({sorted(state.per_token)}) mapped to 'mean', 'sum' or 'dst'"
            )

    src_sink = torch.where(valid, src_safe, torch.full_like(src_safe, N))
    is_src = torch.zeros(B, N + 1, dtype=torch.int64, device=device)
    is_src.scatter_add_(1, src_sink, torch.ones_like(src_sink))
    if bool((is_src[:, :N] > 1).any()):
        raise StateError("merge: a source token appears more than once in a row")
    is_src = is_src[:, :N] > 0
    if bool(is_src.gather(1, dst_safe)[valid].any()):
        raise StateError("merge: a destination token is also a source (chains are not allowed)")

    # target[b, n]: the slot token n ends up in (itself unless it is a source); column N is a dummy,
    # so that origin (-1 clamped to 0) can be looked up even in a state with no token slot.
    target = torch.arange(N + 1, device=device).expand(B, N + 1).clone()
    target.scatter_(1, src_sink, torch.where(valid, dst_safe, torch.full_like(dst_safe, N)))

    w = (state.size if weights is None else weights).to(torch.float32)
    if w.shape != (B, N):
        raise StateError(f"merge: weights must be [B={B}, N={N}], got {list(w.shape)}")
    # A group whose weights add up to 0 would average to a zero vector (and a
    # negative one is no average): every token that merges needs a weight > 0.
    merging = torch.zeros(B, N + 1, dtype=torch.bool, device=device).scatter_(1, src_sink, True)
    merging = merging.scatter_(1, torch.where(valid, dst_safe, torch.full_like(dst_safe, N)), True)[:, :N]
    bad = merging & ~((w > 0) & (w < float("inf")))
    if bool(bad.any()):
        b, n = (int(i) for i in bad.nonzero()[0])
        what = "weights" if weights is not None else "weights (the sizes)"
        raise StateError(
            f"merge: {what} must be finite and > 0 on real tokens that merge (a group needs a positive total "
            f"weight to average), got {float(w[b, n])} for token {n} of image {b}"
        )
    w = w * state.mask

    # Only destinations change value: gather the pairs' rows, add them up per
    # destination (index_add_: like ToMe's scatter_reduce, the CUDA kernel uses
    # atomics, so float sums may differ in the last bit), and write the results
    # into the survivors gathered by ``keep`` — every other token is copied as is.
    pair = valid.reshape(-1)
    src_rows = _flat_rows(src_safe, N)[pair]
    dst_unique, group = torch.unique(_flat_rows(dst_safe, N)[pair], return_inverse=True)

    def summed(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(B * N, *x.shape[2:])
        return rows[dst_unique].index_add(0, group, rows[src_rows])

    def averaged(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        rows = x.reshape(B * N, *x.shape[2:]).to(acc_dtype)
        w_rows = weight.reshape(B * N).to(acc_dtype)
        shape = (-1, *([1] * (x.ndim - 2)))
        num = (rows[dst_unique] * w_rows[dst_unique].view(shape)).index_add_(
            0, group, rows[src_rows] * w_rows[src_rows].view(shape)
        )
        den = w_rows[dst_unique].index_add(0, group, w_rows[src_rows])
        return (num / den.clamp_min(torch.finfo(torch.float32).tiny).view(shape)).to(x.dtype)

    size_w = state.size * state.mask
    updates: dict[str, torch.Tensor] = {
        "tokens": averaged(state.tokens, w),
        "size": summed(size_w),
        "positions": averaged(state.positions, size_w),
    }
    per_token_updates: dict[str, torch.Tensor] = {}
    for name, value in state.per_token.items():
        how = reduce.get(name, "mean")
        if not value.is_floating_point() or how == "dst":
            continue
        per_token_updates[name] = summed(value) if how == "sum" else averaged(value, w)

    origin = torch.where(state.origin >= 0, target.gather(1, state.origin.clamp(min=0)), state.origin)
    index, keep_valid = pack(state.mask & ~is_src)
    if order is not None:
        if order.shape != (B, N):
            raise StateError(f"merge: order must be a sort key [B={B}, N={N}], got {list(order.shape)}")
        if order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
            raise StateError(f"merge: order must be an integer sort key [B={B}, N={N}], got dtype {order.dtype}")
        keys = order.gather(1, index).masked_fill(~keep_valid, torch.iinfo(torch.int64).max)
        index = index.gather(1, torch.sort(keys, dim=1, stable=True).indices)
    kept = _keep(dataclasses.replace(state, origin=origin), index, keep_valid)
    # Where each destination landed among the survivors (flat row of the output).
    K = index.shape[1]
    slot = torch.full((B * N,), -1, dtype=torch.int64, device=device)
    slot[_flat_rows(index, N)[keep_valid.reshape(-1)]] = torch.arange(B * K, device=device)[keep_valid.reshape(-1)]
    out_rows = slot[dst_unique]

    def put(target_tensor: torch.Tensor, values: torch.Tensor) -> None:
        # ``keep`` returned freshly gathered tensors: writing into them is safe.
        target_tensor.view(B * K, *target_tensor.shape[2:]).index_copy_(0, out_rows, values)

    put(kept.tokens, updates["tokens"])
    put(kept.size, updates["size"])
    put(kept.positions, updates["positions"])
    for name, values in per_token_updates.items():
        put(kept.per_token[name], values)
    return kept


def pack(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of ``select`` ``[B, N]``, in order, packed to the front.

    Returns ``(index [B, K], valid [B, K])`` with ``K`` the largest count;
    padding indices are 0.  The ragged-batch form of ``nonzero`` that every op
    here takes (e.g. ``keep(state, *pack(chosen))``).
    """
    if not isinstance(select, torch.Tensor) or select.ndim != 2 or select.dtype != torch.bool:
        raise StateError(f"pack: expected a bool tensor [B, N], got {_describe(select)}")
    order = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices
    valid = select.gather(1, order)
    K = int(valid.sum(1).max()) if select.shape[0] else 0
    return order[:, :K].masked_fill(~valid[:, :K], 0), valid[:, :K]


def unmerge(state: TokenState, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast per-token values back to the original patches through ``origin``.

    ``tokens`` defaults to ``state.tokens``; any ``[B, N, ...]`` tensor works
    (scores, attention).  Returns ``(values [B, N0, ...], present [B, N0])``;
    dropped patches get zeros and ``present = False``.
    """
    values = state.tokens if tokens is None else tokens
    if not isinstance(values, torch.Tensor) or values.shape[:2] != state.mask.shape:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise StateError(f"unmerge: expected values [B={state.B}, N={state.N}, ...], got {got}")
    _check_origin(state, "unmerge")
    present = state.origin >= 0
    if state.N == 0:  # every patch was dropped: nothing to gather from
        return values.new_zeros(*present.shape, *values.shape[2:]), present
    return _gather_rows(values, state.origin.clamp(min=0), present), present


def patches_to_tokens(state: TokenState, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Pool per-patch ``values`` ``[B, N0]`` into the current tokens through ``origin``.

    The inverse of :func:`arrcoc.ops.unmerge` for scores: token ``n`` gets the
    sum (``reduce="sum"``) or the mean (``"mean"``) of the values of the
    original patches that now live in it; dropped patches (``origin = -1``)
    count for nothing.  Returns float32 ``[B, N]``; padded slots are ``-inf``.
    """
    if not isinstance(values, torch.Tensor) or values.shape != state.origin.shape:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise StateError(f"patches_to_tokens: expected values [B={state.B}, N0={state.origin.shape[1]}], got {got}")
    if reduce not in ("sum", "mean"):
        raise StateError(f"patches_to_tokens: reduce must be 'sum' or 'mean', got {reduce!r}")
    _check_origin(state, "patches_to_tokens")
    B, N = state.mask.shape
    present = state.origin >= 0
    sink = torch.where(present, state.origin, torch.full_like(state.origin, N))  # dropped -> dummy slot N
    v = values.float().masked_fill(~present, 0.0)
    total = torch.zeros(B, N + 1, device=values.device).scatter_add_(1, sink, v)[:, :N]
    if reduce == "mean":
        count = torch.zeros(B, N + 1, device=values.device).scatter_add_(1, sink, present.float())[:, :N]
        total = total / count.clamp_min(1.0)
    return total.masked_fill(~state.mask, float("-inf"))
