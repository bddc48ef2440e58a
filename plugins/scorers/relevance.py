"""``relevance``: a weighted, normalised combination of other scorers.

Relevance realization (Vervaeke) combines *participatory* (``query``: does
the token match what was asked), *perspectival* (``saliency``: what the
vision model attends to) and *propositional* (``information``: how much a
token differs from its surroundings) knowing.  This scorer runs the named
scorers (or reuses ``per_token["scores:<name>"]`` already present, e.g. from
an earlier ``score:`` stage), normalises each per image over the real tokens,
and writes

    relevance = sum_i w_i * norm(score_i) / sum_i w_i

to ``per_token["relevance"]`` (plus every ``scores:<name>``).  The seed's
weights are ``{query: 0.7, saliency: 0.3}`` (its ``0.7 * cosine(token, text)
+ 0.3 * visual saliency``).

Normalisation (``normalize``), per image, over the real tokens only:

* ``rank`` (default): average rank (ties share the mean of their ranks)
  mapped to [0, 1] by ``(rank - 1) / (n - 1)`` (0.5 when ``n == 1``);
  robust to the very different scales of cosines and attention mass;
* ``zscore``: ``(s - mean) / std`` (population std; all-equal scores give 0).

Padded slots are ``-inf`` in every output, so they never win.  Weights may
be negative (a penalty) but must sum to a positive number; unknown scorer
names are errors with a did-you-mean; NaN or infinite scores of real tokens
are errors naming the scorer.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, model_validator

from arrcoc import ops
from arrcoc.errors import ParamsError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Scorer
from arrcoc.state import TokenState


def combine_scores(
    scores: Sequence[torch.Tensor], weights: Sequence[float], mask: torch.Tensor, normalize: str = "rank"
) -> torch.Tensor:
    """``sum_i w_i norm(s_i) / sum_i w_i`` over ``[B, N]`` scores; padded slots ``-inf``."""
    total = sum(weights)
    out = torch.zeros(mask.shape, device=mask.device)
    for s, w in zip(scores, weights):
        out = out + (w / total) * ops.normalize_scores(s, mask, normalize)
    return out.masked_fill(~mask, float("-inf"))


class RelevanceParams(Params):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"query": 0.7, "saliency": 0.3},
        description="Scorer name -> weight (the seed: {query: 0.7, saliency: 0.3}); must sum to > 0.",
    )
    normalize: Literal["rank", "zscore"] = Field(
        "rank", description="Per-image normalisation of each score before weighting: rank (to [0, 1]) or zscore."
    )
    scorers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Params of the named scorers, e.g. {saliency: {method: rollout}}.",
    )
    reuse: bool = Field(True, description="Reuse per_token['scores:<name>'] already in the state instead of rescoring.")

    @model_validator(mode="after")
    def _check(self) -> "RelevanceParams":
        from arrcoc.registry import get_registry

        if not self.weights:
            raise ValueError("weights: expected at least one {scorer: weight}, got {}")
        bad = {k: v for k, v in self.weights.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"weights: expected finite numbers, got {bad}")
        if not sum(self.weights.values()) > 0:
            raise ValueError(f"weights must sum to a positive number, got {dict(self.weights)} (sum {sum(self.weights.values())})")
        registry = get_registry()
        for name in self.weights:
            if name == "relevance":
                raise ValueError("weights: 'relevance' cannot combine itself")
            registry.get("scorer", name, where="relevance.weights")
        extra = sorted(set(self.scorers) - set(self.weights))
        if extra:
            raise ValueError(f"scorers: params given for {extra}, which have no weight (weights: {sorted(self.weights)})")
        for name, params in self.scorers.items():
            registry.get("scorer", name).validate_params(params)
        return self


class Relevance(Scorer):
    """Weighted, normalised combination of scorers (default 0.7 query + 0.3 saliency)."""

    name = "relevance"
    stage = "projector"  # in a VLM: after the projector, where the query embeddings live
    Params = RelevanceParams

    def __init__(self, params: RelevanceParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        from arrcoc.registry import get_registry

        self.parts = {
            name: get_registry().create("scorer", name, **self.params.scorers.get(name, {}))
            for name in self.params.weights
        }

    def requirements(self) -> frozenset[str]:
        needs: set[str] = set()
        for part in self.parts.values():
            needs |= part.requirements()
        return frozenset(needs)

    def __call__(self, state: TokenState) -> TokenState:
        scores = []
        for name, part in self.parts.items():
            key = f"scores:{name}"
            if not (self.params.reuse and key in state.per_token):
                state = part(state)
            if key not in state.per_token:
                raise ParamsError(f"relevance: scorer {name!r} did not write per_token[{key!r}]")
            value = state.per_token[key]
            scores.append(ops.check_scores(value, state.mask, f"relevance: per_token[{key!r}]"))
        weights = [float(self.params.weights[n]) for n in self.parts]
        relevance = combine_scores(scores, weights, state.mask, self.params.normalize)
        return state.with_per_token(relevance=relevance)


@hookimpl
def arrcoc_register_plugins(register):
    register(Relevance)
