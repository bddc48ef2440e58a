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

from pydantic import Field

from arrcoc import ops
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Scorer
from arrcoc.state import TokenState

from . import masked_scores


class QueryParams(Params):
    reduce: Literal["max", "mean"] = Field(
        "max", description="How the cosines to the query tokens combine: the best word (max) or the mean."
    )


class QueryScorer(Scorer):
    """Cosine between each token and the query (max or mean over query tokens)."""

    name = "query"
    stage = "projector"  # in a VLM: after the projector, where the query embeddings live
    Params = QueryParams
    needs = frozenset({"query"})

    def __call__(self, state: TokenState) -> TokenState:
        query, query_mask = state.require_query("query scorer")
        scores = ops.query_similarity(state.tokens, query, query_mask, self.params.reduce)
        return state.with_per_token(**{"scores:query": masked_scores(state, scores)})


@hookimpl
def arrcoc_register_plugins(register):
    register(QueryScorer)
