"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing
Conditional Diversity for Token Pruning in MLLMs", arXiv 2506.10967).

Faithful to Theia-4869/CDPruner @ 9541616, ``llava/model/llava_arch.py``
``encode_images`` (l.141-187), on the **projected** features (after
``mm_projector``, so ``stage = "projector"``):

* similarity ``S = X^ X^T`` of the features normalised in their own dtype
  (fp16 in LLaVA) with no eps, then ``.float()`` (l.150-152);
* relevance ``r_i = mean_m(-cos(x_i, q_m))`` over the instruction's rows
  ``q_m``, then ``r = (r - min r + 1e-6) / (max r - min r)`` (l.154-159);
* conditional DPP kernel ``L = diag(r) S diag(r)`` in float32 (l.166,
  paper Eq. 8);
* greedy MAP inference with incremental Cholesky (Chen et al., NeurIPS 2018,
  "Fast Greedy MAP Inference for DPP", Alg. 1; official l.169-180):
  ``d^2 = diag(L)``; each step takes ``j = argmax d^2`` (first index on
  ties), ``e = (L[j] - sum_{s<t} c_s[j] c_s) / sqrt(d^2_j)``, stores
  ``c_t = e``, sets ``d^2 -= e^2`` and ``d^2_j = -inf``: ``O(N k^2)`` for
  ``k`` picks after the ``O(N^2 D)`` similarity, no matrix inverted;
* the picks sorted ascending (original order, l.182-184).

The instruction: the official code embeds the question with CLIP's text tower
and the patches with CLIP's ``visual_projection``.  Here the relevance is the
cosine of the (projected) tokens to ``state.query``: inside a VLM
(``arrcoc.hf``) the LLM input embeddings of the prompt's text after the
image, standalone whatever the ``query_encoder`` gives.  This is the
non-official option of METHODS.md for models without a CLIP text tower (an
arrcoc choice); the CLIP-text variant is not implemented yet.  Each query
token is one row ``q_m`` (the official rows are 77-token chunks, one for a
short question); padding query tokens take no part.

Quirks of the official code (docs/methods/cdpruner.md):

1. the relevance is **negated** (``(-relevance).mean``, also in
   ``scripts/visualize_relevance.py``): patches *least* similar to the
   question get the highest weight.  It produced the published numbers, so it
   is the default; ``negate: false`` uses the relevance as the paper's text
   describes it;
2. no stop criterion: past the rank of ``L`` (at most the feature width)
   ``d^2`` is float32 rounding noise, which picks the next tokens, until it
   reaches 0, ``sqrt`` gives NaN or inf and the official loop repeats an
   index.  Guard: a row whose best ``d^2`` is not above ``eps`` (default
   ``1e-5``) times its largest ``diag(L)`` stops the DPP and fills the rest of
   its budget with its unpicked tokens of largest kernel diagonal
   ``r_i^2 S_ii`` (the quality term), ties by index; ``eps: 0`` acts only
   where the official result is NaN.  LLaVA (4096-d features, at most 576
   picks of 576) stays far above the threshold: the published picks are
   unchanged.  A zero token (official: NaN from the division by its norm) is
   a zero row of ``S``;
3. ``+1e-6`` sits in the numerator only: equal relevance everywhere divides by
   zero.  Guard: such an image gets ``r = 1`` everywhere (pure diversity; the
   scale of ``L`` does not change the picks);
4. min / max are taken over the whole batch (the eval batch is one image):
   here per image, shared by that image's views when ``meta["views"]`` gives
   a LLaVA-NeXT layout (each view still keeps its own budget, as the
   official NeXT code does).

