"""The only code that moves tokens (a package: see its modules)."""

from .moving import (  # noqa: F401
    SIMILARITY_GRID,
    Matching,
    TopK,
    bipartite_match,
    bipartite_merges,
    check_scores,
    cosine,
    gather_rows,
    keep,
    keep_topk,
    merge,
    normalize_scores,
    pack,
    patches_to_tokens,
    query_similarity,
    resolve_keep,
    similarity_key,
    topk,
    topk_per_row,
    unmerge,
)
from .moving import __all__  # noqa: F401
