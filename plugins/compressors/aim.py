"""AIM (Zhong et al., ICCV 2025, "AIM: Adaptive Inference of Multi-Modal LLMs via
Token Merging and Pruning", arXiv 2412.03248).

Official: dragonlzm/AIM.

* Before the LLM (paper Sec. 3.2; ``llava/model/token_merge.py``
  ``bipartite_soft_matching_merge`` called from ``llava/model/llava_arch.py``):
  ToMe's bipartite soft matching applied iteratively to the visual
  features themselves — metric = the features, ``scatter_reduce(mode="mean")``
  (a plain mean, no size weighting), no class token — with ``r = n // 2``
  then ``r = n // 4`` (50% then 25% of the tokens kept), both ``r`` of the
  original ``n``.  The plugin ``aim_merge`` takes the rounds as a list of
  ``keep`` budgets, each a ratio of the previous round's nominal count
  (``[0.5, 0.5]`` = the official 50% then 25%, merging exactly ``n // 2``
  then ``n // 4``: :func:`aim_round_merges`), and reuses
  :func:`arrcoc.ops.bipartite_merges` and :func:`arrcoc.ops.merge`
  (``weights = 1`` for the official mean).
* In the LLM (paper Sec. 3.3; Qwen2 ``modeling_qwen2.py``: ``get_importance``
  and the ``retain_rate`` schedule of ``Qwen2Model.forward``):
  :func:`aim_importance` (PageRank over a layer's attention logits) and
  :func:`aim_retention_schedule`, plus :func:`aim_prune_keep` (which tokens
  stay at a layer, text protected); the seed's layer-adaptive weighting
  :func:`aim_layer_adaptive_importance` is an option.

Token order: the official merge returns ``cat([unmerged A in similarity
order, all B])``; ``order: official`` (default) reproduces that order, which
also decides the A/B split of the next round; ``order: spatial`` keeps the
survivors in their original order.

The seed's pair merge ``(s * t_i + (1 - s) * t_j) / 2`` halves the merged
vector's norm (a weighted *average* divided by 2 again); it is offered as
``weighting: seed`` (:func:`seed_pair_merge`) but the default is the
official plain mean.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from arrcoc import ops
from arrcoc.budget import bisect_increasing, geometric_rounds, layer_mean, nearest
from arrcoc.errors import BudgetError, MissingInputError, StateError, record_warning
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Compressor, Keep, LLMCompressor, Params, budget_count
from arrcoc.state import TokenState


# ----------------------------------------------------------- before the LLM
def seed_pair_merge(t_i: torch.Tensor, t_j: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """The project seed's pair merge ``(s * t_i + (1 - s) * t_j) / 2``.

    A convex combination divided by 2 again: for ``t_i = t_j = t`` it returns
    ``t / 2`` — the norm is halved.  Offered for comparison only.
    """
    return (s * t_i + (1 - s) * t_j) / 2


def aim_round_merges(
    present: torch.Tensor, nominal: torch.Tensor, keep: float | int, budget: str = "official"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges ``r`` ``[B]`` of one round for a ``keep`` budget, and the nominal count after it.

    ``official`` (``llava/model/llava_arch.py``: ``r = orig_num // 2`` then
    ``r = orig_num // 4``, both of the *original* count): a ratio scales a
    nominal count that starts at the image's tokens, ``nominal_i =
    nominal_{i-1} * keep``, and the round merges ``floor(nominal_{i-1} -
    nominal_i)``; ``[0.5, 0.5]`` gives exactly ``N // 2`` then ``N // 4``
    (N = 15: 15 -> 8 -> 5).  ``present``: a ratio keeps ``floor(t * keep)``
    of the ``t`` tokens present (:func:`arrcoc.ops.resolve_keep`), which on
    odd counts asks for more than the ``t // 2`` merges bipartite matching
    can make (N = 15: 15 -> 8 -> 4).  A count keeps exactly that many (the
    nominal count becomes it) under both.

    Args:
        present: ``[B]`` tokens of each image before the round.
        nominal: ``[B]`` float64 nominal count before the round (the
            tokens present at the first round).
    """
    if budget not in ("official", "present"):
        raise StateError(f"aim_merge: budget must be 'official' or 'present', got {budget!r}")
    if isinstance(keep, int) or budget == "present":
        r = present - ops.resolve_keep(keep, present, where="aim_merge: keep")
        return r, (present - r).double()
    ops.resolve_keep(keep, present, where="aim_merge: keep")  # same validation
    after = nominal * keep
    return torch.floor(nominal - after).to(torch.int64), after