The paper's ``theta`` (``r = exp(theta / (2 (1 - theta)) r)``) is commented
out in the official code; ``theta`` offers it (default off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from arrcoc import ops
from arrcoc.errors import InputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Keep, Params
from arrcoc.state import TokenState


def cdpruner_similarity(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``S`` ``[B, N, N]`` float32: cosine of the tokens, normalised in their own dtype (official l.150-152).

    Padding and zero tokens get zero rows and columns (the official division by a zero norm gives NaN).
    Both operands are zero-padded to whole tiles of :data:`arrcoc.ops.SIMILARITY_TILE` rows, so that an
    entry's value depends on its two tokens only (a ragged batch equals the images alone; duplicate tokens
    tie exactly and are picked by index).
    """
    B, N, _ = tokens.shape
    norm = tokens.norm(dim=-1, keepdim=True)
    usable = mask[..., None] & (norm > 0)
    unit = torch.where(usable, tokens / torch.where(usable, norm, torch.ones_like(norm)), torch.zeros_like(tokens))
    unit = unit.float()
    if N % ops.SIMILARITY_TILE:
        unit = F.pad(unit, (0, 0, 0, -N % ops.SIMILARITY_TILE))
    return (unit @ unit.transpose(1, 2))[:, :N, :N]


def cdpruner_relevance(
    tokens: torch.Tensor,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    negate: bool = True,
    theta: float | None = None,
) -> torch.Tensor:
    """Relevance ``r`` ``[B, N]`` float32 in ``(0, 1]`` (official l.154-159; 0 on padding).

    ``r_i = mean over real query tokens of -cos(token_i, q_m)`` (``negate=False``: ``+cos``), min-max
    normalised ``(r - min + 1e-6) / (max - min)`` over each group of rows (``groups`` ``[B]`` int64, one id
    per image, its views sharing it; ``None``: every row alone); a group with ``max == min`` gets ``r = 1``.
    ``theta`` (the paper's, commented out officially): ``r = exp(theta / (2 (1 - theta)) r)``.
    """
    B = tokens.shape[0]
    # float32 as officially (CLIP's projections and text tower load in float32), and no float64 product.
    cos = ops.query_similarity(tokens.float(), query.float(), query_mask, reduce="mean")
    r = -cos if negate else cos
    if groups is None:
        groups = torch.arange(B, device=tokens.device)
    G = B  # group ids are < B
    inf = torch.full((G,), float("inf"), device=tokens.device)
    index = groups[:, None].expand_as(r)
    low = inf.scatter_reduce(0, index.reshape(-1), r.masked_fill(~mask, float("inf")).reshape(-1), "amin")
    high = (-inf).scatter_reduce(0, index.reshape(-1), r.masked_fill(~mask, float("-inf")).reshape(-1), "amax")
    low, high = low[groups][:, None], high[groups][:, None]
    span = high - low
    flat = ~(span > 0)  # equal relevance (official: division by zero), or a row with no real token
    r = torch.where(flat, torch.ones_like(r), (r - low + 1e-6) / torch.where(flat, torch.ones_like(span), span))
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r.masked_fill(~mask, 0.0)


def cdpruner_select(
    similarity: torch.Tensor,
    relevance: torch.Tensor,
    mask: torch.Tensor,
    k: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of the conditional DPP ``L = diag(r) S diag(r)``, incremental Cholesky (official l.166-184).

    Args:
        similarity: ``[B, N, N]`` float32 ``S``; relevance ``[B, N]`` ``r`` (0 on padding); mask ``[B, N]``.
        k: ``[B]`` int64 picks per row (``<=`` its real tokens).
        eps: a row whose best ``d^2`` is not above ``eps`` times its largest ``diag(L)`` (NaN included) stops the
            DPP and picks its unpicked tokens by largest ``diag(L)`` (official: no stop; past the rank of ``L`` its
            picks follow rounding noise, then NaN).  0: only where the official ``sqrt`` gives NaN or inf.
            Default: the plugin's.

    Returns:
        ``(index [B, K], valid [B, K])``, each row's picks ascending (``K = max k``).
    """
    B, N, _ = similarity.shape
    device = similarity.device
    r = relevance.float()
    kernel = r[:, :, None] * similarity * r[:, None, :]  # official operand order (l.166)
    quality = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~mask, float("-inf"))
    gain = quality.clone()  # d^2 (official di2s)
    # Numerical rank: a gain within float32 rounding of the row's largest diag(L) is noise, not diversity.
    floor = eps * quality.amax(dim=-1).clamp_min(0.0) if N else quality.new_zeros(B)
    steps = int(k.max()) if k.numel() else 0  # the one host sync
    chol = torch.zeros(B, N, steps, device=device)  # c_t as columns: each row's sum over t is one reduction
    picks = torch.zeros(B, steps, dtype=torch.int64, device=device)
    rows = torch.arange(B, device=device)
    for t in range(steps):
        best, j = gain.max(dim=-1)  # first index on ties (official argmax)
        exhausted = ~(best > floor)
        fallback = quality.masked_fill(torch.isneginf(gain), float("-inf")).argmax(dim=-1)
        j = torch.where(exhausted, fallback, j)
        picks[:, t] = j
        kernel_row = kernel[rows, j]  # [B, N]
        chol_j = chol[rows, j, :t]  # [B, t]
        scale = torch.where(exhausted, torch.ones_like(best), best).sqrt()  # no sqrt of d^2 <= 0 (quirk 2)
        e = (kernel_row - (chol[:, :, :t] * chol_j[:, None, :]).sum(-1)) / scale[:, None]
        e = e.masked_fill(exhausted[:, None], 0.0)
        chol[:, :, t] = e
        gain = gain - e.square()
        gain[rows, j] = float("-inf")
    valid = torch.arange(steps, device=device)[None, :] < k[:, None]
    # Ascending within the valid prefix (official sort of the picks), invalid entries last.
    picks = torch.sort(picks.masked_fill(~valid, N), dim=1).values
    return picks.masked_fill(~valid, 0), valid


class CDPrunerParams(Params):
    keep: Keep = Field(
        64,
        description="Tokens each image keeps (official --visual_token_num 64 / 128 / 192 of 576: an exact count), "
        "or a ratio of its tokens.",
    )
    negate: bool = Field(
        True,
        description="Official: relevance = mean of -cos(token, instruction), which favours the patches least like "
        "the question (it gave the published numbers); false: +cos, as the paper's text reads.",
    )
    theta: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="The paper's relevance weight r = exp(theta / (2 (1 - theta)) r) (commented out in the "
        "official code, 0.5 there); null: off, as officially.",
    )
    eps: float = Field(
        1e-5, ge=0.0, lt=1.0,
        description="Guard of the official loop (no stop criterion): a row whose best DPP gain d^2 is not above eps "
        "x its largest kernel diagonal (the numerical rank of L is reached) fills the rest of its budget with its "
        "unpicked tokens of largest relevance r^2 S_ii; 0: only where the official code gives NaN.",
    )


