"""``query``: participatory relevance — how much each visual token resembles the query.

``score[b, n] = reduce_t cos(x[b, n], q[b, t])`` over the real query tokens
``t`` (``query_mask``), with ``reduce`` = max (default: the best-matching
query word, as in text-guided token selection such as the seed's pre-LLM
SparseVLM variant ``cosine(token, text embedding)``) or mean.  Writes
``per_token["scores:query"]``; padded token slots are ``-inf``.

The query must live in the tokens' space (same width ``D``): the
``toy_text`` encoder matches the visual width; a query of another width is
an error naming both widths, never a silent projection.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from arrcoc import ops
from arrcoc.errors import InputError, MissingInputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Scorer
from arrcoc.state import TokenState

from . import masked_scores


def query_scores(
    tokens: torch.Tensor,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    reduce: str = "max",
) -> torch.Tensor:
    """Cosine of each token ``[B, N, D]`` with each query token ``[B, T, D]``,
    reduced over the real query tokens (``query_mask`` ``[B, T]``) -> float32 ``[B, N]``."""
    sim = ops.cosine(tokens.float(), query.float())  # [B, N, T]
    keep = query_mask[:, None, :]
    if reduce == "max":
        return sim.masked_fill(~keep, float("-inf")).amax(-1)
    return (sim * keep).sum(-1) / keep.sum(-1).clamp_min(1)


class QueryParams(Params):
    reduce: Literal["max", "mean"] = Field(
        "max", description="How the cosines to the query tokens combine: the best word (max) or the mean."
    )


class QueryScorer(Scorer):
    """Cosine between each token and the query (max or mean over query tokens)."""

    name = "query"
    Params = QueryParams
    needs = frozenset({"query"})

    def __call__(self, state: TokenState) -> TokenState:
        if state.query is None:
            raise MissingInputError(
                "query scorer: the state has no query; pass query='...' with a query_encoder "
                "(e.g. `query_encoder: {use: toy_text}`) or query=<tensor [B, T, D]>"
            )
        if state.query.shape[-1] != state.D:
            raise InputError(
                f"query scorer: query width {state.query.shape[-1]} differs from the visual token width "
                f"{state.D}; encode the query into the tokens' space (toy_text matches it by default)"
            )
        empty = ~state.query_mask.any(1)
        if bool(empty.any()):
            raise InputError(f"query scorer: images {empty.nonzero().flatten().tolist()} have no real query token")
        scores = query_scores(state.tokens, state.query, state.query_mask, self.params.reduce)
        return state.with_per_token(**{"scores:query": masked_scores(state, scores)})


@hookimpl
def arrcoc_register_plugins(register):
    register(QueryScorer)