def aim_merge_round(
    state: TokenState, r: torch.Tensor | int, *, metric: torch.Tensor | None = None,
    weighting: str = "mean", order: str = "official",
) -> TokenState:
    """One AIM merge round of ``r`` merges per image (official ``bipartite_soft_matching_merge``).

    ``r`` (an int or ``[B]``, see :func:`aim_round_merges`) is capped at
    ``n // 2`` (bipartite matching merges at most half the tokens, as the
    official ``min(r, t // 2)``); a cap is recorded as a warning.
    ``weighting``: ``mean`` (official ``scatter_reduce(mode="mean")``),
    ``size`` (ToMe's size-weighted average) or ``seed`` (see
    :func:`seed_pair_merge`; several sources into one destination get weights
    ``s_i`` and ``1 - mean(s)`` before the halving, ``s`` = cosine clamped to [0, 1]).
    """
    r = torch.as_tensor(r, dtype=torch.int64, device=state.device).expand(state.B)
    metric = state.tokens if metric is None else metric
    merges, r_used, order_key = ops.bipartite_merges(metric, r, state.mask)  # ToMe matching, no class token
    if bool((r_used < r).any()):
        record_warning(
            f"aim_merge: a round needs {sorted(set(r.tolist()))} merges but bipartite matching merges at most "
            f"half the tokens; used {sorted(set(r_used.tolist()))}"
        )
    src, dst, valid = merges
    extra: dict[str, torch.Tensor] = {}
    if weighting == "mean":
        weights = torch.ones_like(state.size)
    elif weighting == "size":
        weights = None
    elif weighting == "seed":
        weights, extra[_SCALE] = _seed_weights(state, metric, src, dst, valid)
    else:
        raise StateError(f"aim_merge: weighting must be 'mean', 'size' or 'seed', got {weighting!r}")
    if order not in ("official", "spatial"):
        raise StateError(f"aim_merge: order must be 'official' or 'spatial', got {order!r}")
    if extra:
        state = state.with_per_token(**extra)
    merged = ops.merge(state, src.masked_fill(~valid, 0), dst.masked_fill(~valid, 0), valid, weights=weights,
                       reduce={_SCALE: "dst"} if _SCALE in extra else None,
                       order=order_key if order == "official" else None)
    if _SCALE in extra:  # the seed's "/ 2" on every destination that received a source
        scale = merged.per_token[_SCALE]
        merged = merged.replace(tokens=(merged.tokens.float() * scale[:, :, None]).to(merged.dtype),
                                per_token={k: v for k, v in merged.per_token.items() if k != _SCALE})
    return merged


_SCALE = "_aim_scale"


