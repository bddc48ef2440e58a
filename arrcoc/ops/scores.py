"""Scores of tokens: cosines, the cosine to *rank* by, similarity to a query, checks and normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError, StateError
from ._checks import check_mask, checks_enabled, describe

__all__ = ["cosine", "similarity_key", "query_similarity", "check_scores", "normalize_scores"]


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


#: :func:`similarity_key` pads the rows of both operands to a multiple of this, so that every product runs on
#: whole tiles of the matrix-multiply kernel (an entry then rounds the same whatever the padded length).
SIMILARITY_TILE = 32

#: :func:`similarity_key` counts cosines within this of 1 as exactly 1 (a vector with itself or a duplicate:
#: float32 rounds ``x . x`` of a unit vector to a few ulps around 1, depending on the vector).
SIMILARITY_ONE_BAND = 2.0 ** -16


def similarity_key(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise cosine ``[..., N, C] x [..., M, C] -> [..., N, M]`` to *rank* by (float32, or the
    inputs' dtype if wider), with equal cosines giving equal keys in any batch.

    Two things used to order mathematically equal cosines (duplicate tokens,
    two uniform regions, orthogonal vectors) by rounding noise rather than by
    index, so that a ragged batch and the image alone could rank differently:

    * a matrix product rounds an entry differently with the matrix's shape
      (a row padded to the batch's longest image vs the image alone): here
      both operands are zero-padded to a multiple of :data:`SIMILARITY_TILE`
      rows, so the kernel runs on whole tiles and an entry's value depends on
      its two vectors only (checked with the CPU BLAS; a GPU library may pick
      another kernel for another size);
    * a unit vector's cosine with itself rounds to a few ulps around 1,
      differently for different vectors: cosines within
      :data:`SIMILARITY_ONE_BAND` of 1 are set to exactly 1 (so near-duplicates
      above ``1 - 2^-16`` tie too, and are ranked by index).

    Duplicates then get bit-equal keys, so the stable sorts, :func:`topk` and
    first-index ``max`` / ``argmax`` of arrcoc break their ties by index.
    (Until issue 17 this computed float64 cosines: ~2x the time of a float32
    product on CPUs, far more on GPUs.)
    """
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-1]:
        raise StateError(
            f"similarity_key: expected [..., N, C] and [..., M, C] with one C, got {list(a.shape)} and {list(b.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    N, M = a.shape[-2], b.shape[-2]
    x, y = a.to(dtype), b.to(dtype)
    if N % SIMILARITY_TILE:
        x = F.pad(x, (0, 0, 0, -N % SIMILARITY_TILE))
    if M % SIMILARITY_TILE:
        y = F.pad(y, (0, 0, 0, -M % SIMILARITY_TILE))
    # Divide the [N, M] products by the norms rather than normalising the [N, C] inputs (O(NM), not O(NC)).
    norms = x.norm(dim=-1).clamp_min(eps)[..., :N, None] * y.norm(dim=-1).clamp_min(eps)[..., None, :M]
    key = (x @ y.transpose(-1, -2))[..., :N, :M] / norms
    return key.masked_fill_(key >= 1.0 - SIMILARITY_ONE_BAND, 1.0)


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
        check_mask(query_mask, tuple(query.shape[:2]), "query_similarity", "query_mask", "[B, T]")
    sim = similarity_key(tokens, query, eps=1e-6).float()  # [B, N, T]; equal cosines stay equal in any batch
    if query_mask is None:
        return sim.amax(-1) if reduce == "max" else sim.mean(-1)
    real = query_mask[:, None, :]
    if reduce == "max":
        return sim.masked_fill(~real, float("-inf")).amax(-1)
    return (sim * real).sum(-1) / real.sum(-1).clamp_min(1)


def check_scores(scores: torch.Tensor, mask: torch.Tensor, where: str) -> torch.Tensor:
    """``scores`` as float32 ``[B, N]`` after checking its shape and that every real token's score is finite.

    For scores a user or another plugin put in ``per_token``: the finiteness
    check (one device sync) always runs, it is the input's check."""
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
    (population std); ``none``: unchanged.  With :func:`arrcoc.ops.checking`
    on, NaN scores (and, for ``minmax`` / ``zscore``, infinite ones) of real
    tokens are a :class:`~arrcoc.errors.StateError`; padded entries are not
    looked at.

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
            f"normalize_scores: scores must be [B, N]={list(mask.shape)} like the mask, got {describe(scores)}"
        )
    s = scores.float()
    if how == "none" or s.shape[1] == 0:  # nothing to normalise (no token slot at all)
        return s.masked_fill(~mask, 0.0)
    if checks_enabled():
        real = s[mask]
        if bool(torch.isnan(real).any()) or (how != "rank" and not bool(torch.isfinite(real).all())):
            raise StateError(
                f"normalize_scores: scores of real tokens contain NaN{'' if how == 'rank' else ' or inf'} (how={how!r})"
            )
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
