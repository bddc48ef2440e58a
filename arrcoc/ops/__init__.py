"""The only code that moves tokens, and the scores, selections and matchings that say which.

A plugin decides *what* to keep or merge (indices); these functions do
*how*, once, for every field of a :class:`~arrcoc.state.TokenState`.
Everything is batched and vectorised, ragged batches equal per-image runs,
and ties are broken by index.  The modules, by what they do:

* :mod:`arrcoc.ops.moving`: :func:`keep`, :func:`merge`, :func:`gather_rows`,
  :func:`pack`, :func:`unmerge`, :func:`patches_to_tokens` (the only code
  that moves tokens);
* :mod:`arrcoc.ops.matching`: :func:`bipartite_match`, :func:`bipartite_merges`,
  :class:`Matching` (which tokens merge, ToMe's bipartite soft matching);
* :mod:`arrcoc.ops.selection`: :func:`resolve_keep`, :func:`topk_per_row`,
  :func:`topk`, :class:`TopK`, :func:`keep_topk` (budgets and top-k);
* :mod:`arrcoc.ops.scores`: :func:`cosine`, :func:`similarity_key`,
  :func:`query_similarity`, :func:`check_scores`, :func:`normalize_scores`.

Checks of argument *values* (each a device sync) run only under
:func:`checking`; the pipeline checks every stage's output once instead
(see :mod:`arrcoc.ops._checks`).  Each op makes one device sync at most:
the width of what it returns.
"""

from ._checks import checking, checks_enabled
from .matching import Matching, bipartite_match, bipartite_merges
from .moving import gather_rows, keep, merge, pack, patches_to_tokens, unmerge
from .scores import (
    SIMILARITY_ONE_BAND,
    SIMILARITY_TILE,
    check_scores,
    cosine,
    normalize_scores,
    query_similarity,
    similarity_key,
)
from .selection import TopK, keep_topk, resolve_keep, topk, topk_per_row

__all__ = [
    "Matching",
    "TopK",
    "bipartite_match",
    "bipartite_merges",
    "check_scores",
    "checking",
    "checks_enabled",
    "cosine",
    "gather_rows",
    "keep",
    "keep_topk",
    "merge",
    "normalize_scores",
    "pack",
    "patches_to_tokens",
    "query_similarity",
    "resolve_keep",
    "similarity_key",
    "topk",
    "topk_per_row",
    "unmerge",
]