def _seed_weights(state: TokenState, metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and post-merge scale of the seed's pair merge ``(s t_i + (1 - s) t_j) / 2``.

    Source ``i`` weighs ``s_i`` (cosine with its destination, clamped to
    [0, 1]); a destination weighs ``1 - mean(s)`` of its sources (exactly the
    seed's formula for one source) and is scaled by 1/2 after the merge.
    """
    B, N = state.mask.shape
    # Cosine of each merging pair only (not the whole [N, N] matrix).
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    pair = (ops.gather_rows(unit, src.masked_fill(~valid, 0), valid) * ops.gather_rows(unit, dst.masked_fill(~valid, 0), valid))
    s = pair.sum(-1).clamp(0, 1)
    src_sink = torch.where(valid, src, torch.full_like(src, N))
    dst_sink = torch.where(valid, dst, torch.full_like(dst, N))
    total = torch.zeros(B, N + 1, device=state.device).scatter_add(1, dst_sink, s)[:, :N]
    hits = torch.zeros(B, N + 1, device=state.device).scatter_add(1, dst_sink, valid.float())[:, :N]
    weights = torch.ones(B, N + 1, device=state.device).scatter(1, src_sink, s)[:, :N]
    is_dst = hits > 0
    weights = torch.where(is_dst, 1 - total / hits.clamp_min(1), weights).clamp_min(1e-6)
    scale = torch.where(is_dst, 0.5, 1.0).to(torch.float32)
    return weights, scale


# -------------------------------------------------------------- in the LLM
def aim_importance(logits: torch.Tensor, mask: torch.Tensor | None = None, *, tau: float = 0.1,
                   iters: int = 5, damping: float = 0.0) -> torch.Tensor:
    """PageRank importance of every token of a layer (official ``get_importance``).

    ``M = softmax(logits / tau)`` over keys (``logits`` ``[B, heads, N, N]``:
    pre-softmax attention scores with the causal mask already added);
    ``dist = 1 / n``; ``iters`` times ``dist = (dist @ M) * (1 - d) + d / n``;
    heads combined by root-mean-square ``sqrt(mean_h dist^2)``.  ``mask``
    ``[B, N]`` marks real tokens of a ragged batch: padded keys are excluded
    and ``n`` is the real count, so a padded row equals its own run.
    Returns ``[B, N]`` fp32 (0 on padding).
    """
    if logits.ndim != 4 or logits.shape[-1] != logits.shape[-2]:
        raise StateError(f"aim_importance: expected logits [B, heads, N, N], got {list(logits.shape)}")
    B, H, N, _ = logits.shape
    x = logits.float() / tau
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=logits.device)
    x = x.masked_fill(~mask[:, None, None, :], float("-inf"))
    M = x.softmax(-1).nan_to_num(0.0)  # rows of padded queries are all -inf -> zeros
    n = mask.sum(1).clamp_min(1).float()[:, None, None, None]
    dist = mask[:, None, None, :].float().expand(B, H, 1, N) / n
    for _ in range(iters):
        dist = (dist @ M) * (1 - damping) + (damping / n) * mask[:, None, None, :]
    return dist.pow(2).mean(1).sqrt().view(B, N).masked_fill(~mask, 0.0)


#: Depth of the LLM the official schedule was written for (its Qwen2 decoder: 28 layers); budgets scale from it.
REFERENCE_LAYERS = 28


def aim_retention_schedule(num_layers: int = 28, start_layer: int = 14, step: float = 0.125) -> list[float]:
    """Share of the visual tokens kept after each layer (official ``retain_rate``).

    ``1.0`` before ``start_layer``, then ``max(0, 1 - (l - start_layer + 1) * step)``:
    for 28 layers, 1.0 up to layer 13, 0.875 at 14, ..., 0 from layer 21.
    """
    if num_layers < 1 or not 0 <= start_layer or step < 0:
        raise StateError(
            f"aim_retention_schedule: expected num_layers >= 1, start_layer >= 0, step >= 0, got "
            f"{num_layers}, {start_layer}, {step}"
        )
    return [1.0 if l < start_layer else max(0.0, 1.0 - (l - start_layer + 1) * step) for l in range(num_layers)]


def aim_prune_keep(importance: torch.Tensor, visual: torch.Tensor, alive: torch.Tensor, protected: torch.Tensor,
                   rate: float, n_visual: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens alive after a pruning layer (official ``Qwen2Model.forward``), ``[B, L]`` bool.

    Protected (system prompt + question) tokens always stay; of the alive
    visual tokens the top ``int(n_visual * rate)`` by ``importance`` stay,
    ``n_visual`` being the *original* visual count (default: ``visual.sum``),
    as the official ``keep_num = (L - protected) * rate``.
    """
    n_vis = visual.sum(1) if n_visual is None else n_visual
    k = torch.floor(n_vis.double() * rate + 1e-9).to(torch.int64)
    cand = visual & alive & ~protected
    k = torch.minimum(k, cand.sum(1))
    index, valid = ops.topk_per_row(importance.float(), k, cand, order="position")
    B, L = alive.shape
    sink = torch.where(valid, index, torch.full_like(index, L))
    kept = torch.zeros(B, L + 1, dtype=torch.bool, device=alive.device).scatter(1, sink, True)[:, :L]
    return (protected & alive) | kept | (alive & ~visual & ~protected)


def aim_layer_adaptive_importance(text_importance: torch.Tensor, visual_importance: torch.Tensor,
                                  layer: int, num_layers: int) -> torch.Tensor:
    """The seed's variant: ``alpha * text + (1 - alpha) * visual`` with ``alpha = layer / num_layers``.

    ``text_importance`` would be e.g. the attention the question tokens give
    each visual token, ``visual_importance`` :func:`aim_importance`; both
    ``[B, N]``.  Not in the official code.
    """
    if not 0 <= layer <= num_layers or num_layers < 1:
        raise StateError(f"aim_layer_adaptive_importance: need 0 <= layer <= num_layers, got {layer}, {num_layers}")
    alpha = layer / num_layers
    return alpha * text_importance.float() + (1 - alpha) * visual_importance.float()


# ------------------------------------------------------------------- plugin
class AIMMergeParams(Params):
    keep: list[Keep] = Field(
        default_factory=lambda: [0.5, 0.5],
        description="Merge rounds, each a budget relative to the previous round's ([0.5, 0.5] = official "
        "50% then 25%, r = N // 2 then N // 4); a count keeps exactly that many; a single budget is one round.",
    )
    budget: Literal["official", "present"] = Field(
        "official",
        description="Ratios: official = each round merges floor(nominal - nominal * keep) with the nominal count "
        "starting at the image's tokens (llava_arch.py's r = N // 2 then N // 4: 15 -> 8 -> 5); present = each "
        "round keeps floor(t * keep) of the t tokens present (15 -> 8 -> 4, capped at t // 2 merges).",
    )
    weighting: Literal["mean", "size", "seed"] = Field(
        "mean", description="mean: official plain mean; size: size-weighted (ToMe merge_wavg); "
        "seed: (s t_i + (1 - s) t_j) / 2, which halves the norm.",
    )
    metric: Literal["tokens", "keys"] = Field("tokens", description="Match on the features (official) or the keys.")
    order: Literal["official", "spatial"] = Field(
        "official", description="Output order: official [unmerged A by similarity, all B]; spatial: original order."
    )

    @field_validator("keep", mode="before")
    @classmethod
    def _listify(cls, value):
        return value if isinstance(value, list) else [value]

    @field_validator("keep")
    @classmethod
    def _non_empty(cls, value):
        if not value:
            raise ValueError("give at least one round, e.g. [0.5, 0.5]")
        return value


class AIMMerge(Compressor):
    """AIM before the LLM: iterative bipartite merging of the features (Zhong et al. 2025)."""

    name = "aim_merge"
    stage = "projector"  # in a VLM: after the projector, where the query embeddings live
    Params = AIMMergeParams

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """Rounds as counts, geometric from ``n`` to the target: as many rounds as the pipeline's (official 2),
        more when a round would have to merge more than half of its tokens (bipartite matching cannot)."""
        n, t = context.tokens, budget_count(target, context.tokens)
        rounds = max(len(cls.validate_params(params).keep), 1)
        # Bipartite matching merges at most half of a round's tokens: each round keeps at least ceil(c / 2).
        return {**params, "keep": geometric_rounds(n, t, rounds, lambda c: -(-c // 2))}

    def requirements(self) -> frozenset[str]:
        return frozenset({"keys"}) if self.params.metric == "keys" else frozenset()

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        nominal = state.counts.double()
        for keep in p.keep:
            metric = None
            if p.metric == "keys":
                metric = state.per_token.get("keys")
                if metric is None:
                    raise MissingInputError(
                        "aim_merge: metric 'keys' needs per_token['keys'] (the timm_vit encoder provides them at "
                        "its `attention_layer`), or set `metric: tokens` (official)"
                    )
            if isinstance(keep, int) and bool((state.counts < keep).any()):
                raise BudgetError(
                    f"aim_merge: keep={keep} tokens, but an image has only {int(state.counts.min())} at this round"
                )
            r, nominal = aim_round_merges(state.counts, nominal, keep, p.budget)
            state = aim_merge_round(state, r, metric=metric, weighting=p.weighting, order=p.order)
        return state


class AIMPruneParams(Params):
    start_layer: int = Field(14, ge=0, description="First layer whose attention prunes (official 14 of 28; 0: layer "
                             "0's attention prunes the input of layer 1).")
    step: float = Field(0.125, gt=0, le=1, description="Share of the visual tokens dropped per layer from start_layer.")
    tau: float = Field(0.1, gt=0, description="PageRank temperature: softmax(logits / tau).")
    iters: int = Field(5, ge=1, description="PageRank iterations.")
    mode: Literal["mask", "remove"] = Field(
        "mask", description="mask: pruned tokens stay, masked as keys (official); remove: they leave (saves time).")
    positions: Literal["original", "compact"] = Field("original", description="Position ids of kept tokens.")


class AIMPrune(LLMCompressor):
    """AIM in the LLM: PageRank importance of each layer's attention, linear retention schedule (Zhong et al. 2025)."""

    name = "aim_prune"
    Params = AIMPruneParams
    needs = frozenset({"attn_logits"})

    def schedule(self, num_layers: int) -> list[float]:
        p = self.params
        return aim_retention_schedule(num_layers, p.start_layer, p.step)

    @classmethod
    def _mean(cls, n: int, num_layers: int, start: int, step: float) -> float:
        """Mean over the layers of the visual keys each sees: ``n`` at layer 0, then the official
        ``int(n * rate)`` after each earlier layer."""
        rates = aim_retention_schedule(num_layers, start, step)[: num_layers - 1]
        return layer_mean(n, num_layers, ((l + 1, min(n, math.floor(n * r + 1e-9))) for l, r in enumerate(rates)))

    @classmethod
    def _starts(cls, params: dict, context: BudgetContext) -> range:
        """Start layers a budget may use, latest first: the pipeline's, scaled from the official 28-layer LLM
        (14 of 28 -> the middle), at most ``L - 2`` (the last layer's output is never pruned), down to 0."""
        if context.layers < 2:
            raise BudgetError(f"aim_prune: an LLM of {context.layers} layer(s) has no layer to prune at")
        scaled = round(cls.validate_params(params).start_layer * context.layers / REFERENCE_LAYERS)
        return range(min(scaled, context.layers - 2), -1, -1)

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        cls._starts(params, context)
        return cls._mean(context.tokens, context.layers, 0, 1.0), float(context.tokens)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """The latest start layer whose linear schedule can reach ``target`` (mean over layers of the visual
        tokens seen; masked tokens are not seen), and the ``step`` that reaches it (bisection).  A target of
        every token keeps the schedule at 1.0 in effect: a step so small that ``int(n * (1 - step))`` is ``n``
        (a step of 0 would prune at no layer, which the integration refuses)."""
        n, L = context.tokens, context.layers
        if target >= n:
            return {**params, "start_layer": L - 2, "step": 1e-9 / max(n, 1) / 2}
        for start in cls._starts(params, context):
            if cls._mean(n, L, start, 1.0) > target:
                continue
            def mean(step: float, start: int = start) -> float:
                return cls._mean(n, L, start, step)

            # The mean falls as the step grows: bisect its negation.
            bracket = bisect_increasing(lambda step: -mean(step), -target, 1e-9, 1.0)
            return {**params, "start_layer": start, "step": nearest(mean, target, bracket)}
        raise BudgetError(f"aim_prune: a mean of {target:.1f} visual tokens over {L} layers from {n} is out of reach")

    def llm_layers(self, num_layers: int) -> tuple[int, ...]:
        # Layer l's attention ranks the tokens kept after it (retain_rate[l]): act at the input of l + 1.
        rates = [1.0, *self.schedule(num_layers)]
        return tuple(l + 1 for l in range(num_layers - 1) if rates[l + 1] < rates[l])

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        llm = self.llm_context(state)
        logits = llm.require("attn_logits", "aim_prune")
        rate = self.schedule(llm.num_layers)[llm.layer - 1]
        importance = aim_importance(logits, llm.require("sequence_mask", "aim_prune"), tau=p.tau, iters=p.iters)
        visual = importance.gather(1, llm.require("visual_columns", "aim_prune"))
        n0 = llm.input_visual_counts.to(state.device)
        # Official keep_num: int(original visual count * rate), of the visual tokens still alive.
        k = torch.minimum(torch.floor(n0.double() * rate + 1e-9).to(torch.int64), state.counts)
        index, valid = ops.topk_per_row(visual, k, state.mask, order="position")
        return ops.keep(state, index, valid)


@hookimpl
def arrcoc_register_plugins(register):
    register(AIMMerge)
    register(AIMPrune)
