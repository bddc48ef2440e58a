"""Built-in scorers: ``query``, ``saliency``, ``information`` and their combination ``relevance``.

Per-patch values are pooled into tokens with :func:`arrcoc.ops.patches_to_tokens`.
Every scorer writes ``per_token["scores:<name>"]`` (float32 ``[B, N]``);
padded (masked) slots hold ``-inf`` so that they never win a ranking.
"""

from __future__ import annotations

import torch

from arrcoc.state import TokenState


def masked_scores(state: TokenState, scores: torch.Tensor) -> torch.Tensor:
    """float32 scores with padded slots set to ``-inf``."""
    return scores.float().masked_fill(~state.mask, float("-inf"))
