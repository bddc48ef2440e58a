"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2").

Official: pkunlp-icler/FastV, ``fastv_forward`` in
``src/FastV/llava-hf/.../modeling_llama.py`` (paper Sec. 4, "FastV"): at
decoder layer ``K`` (default 2), every image token is scored by the
attention it receives from the **last** token of the prompt, averaged over
heads, in the attention map of layer ``K - 1``; the top
``round(N * (1 - R))`` image tokens are kept (``R`` = 0.5 by default), in
their original order and with their original position ids; prefill only.

Here:

* :func:`fastv_scores` and :func:`fastv_select` are the algorithm on tensors
  (batched, masked; the official code is batch 1);
* the ``fastv`` plugin (``stage = "llm"``) applies them to a state that
  carries ``per_token["attn_from_last"]`` ``[B, N]`` (or ``[B, N, heads]``):
  the head-mean (or per-head) attention each visual token receives from the
  last token at layer ``K - 1``.  The Hugging Face integration fills that
  field inside the decoder; tests and users can fill it themselves.

Budget: ``R = 0.5`` is ``keep: 0.5``.  arrcoc's ratio is ``floor(N * keep)``;
``rounding: round`` gives the official ``round(N * (1 - R))`` (Python's
round-half-to-even, as the official code's ``round``).  They differ only
when ``N * keep`` ends in .5.  Positions: kept tokens keep their
``positions`` (and a model integration their position ids), as officially.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from arrcoc import ops
from arrcoc.budget import layer_mean
from arrcoc.errors import BudgetError, MissingInputError, StateError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Keep, LLMCompressor, Params, budget_count
from arrcoc.state import TokenState

FIELD = "attn_from_last"


def fastv_scores(attn: torch.Tensor, visual: slice | torch.Tensor | None = None) -> torch.Tensor:
    """Attention each visual token receives from the last query row, head-mean.

    ``attn`` is a decoder layer's attention ``[B, heads, L, L]`` (softmaxed);
    ``visual`` selects the visual columns (a slice or an index ``[Nv]``;
    default all).  Official: ``last_layer_attention.mean(1)[0, -1,
    image_start:image_start + image_len]``.  Returns ``[B, Nv]`` (fp32).
    """
    if attn.ndim != 4:
        raise StateError(f"fastv_scores: expected attention [B, heads, L, L], got shape {list(attn.shape)}")
    row = attn[:, :, -1, :].float().mean(1)
    return row if visual is None else row[:, visual]


def fastv_keep_count(n: torch.Tensor, keep: float | int, rounding: str = "floor") -> torch.Tensor:
    """Tokens kept per image: ``resolve_keep`` (floor), or the official ``round(n * keep)``."""
    if rounding == "round" and isinstance(keep, float):
        ops.resolve_keep(keep, n, where="fastv: keep")  # same validation
        k = torch.round(n.double() * keep).to(torch.int64)  # half to even, like Python's round
        return k.clamp(min=1).minimum(n)
    return ops.resolve_keep(keep, n, where="fastv: keep")


def fastv_select(scores: torch.Tensor, k: torch.Tensor | int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` visual tokens by ``scores`` ``[B, Nv]``, returned in original order.

    Official: ``topk(...).indices`` then ``.sort()`` (ties here go to the lower
    index).  Returns ``(index [B, K], valid [B, K])``.
    """
    return ops.topk_per_row(scores, k, mask, order="position")


class FastVParams(Params):
    layer: int = Field(2, ge=1, description="Decoder layer K at which tokens are dropped (scores from layer K-1).")
    keep: Keep = Field(0.5, description="Visual tokens kept: ratio (1 - R; R=0.5 -> 0.5) or count.")
    rounding: Literal["floor", "round"] = Field(
        "floor", description="Ratio -> count: arrcoc's floor, or the official round(N * (1 - R))."
    )
    positions: Literal["original", "compact"] = Field(
        "original", description="Position ids of kept tokens: original (official) or renumbered contiguously."
    )


class FastV(LLMCompressor):
    """FastV: keep the visual tokens the last token attends to most at layer K-1 (Chen et al. 2024)."""

    name = "fastv"
    Params = FastVParams
    needs = frozenset({FIELD})

    @classmethod
    def _layers(cls, params: dict, context: BudgetContext) -> range:
        """Layers ``K`` a budget may use: the pipeline's ``K`` first, then earlier ones (``K`` >= 1)."""
        if context.layers < 2:
            raise BudgetError(f"fastv: an LLM of {context.layers} layer(s) has no layer K >= 1 to prune at")
        return range(min(cls.validate_params(params).layer, context.layers - 1), 0, -1)

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        n, L = context.tokens, context.layers
        K = min(cls._layers(params, context))  # the earliest layer reaches the fewest
        return layer_mean(n, L, [(K, min(1, n))]), float(n)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """Layers ``0 .. K-1`` see all ``n`` visual tokens and layers ``K .. L-1`` see ``keep``: the mean
        (:func:`~arrcoc.budget.layer_mean`) is ``(K n + (L - K) keep) / L``, solved here for ``keep``.  ``K`` is the
        pipeline's (official 2) when that mean can reach the target, else the latest earlier layer that can;
        ``keep`` is then the nearest count."""
        n, L = context.tokens, context.layers
        for K in cls._layers(params, context):
            keep = (L * target - K * n) / (L - K)
            if keep >= 0.5 or n == 0:
                return {**params, "layer": K, "keep": budget_count(keep, n)}
        raise BudgetError(
            f"fastv: a mean of {target:.1f} visual tokens over {L} layers from {n} is out of reach: layers before K "
            f"see all {n}, so the fewest is {(n + (L - 1)) / L:.1f} at K = 1"
        )

    def llm_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.params.layer,)

    def __call__(self, state: TokenState) -> TokenState:
        attn = state.per_token.get(FIELD)
        if attn is None:
            raise MissingInputError(
                f"fastv: needs per_token[{FIELD!r}] [B, N] (attention each visual token receives from the last "
                f"token at decoder layer {self.params.layer - 1}); the Hugging Face integration "
                "(arrcoc.integrations.hf) provides it inside the LLM, or add it with state.with_per_token(...)"
            )
        if attn.ndim == 3:  # per head -> head-mean, as officially
            attn = attn.float().mean(-1)
        if attn.ndim != 2:
            raise StateError(f"fastv: per_token[{FIELD!r}] must be [B, N] or [B, N, heads], got {list(attn.shape)}")
        k = fastv_keep_count(state.counts, self.params.keep, self.params.rounding)
        # keep_topk is keep(fastv_select(...)) on one path (the top-k and the gather without re-packing).
        return ops.keep_topk(state, attn, k, order="position")  # (keep_topk ranks any dtype as its float32 values)


@hookimpl
def arrcoc_register_plugins(register):
    register(FastV)