class CDPruner(Compressor):
    """CDPruner: conditional-DPP token selection, relevance to the instruction x similarity (Zhang et al. 2025)."""

    name = "cdpruner"
    stage = "projector"  # official: on the projected features, where the instruction embeddings live in a VLM
    Params = CDPrunerParams
    needs = frozenset({"query"})

    def _groups(self, state: TokenState) -> torch.Tensor | None:
        """One id per image for the relevance's min / max: an image's LLaVA-NeXT views share theirs."""
        layout = state.meta.get("views")
        if layout is None:
            return None
        views = [1 + rows * cols for rows, cols in layout]
        if sum(views) != state.B:
            raise InputError(f"cdpruner: meta['views'] describes {sum(views)} views, the batch holds {state.B}")
        return torch.repeat_interleave(torch.arange(len(views)), torch.tensor(views)).to(state.device)

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        query, query_mask = state.require_query("cdpruner")
        k = ops.resolve_keep(p.keep, state.counts, where="cdpruner.keep")
        similarity = cdpruner_similarity(state.tokens, state.mask)
        relevance = cdpruner_relevance(
            state.tokens, query, query_mask, state.mask, self._groups(state), negate=p.negate, theta=p.theta
        )
        index, valid = cdpruner_select(similarity, relevance, state.mask, k, p.eps)
        return ops.keep(state, index, valid)


@hookimpl
def arrcoc_register_plugins(register):
    register(CDPruner)
