"""ToMe: Token Merging (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster").

Faithful to facebookresearch/ToMe:

* matching is ``tome.merge.bipartite_soft_matching`` (paper Sec. 3, "Bipartite
  Soft Matching"): alternate A/B split, cosine of the metric, each A token's
  best B partner, the ``r`` best edges merge; a class token is protected and
  ``r`` is clamped to ``(t - protected) // 2`` (recorded as a warning);
* merging is ``tome.merge.merge_wavg``: size-weighted average, sizes add up;
* inside a ViT (``tome.patch.timm.ToMeBlock``) the merge runs between
  attention and MLP of each block, with the metric = keys averaged over heads
  and proportional attention ``softmax(qk^T / sqrt(d) + log s)`` (Eq. 1) —
  the ``timm_vit`` encoder provides both when this compressor is its
  ``in_blocks`` stage;
* the per-layer ``r`` follows ``tome.utils.parse_r``: an int (constant), a
  list (one ``r`` per layer, padded with 0), or ``r`` with an ``inflection``
  (``-1`` = the paper's decreasing schedule).

Token order: the official merge returns ``[unmerged A, all B]`` (with a
class token the unmerged A tokens in index order, without one in decreasing
order of their best edge).  The next matching splits A/B by alternating over
*that* order, so the order changes which tokens merge in later layers: the
default ``order: official`` reproduces it (a permutation through
:func:`arrcoc.ops.keep` after :func:`arrcoc.ops.merge`), so that a ViT with
ToMe in every block gives the official numbers.  ``order: spatial`` keeps the
survivors in their original order instead (:func:`arrcoc.ops.merge`'s own
order) — the same tokens after one step, a different matching afterwards.
``positions`` and ``origin`` locate every token in either order.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from arrcoc import ops
from arrcoc.errors import BudgetError, MissingInputError, ParamsError, record_warning
from arrcoc.hookspecs import hookimpl
from arrcoc.budget import geometric_rounds
from arrcoc.plugin import BudgetContext, Compressor, Params, budget_count
from arrcoc.state import TokenState


def parse_r(num_layers: int, r: int | list[int], inflection: float = 0.0) -> list[int]:
    """``tome.utils.parse_r``: the number of merges for each of ``num_layers`` layers."""
    if isinstance(r, list):
        return list(r) + [0] * max(0, num_layers - len(r))
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(low + step * i) for i in range(num_layers)]


def tome_merge(
    state: TokenState,
    r: int,
    *,
    metric: torch.Tensor,
    class_token: bool,
    size_weighted: bool = True,
    order: str = "official",
) -> tuple[TokenState, torch.Tensor]:
    """One ToMe step: bipartite soft matching on ``metric``, then (size-weighted) merging.

    ``order="official"`` lays the survivors out as ``tome.merge``'s
    ``cat([unm, dst])``: unmerged A tokens (index order with a class token,
    edge order without), then every B token; ``"spatial"`` keeps the original
    order.  An image with nothing to merge keeps its order (official
    ``do_nothing``).  Returns the merged state and the ``r`` used per image.
    """
    if order not in ("official", "spatial"):
        raise ParamsError(f"tome_merge: order must be 'official' or 'spatial', got {order!r}")
    r_req = torch.as_tensor(r, device=state.device, dtype=torch.int64).expand(state.B)
    negative = r < 0 if isinstance(r, int) else bool((r_req < 0).any())  # an int: no device sync
    if negative:
        raise BudgetError(f"tome_merge: r must be >= 0, got {r_req.tolist()}")
    (src, dst, valid), r_used, key = ops.bipartite_merges(metric, r_req, state.mask, class_token=class_token)
    if src.shape[1] == 0:  # nothing to merge in any image
        return state, r_used
    weights = None if size_weighted else torch.ones_like(state.size)
    key = key if order == "official" else None
    return ops.merge(state, src, dst, valid, weights=weights, order=key), r_used


class ToMeParams(Params):
    r: int | list[int] = Field(
        8,
        description="Tokens merged per step: an int (every layer / once), or a list (one per layer "
        "in a ViT; successive rounds when used after the encoder).",
    )
    inflection: float = Field(
        0.0, ge=-1.0, le=1.0,
        description="Schedule trend over layers (parse_r): 0 constant, -1 the paper's decreasing schedule.",
    )
    metric: Literal["keys", "tokens"] = Field(
        "keys", description="What to match on: the attention keys (official) or the tokens themselves."
    )
    size_weighted: bool = Field(True, description="merge_wavg (official); false = plain mean of the merged tokens.")
    class_token: bool | None = Field(
        None, description="Match with the official class-token layout; default: whether the state has a class token."
    )
    order: Literal["official", "spatial"] = Field(
        "official",
        description="Token order after a merge: 'official' = tome.merge's [unmerged A, all B] (later matchings "
        "depend on it); 'spatial' = survivors in their original order.",
    )

    @model_validator(mode="after")
    def _check_r(self) -> "ToMeParams":
        values = self.r if isinstance(self.r, list) else [self.r]
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0, got {self.r}")
        if isinstance(self.r, list) and self.inflection != 0.0:
            raise ValueError("inflection applies to an int r, not a per-layer list")
        return self


class ToMe(Compressor):
    """Token Merging: bipartite soft matching + size-weighted merging (Bolya et al. 2023)."""

    name = "tome"
    Params = ToMeParams

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        return 1.0, float(context.tokens)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """After the encoder (``compress:``): ``r`` as a list of successive rounds that merge ``n`` down to the
        target, geometric, one round per encoder block that produced the features (ToMe merges once in every
        block; 4 blocks: 256 -> 215 -> 181 -> 152 -> 128), more rounds when one would have to merge more than
        half of its tokens (bipartite matching cannot)."""
        t = budget_count(target, context.tokens)
        counts = geometric_rounds(context.tokens, t, max(context.encoder_layers, 1), lambda c: -(-c // 2))
        before = [context.tokens, *counts[:-1]]
        return {**{k: v for k, v in params.items() if k != "inflection"},
                "r": [b - c for b, c in zip(before, counts)]}

    def requirements(self) -> frozenset[str]:
        return frozenset({"keys"}) if self.params.metric == "keys" else frozenset()

    def _metric(self, state: TokenState) -> torch.Tensor:
        if self.params.metric == "tokens":
            return state.tokens
        # Inside an encoder block, the block's own keys; after the encoder, its exposed keys.
        keys = state.per_token.get("block_keys", state.per_token.get("keys"))
        if keys is None:
            raise MissingInputError(
                "tome: metric 'keys' needs per_token['keys'] (the timm_vit encoder provides them), "
                "or set `metric: tokens`"
            )
        return keys

    def _step(self, state: TokenState, r: int) -> TokenState:
        if r <= 0:
            return state
        class_token = self.params.class_token
        if class_token is None:
            class_token = state.cls is not None
        merged, r_used = tome_merge(
            state, r, metric=self._metric(state), class_token=class_token,
            size_weighted=self.params.size_weighted, order=self.params.order,
        )
        if bool((r_used < r).any()):
            record_warning(
                f"tome: r={r} clamped to {sorted(set(r_used.tolist()))} (at most half the tokens can merge), as ToMe does"
            )
        return merged

    def __call__(self, state: TokenState) -> TokenState:
        rounds = self.params.r if isinstance(self.params.r, list) else [self.params.r]
        for r in rounds:
            state = self._step(state, r)
        return state

    def in_block(self, state: TokenState, layer: int, num_layers: int) -> TokenState:
        r = parse_r(num_layers, self.params.r, self.params.inflection)
        return self._step(state, r[layer] if layer < len(r) else 0)


@hookimpl
def arrcoc_register_plugins(register):
    register(ToMe)
