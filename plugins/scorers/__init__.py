"""Built-in scorers: ``query``, ``saliency``, ``information`` and their combination ``relevance``.

Every scorer writes ``per_token["scores:<name>"]`` (float32 ``[B, N]``);
padded (masked) slots hold ``-inf`` so that they never win a ranking.
"""

from __future__ import annotations

import torch

from arrcoc.errors import StateError
from arrcoc.state import TokenState


def patches_to_tokens(state: TokenState, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Pool per-patch ``values`` ``[B, N0]`` into the current tokens through ``origin``.

    The inverse of :func:`arrcoc.ops.unmerge` for scores: token ``n`` gets the
    sum (``reduce="sum"``) or the mean (``"mean"``) of the values of the
    original patches that now live in it; dropped patches (``origin = -1``)
    count for nothing.  Returns float32 ``[B, N]``; padded slots are ``-inf``.
    """
    if values.shape != state.origin.shape:
        raise StateError(
            f"patches_to_tokens: expected values [B={state.B}, N0={state.origin.shape[1]}], got {list(values.shape)}"
        )
    if reduce not in ("sum", "mean"):
        raise StateError(f"patches_to_tokens: reduce must be 'sum' or 'mean', got {reduce!r}")
    B, N = state.mask.shape
    present = state.origin >= 0
    sink = torch.where(present, state.origin, torch.full_like(state.origin, N))  # dropped -> dummy slot N
    v = values.float().masked_fill(~present, 0.0)
    total = torch.zeros(B, N + 1, device=values.device).scatter_add_(1, sink, v)[:, :N]
    if reduce == "mean":
        count = torch.zeros(B, N + 1, device=values.device).scatter_add_(1, sink, present.float())[:, :N]
        total = total / count.clamp_min(1.0)
    return total.masked_fill(~state.mask, float("-inf"))


def masked_scores(state: TokenState, scores: torch.Tensor) -> torch.Tensor:
    """float32 scores with padded slots set to ``-inf``."""
    return scores.float().masked_fill(~state.mask, float("-inf"))
