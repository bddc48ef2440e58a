"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for
Efficient Vision-Language Model Inference", arXiv 2410.04417).

Official: Gumpest/SparseVLMs (v1.0), ``llava/model/language_model/``:
``modelling_sparse_llama.py`` (``LlamaModel.forward``: text raters, pruning
at layers ``[2, 6, 15]``, recycling), ``score.py`` (``attn_postprocess_topk``,
the per-layer budget tables) and ``utils.py`` (``cluster_and_merge``, DPC-KNN).

Two plugins over one scoring core and one recycling path:

* ``sparsevlm`` runs **before the LLM** (the project seed's training-free
  variant): importance = ``w_text * norm(max_t cos(token, query_t)) + w_sal *
  norm(CLS attention)`` (defaults 0.7 / 0.3), top ``keep`` tokens in original
  order, and optionally the official token recycling of the dropped tokens;
* ``sparsevlm_llm`` is the **in-LLM** method, run by a model integration
  between decoder layers: :func:`select_text_raters` (paper Sec. 3.2),
  :func:`rater_scores` (``attn_postprocess_topk``), :func:`table_keep_count`
  (the official budget tables) or :func:`adaptive_keep_count` (the paper's
  rank-based count, Sec. 3.3), top-k, then recycling (Sec. 3.4), all batched
  over ragged rows (the official code is batch 1).

Recycling (official v1.0 ``LlamaModel.forward``: the best 30% (+1) of the
deleted tokens, clustered by ``utils.cluster_and_merge`` into ``m // 10 + 1``
plain means inserted right after the kept visual tokens) is one path for
both plugins: :func:`recycle_plan` picks the tokens and cluster counts,
:func:`dpc_knn` clusters them, and :func:`recycle_state` moves them through
:mod:`arrcoc.ops` (a merge with ``weights = 1`` is the official mean), so
``size`` / ``origin`` follow every recycled patch.

Differences from the official code, on purpose (see docs/methods/sparsevlm.md):
density ties in DPC-KNN are broken by index, not by ``rand * 1e-6`` noise;
cluster means have no ``+ 1e-6`` in the denominator; clustering runs in fp32.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from arrcoc import ops
from arrcoc.budget import bisect_increasing, layer_mean, nearest
from arrcoc.errors import BudgetError, MissingInputError, StateError, record_warning
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Compressor, Keep, LLMCompressor, Params, budget_count
from arrcoc.state import TokenState

#: Decoder layers where LLaVA-1.5-7B prunes (``layer_dict`` in ``score.py``).
PRUNING_LAYERS: tuple[int, ...] = (2, 6, 15)
#: Depth of the LLM those layers and tables were made for (LLaVA-1.5-7B); budgets scale the layers from it.
REFERENCE_LAYERS = 32
#: v1.0 visual tokens kept at each pruning layer for a retained budget (``sparse_token_dict``).
SPARSE_TOKEN_TABLE: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}


# ------------------------------------------------------------------ helpers
def _real(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask


def sparsevlm_importance(
    tokens: torch.Tensor,
    query: torch.Tensor,
    saliency: torch.Tensor | None,
    mask: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    *,
    w_text: float = 0.7,
    w_sal: float = 0.3,
    norm: str = "minmax",
) -> torch.Tensor:
    """The seed's pre-LLM importance ``w_text * norm(text) + w_sal * norm(saliency)``, ``[B, N]`` fp32.

    ``text = max_t cos(token, query_t)`` (masked query tokens ignored);
    ``saliency`` is e.g. the CLS attention ``[B, N]``; each term is normalised
    per image over the real tokens (:func:`arrcoc.ops.normalize_scores`) before weighting.
    """
    score = w_text * ops.normalize_scores(ops.query_similarity(tokens, query, query_mask), mask, norm)
    if w_sal != 0:
        if saliency is None:
            raise MissingInputError("sparsevlm_importance: w_sal != 0 needs a saliency tensor [B, N]")
        score = score + w_sal * ops.normalize_scores(saliency.float(), mask, norm)
    return score.masked_fill(~mask, 0.0)


# ----------------------------------------------------------- in-LLM scoring
def select_text_raters(
    visual: torch.Tensor,
    text: torch.Tensor,
    visual_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text raters (paper Sec. 3.2; ``LlamaModel.forward`` of ``modelling_sparse_llama.py``).

    ``m = softmax(V @ T^T, dim=text).mean(over visual)``; raters are the text
    tokens with ``m > mean(m)``.  ``visual`` ``[B, Nv, C]`` and ``text``
    ``[B, T, C]`` are the hidden states at the LLM input.  Masked tokens take
    no part.  A row where no token is above the mean (all equal) gets every
    real text token as a rater (the official code would average nothing).

    Returns a bool mask ``[B, T]``.
    """
    vm, tm = _real(visual_mask, visual), _real(text_mask, text)
    logits = visual.float() @ text.float().transpose(1, 2)  # [B, Nv, T]
    logits = logits.masked_fill(~tm[:, None, :], float("-inf"))
    probs = logits.softmax(-1).masked_fill(~vm[:, :, None], 0.0)
    m = probs.sum(1) / vm.sum(1, keepdim=True).clamp_min(1)  # [B, T]
    mean = (m * tm).sum(1, keepdim=True) / tm.sum(1, keepdim=True).clamp_min(1)
    raters = (m > mean) & tm
    none = ~raters.any(1, keepdim=True)
    if bool(none.any()):
        record_warning("sparsevlm: no text token is above the mean relevance in some image; every text token rates")
    return torch.where(none, tm, raters)


def rater_scores(attn: torch.Tensor, raters: torch.Tensor, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Score of each visual token: attention from the rater rows, head-mean then rater-mean.

    ``attn`` is the text -> visual block of a layer's attention, ``[B, heads,
    T, Nv]`` or already head-averaged ``[B, T, Nv]``; official
    ``attn_postprocess_topk``: ``weights.mean(1)[:, raters, visual].mean(1)``.
    Returns ``[B, Nv]`` fp32 (0 on padding).
    """
    a = attn.float()
    if a.ndim == 4:
        a = a.mean(1)
    if a.ndim != 3 or a.shape[:2] != raters.shape:
        raise StateError(
            f"rater_scores: expected attention [B, (heads,) T, Nv] matching raters {list(raters.shape)}, "
            f"got {list(attn.shape)}"
        )
    r = raters.float()
    score = (a * r[:, :, None]).sum(1) / r.sum(1, keepdim=True).clamp_min(1)
    return score if visual_mask is None else score.masked_fill(~visual_mask, 0.0)


def table_keep_count(budget: int, layer: int, n_visual: torch.Tensor | int) -> torch.Tensor:
    """Visual tokens kept at pruning ``layer`` for a retained ``budget`` (official table).

    ``min(SPARSE_TOKEN_TABLE[budget][i], n_visual - 1)`` with ``i`` the index
    of ``layer`` in :data:`PRUNING_LAYERS` (official ``attn_postprocess_topk``).
    """
    if budget not in SPARSE_TOKEN_TABLE:
        raise StateError(f"table_keep_count: budget must be one of {sorted(SPARSE_TOKEN_TABLE)}, got {budget}")
    if layer not in PRUNING_LAYERS:
        raise StateError(f"table_keep_count: layer must be one of {list(PRUNING_LAYERS)}, got {layer}")
    n = torch.as_tensor(n_visual, dtype=torch.int64)
    target = SPARSE_TOKEN_TABLE[budget][PRUNING_LAYERS.index(layer)]
    return torch.clamp(n - 1, min=0).clamp(max=target)


def adaptive_keep_count(attn: torch.Tensor, raters: torch.Tensor, visual_mask: torch.Tensor | None = None,
                        scale: float = 1.0) -> torch.Tensor:
    """The paper's rank-based count (Sec. 3.3): delete ``floor(scale * (Lv - rank(P)))`` tokens.

    ``P`` is the rater -> visual attention (head-mean) ``[B, T_raters, Lv]``;
    masked rows/columns are zeroed, which leaves the rank unchanged.  ``scale``
    is the paper's lambda.  Not what the official code does (it uses the
    tables).  Returns the tokens kept per image ``[B]`` (at least 1).
    """
    a = attn.float()
    if a.ndim == 4:
        a = a.mean(1)
    vm = _real(visual_mask, a.transpose(1, 2))
    P = a * raters[:, :, None] * vm[:, None, :]
    rank = torch.linalg.matrix_rank(P)
    n = vm.sum(1)
    delete = torch.floor(scale * (n - rank).double()).to(torch.int64).clamp(min=0)
    return (n - delete).clamp(min=1)


# ---------------------------------------------------------------- recycling
def recycle_plan(
    scores: torch.Tensor, keep_index: torch.Tensor, keep_valid: torch.Tensor, mask: torch.Tensor,
    ratio: float = 0.3, divisor: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which deleted tokens are recycled, and into how many clusters (official v1.0).

    Of the ``d`` deleted real tokens, the top ``min(int(d * ratio) + 1, d)`` by
    ``scores`` are recycled (``merge_token_num_stage1``), into
    ``min(int(m / divisor) + 1, m)`` clusters (``cluster_num``); nothing when
    ``d = 0``.  The official count never exceeds ``m`` with its divisor 10
    (its ``topk(k=cluster_num)`` would fail, and its fallback for a zero
    count is ``m``); with a smaller ``divisor`` it would, so it is clamped to
    ``m`` (every recycled token its own cluster).

    Returns ``(recycled index [B, M] by decreasing score, valid [B, M], clusters [B])``.
    """
    B, N = mask.shape
    sink = torch.where(keep_valid, keep_index, torch.full_like(keep_index, N))  # invalid -> dummy column N
    kept = torch.zeros(B, N + 1, dtype=torch.bool, device=mask.device).scatter(1, sink, True)[:, :N]
    deleted = mask & ~kept
    d = deleted.sum(1)
    m = torch.minimum(torch.floor(d.double() * ratio).to(torch.int64) + 1, d)
    index, valid = ops.topk_per_row(scores.float(), m, deleted, order="score")
    clusters = torch.minimum(torch.div(m, divisor, rounding_mode="floor") + 1, m)  # m = 0 -> 0 clusters
    return index, valid, clusters


def recycled_clusters(deleted: int, ratio: float = 0.3, divisor: int = 10) -> int:
    """Cluster tokens recycling adds when ``deleted`` tokens are deleted (the counts of :func:`recycle_plan`)."""
    if deleted <= 0:
        return 0
    m = min(int(math.floor(deleted * ratio)) + 1, deleted)
    return min(m // divisor + 1, m)


def recycled_keep(tokens: int, target: float, ratio: float = 0.3, divisor: int = 10) -> int:
    """The selection ``k`` whose output, ``k`` plus the recycled clusters of the ``tokens - k`` deleted, is nearest
    ``target`` (the output grows with ``k``; ties to the larger ``k``: fewer tokens deleted for the same count)."""
    outputs = [k + recycled_clusters(tokens - k, ratio, divisor) for k in range(1, tokens + 1)]
    return 1 + min(range(len(outputs)), key=lambda i: (abs(outputs[i] - target), -i))


def dpc_knn(x: torch.Tensor, cluster_num: torch.Tensor | int, mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering (official ``utils.cluster_and_merge``; the averaging is :func:`recycle_state`'s), batched.

    Per image with ``n`` real tokens and ``c = cluster_num`` clusters:
    distances ``d_ij = ||x_i - x_j|| / sqrt(C)``; local density
    ``rho_i = exp(-mean(d^2 over the c nearest, itself included))``;
    ``delta_i`` = distance to the nearest denser token (the image's largest
    distance for the densest); centres = top ``c`` of ``rho * delta`` (by
    decreasing score); every token joins its nearest centre (first centre
    on ties), each centre itself.  Density ties go to the lower index.

    Returns ``(centres [B, Cmax] token indices, centre_valid [B, Cmax],
    assign [B, N] cluster index in [0, c), -1 on padding)``.
    """
    B, N, C = x.shape
    mask = _real(mask, x)
    n = mask.sum(1)
    c = torch.as_tensor(cluster_num, dtype=torch.int64, device=x.device).expand(B)
    if bool((c > n).any()) or bool(((c < 1) & (n > 0)).any()):
        raise StateError(f"dpc_knn: cluster counts {c.tolist()} must lie in [1, n] for rows of {n.tolist()} tokens")
    if N == 0:  # no row has a token (e.g. nothing was deleted, so nothing is recycled): no clusters
        empty = torch.zeros(B, 0, dtype=torch.int64, device=x.device)
        return empty, empty.bool(), empty.clone()
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(C)
    pair = mask[:, :, None] & mask[:, None, :]
    K = int(c.max()) if B else 0
    near = torch.sort(dist.masked_fill(~pair, float("inf")), dim=-1).values[:, :, :K]
    # A row's c nearest are finite (c <= n); beyond them, in a row shorter than another row's c, lie the
    # padding's inf distances: select, never multiply by 0 (inf * 0 = NaN).
    take = torch.arange(K, device=x.device)[None, None, :] < c[:, None, None]
    density = torch.exp(-torch.where(take, near.pow(2), 0.0).sum(-1) / c[:, None].clamp_min(1))  # [B, N]
    density = density.masked_fill(~mask, float("-inf"))
    idx = torch.arange(N, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, None, :] < idx[None, :, None])
    )
    denser = denser & pair
    dist_max = dist.masked_fill(~pair, float("-inf")).flatten(1).amax(1).clamp_min(0)[:, None, None]
    delta = torch.where(denser, dist, dist_max.expand_as(dist)).amin(-1)
    score = (delta * density.clamp_min(0)).masked_fill(~mask, float("-inf"))
    centres, centre_valid = ops.topk_per_row(score, c, mask, order="score")
    to_centre = dist.gather(1, centres[:, :, None].expand(B, K, N))  # [B, K, N]
    to_centre = to_centre.masked_fill(~centre_valid[:, :, None], float("inf"))
    assign = to_centre.argmin(1) if K else torch.zeros(B, N, dtype=torch.int64, device=x.device)
    # Each centre belongs to its own cluster (official: idx_cluster[index_down] = arange); unused slots -> dummy column N.
    own = torch.arange(K, device=x.device).expand(B, K)
    sink = torch.where(centre_valid, centres, torch.full_like(centres, N))
    assign = torch.cat([assign, assign.new_zeros(B, 1)], 1).scatter(1, sink, own)[:, :N]
    centres = centres.masked_fill(~centre_valid, 0)
    return centres, centre_valid, assign.masked_fill(~mask, -1)


def recycle_state(state: TokenState, scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                  ratio: float = 0.3, divisor: int = 10) -> TokenState:
    """Keep ``index`` and add the recycled clusters of the deleted tokens, through :mod:`arrcoc.ops`.

    The recycled tokens are first kept right after the selected ones (centres
    first, then the other members), then every member is merged into its
    cluster's centre with a plain mean (``weights = 1``, the official average),
    so the cluster token stands for all its members' patches (``size`` adds
    up, ``origin`` follows).  Output: kept tokens in original order, then the
    cluster tokens in centre order — the official layout.
    """
    rec_index, rec_valid, clusters = recycle_plan(scores, index, valid, state.mask, ratio, divisor)
    members = ops.gather_rows(state.tokens, rec_index, rec_valid)
    centres, centre_valid, assign = dpc_knn(members, clusters, rec_valid)  # indices into the member list
    B, M = rec_index.shape
    # Member order: centres first (in centre order), then the rest (in score order).
    sink = torch.where(centre_valid, centres, torch.full_like(centres, M))
    is_centre = torch.zeros(B, M + 1, dtype=torch.bool, device=state.device).scatter(1, sink, True)[:, :M]
    rest, rest_valid = ops.pack(rec_valid & ~is_centre)
    member_order = torch.cat([centres, rest], 1)
    member_valid = torch.cat([centre_valid, rest_valid], 1)
    ordered = rec_index.gather(1, member_order)
    state = ops.keep(state, torch.cat([index, ordered], 1), torch.cat([valid, member_valid], 1))
    # After keep: row b = [k_b selected, c_b centres, m_b - c_b others]; cluster j's centre sits at k_b + j.
    k = valid.sum(1, keepdim=True)
    c = centre_valid.sum(1, keepdim=True)
    R = rest.shape[1]
    src = k + c + torch.arange(R, device=state.device)[None, :]
    dst = k + assign.gather(1, rest.masked_fill(~rest_valid, 0))
    return ops.merge(state, src.masked_fill(~rest_valid, 0), dst.masked_fill(~rest_valid, 0), rest_valid,
                     weights=torch.ones_like(state.size))


# ------------------------------------------------------------------- plugin
class SparseVLMParams(Params):
    keep: Keep = Field(0.4, description="Tokens selected per image (before recycling): ratio in (0, 1] or count.")
    w_text: float = Field(0.7, ge=0, description="Weight of the query relevance max_t cos(token, query_t).")
    w_sal: float = Field(0.3, ge=0, description="Weight of the visual saliency (CLS attention).")
    norm: Literal["minmax", "rank", "zscore", "none"] = Field(
        "minmax", description="Per-image normalisation of each term before weighting."
    )
    saliency: str = Field(
        "cls_attn", description="per_token field used as saliency ('cls_attn', or 'cls_attn@<block>')."
    )
    recycle: bool = Field(
        False, description="Official token recycling: DPC-KNN cluster tokens of the best deleted tokens are "
        "appended (adds int(m / 10) + 1 tokens, m = int(0.3 * deleted) + 1).",
    )
    recycle_ratio: float = Field(0.3, gt=0, le=1, description="Share of the deleted tokens recycled (+1).")
    cluster_divisor: int = Field(
        10, ge=1, description="Recycled tokens per cluster: clusters = min(m // divisor + 1, m)."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> "SparseVLMParams":
        if self.w_text == 0 and self.w_sal == 0:
            raise ValueError("w_text and w_sal are both 0: every token would score the same; give one a weight > 0")
        return self


class SparseVLM(Compressor):
    """SparseVLM, pre-LLM: keep tokens by query relevance + CLS saliency, optional recycling (Zhang et al. 2025)."""

    name = "sparsevlm"
    stage = "projector"  # in a VLM: after the projector, where the query embeddings live
    Params = SparseVLMParams

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        p = cls.validate_params(params)
        fewest = 1 + (recycled_clusters(context.tokens - 1, p.recycle_ratio, p.cluster_divisor) if p.recycle else 0)
        return float(min(fewest, context.tokens)), float(context.tokens)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        p = cls.validate_params(params)
        if not p.recycle:
            return {**params, "keep": budget_count(target, context.tokens)}
        # Recycling appends cluster tokens of the deleted ones: select fewer so that the total meets the target.
        return {**params, "keep": recycled_keep(context.tokens, target, p.recycle_ratio, p.cluster_divisor)}

    def requirements(self) -> frozenset[str]:
        return frozenset({"query", "cls_attention"}) if self.params.w_sal > 0 else frozenset({"query"})

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        state.require_query("sparsevlm")
        saliency = None
        if p.w_sal > 0:
            saliency = state.per_token.get(p.saliency)
            if saliency is None:
                raise MissingInputError(
                    f"sparsevlm: w_sal={p.w_sal} needs per_token[{p.saliency!r}] (CLS attention); the timm_vit "
                    "encoder provides 'cls_attn' when a stage needs 'cls_attention' (block chosen by its "
                    "`attention_layer` option; more blocks with `extra_attention_layers` as 'cls_attn@<i>'), "
                    "or set w_sal: 0"
                )
            if saliency.ndim != 2:
                raise StateError(f"sparsevlm: per_token[{p.saliency!r}] must be [B, N], got {list(saliency.shape)}")
        k = ops.resolve_keep(p.keep, state.counts, where="sparsevlm: keep")
        scores = sparsevlm_importance(
            state.tokens, state.query, saliency, state.mask, state.query_mask,
            w_text=p.w_text, w_sal=p.w_sal, norm=p.norm,
        )
        index, valid = ops.topk_per_row(scores, k, state.mask, order="position")
        if not p.recycle:
            return ops.keep(state, index, valid)
        return recycle_state(state, scores, index, valid, p.recycle_ratio, p.cluster_divisor)




# ------------------------------------------------------------ in the LLM
class SparseVLMLLMParams(Params):
    budget: Literal[192, 128, 96, 64] = Field(
        192, description="Retained budget whose official per-layer table is used (192 -> [300, 200, 110], ...).")
    layers: list[int] = Field(
        default_factory=lambda: list(PRUNING_LAYERS),
        description="Decoder layers whose attention scores the visual tokens; tokens leave after each "
        "(official [2, 6, 15] for LLaVA-1.5-7B). The i-th uses the i-th table entry.",
    )
    count: Literal["table", "adaptive"] = Field("table", description="Official tables, or the paper's rank rule.")
    scale: float = Field(1.0, gt=0, description="lambda of the rank rule (count: adaptive).")
    recycle: bool = Field(True, description="Official v1.0 recycling: DPC-KNN cluster tokens of the best deleted.")
    recycle_ratio: float = Field(0.3, gt=0, le=1, description="Share of the deleted tokens recycled (+1).")
    cluster_divisor: int = Field(10, ge=1, description="Recycled tokens per cluster: clusters = min(m // divisor + 1, m).")
    positions: Literal["compact", "original"] = Field(
        "compact", description="compact: kept tokens renumbered contiguously (v1.0); original: kept ids (v2.0).")
    keep: list[Keep] | None = Field(
        None, description="Instead of the budget table: visual tokens selected at each pruning layer (one entry per "
        "`layers`, before recycling), a count or a ratio of the visual tokens at the LLM input; like the table, "
        "never more than are present. Set by `arrcoc eval` budgets.")

    @model_validator(mode="after")
    def _layers(self) -> "SparseVLMLLMParams":
        if not self.layers or len(self.layers) > len(PRUNING_LAYERS) or sorted(set(self.layers)) != self.layers:
            raise ValueError(f"layers: 1 to {len(PRUNING_LAYERS)} increasing layer indices, got {self.layers}")
        if self.keep is not None:
            if len(self.keep) != len(self.layers):
                raise ValueError(f"keep: one entry per pruning layer {self.layers}, got {self.keep}")
            if self.count != "table":
                raise ValueError("keep replaces the budget table; it cannot be combined with count: adaptive")
        return self


class SparseVLMLLM(LLMCompressor):
    """SparseVLM in the LLM (official v1.0): text raters' attention, per-layer tables, recycling."""

    name = "sparsevlm_llm"
    Params = SparseVLMLLMParams
    needs = frozenset({"attn_from_text"})
    adaptive = True

    @classmethod
    def budget_layers(cls, params: dict, num_layers: int) -> list[int]:
        """The pruning layers scaled from the official 32-layer LLaVA-1.5-7B to ``num_layers``.

        Tokens leave at the input of layer ``l + 1`` for each scoring layer ``l``; that input layer is scaled
        by ``num_layers / 32`` and kept within ``1 .. num_layers - 1`` (duplicates merge).  32 layers: unchanged.
        """
        p = cls.validate_params(params)
        acts = sorted({min(max(round((l + 1) * num_layers / REFERENCE_LAYERS), 1), num_layers - 1) for l in p.layers})
        return [a - 1 for a in acts]

    @classmethod
    def _schedule(cls, p: SparseVLMLLMParams, layers: list[int], n: int, num_layers: int, r: float
                  ) -> tuple[list[int], float]:
        """Selections ``k_i`` for step outputs ``n r^i`` (recycled clusters included) and the layer mean."""
        keeps, outs, present = [], [], n
        for i in range(1, len(layers) + 1):
            goal = n * r ** i
            k = recycled_keep(present, goal, p.recycle_ratio, p.cluster_divisor) if p.recycle else budget_count(
                goal, present)
            present = k + (recycled_clusters(present - k, p.recycle_ratio, p.cluster_divisor) if p.recycle else 0)
            keeps.append(k)
            outs.append(present)
        # Scoring layer l's output is pruned: the count changes at the input of layer l + 1.
        return keeps, layer_mean(n, num_layers, zip((l + 1 for l in layers), outs))

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        if context.layers < 2:
            raise BudgetError(f"sparsevlm_llm: an LLM of {context.layers} layer(s) has no layer to prune at")
        p = cls.validate_params(params)
        layers = cls.budget_layers(params, context.layers)
        return cls._schedule(p, layers, context.tokens, context.layers, 0.0)[1], float(context.tokens)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """Pruning layers scaled to the LLM's depth (:meth:`budget_layers`); the visual tokens after pruning step
        ``i`` are ``n r^i`` (geometric, as the official tables roughly are), ``r`` solved so that the mean over
        the decoder layers is ``target``; recycled cluster tokens are counted in each step's output."""
        p = cls.validate_params(params)
        layers = cls.budget_layers(params, context.layers)
        n, L = context.tokens, context.layers

        def mean(r: float) -> float:
            return cls._schedule(p, layers, n, L, r)[1]

        r = nearest(mean, target, bisect_increasing(mean, target, 0.0, 1.0))  # the mean grows with r (in steps)
        return {**params, "layers": layers, "keep": cls._schedule(p, layers, n, L, r)[0]}

    def llm_layers(self, num_layers: int) -> tuple[int, ...]:
        # Official: a pruning layer's own attention scores; its output is pruned (= the next layer's input).
        return tuple(layer + 1 for layer in self.params.layers)

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        llm = self.llm_context(state)
        attn = state.per_token.get("attn_from_text")
        if attn is None or state.query is None:
            raise MissingInputError(
                "sparsevlm_llm: runs inside an LLM (arrcoc.hf.apply): it needs per_token['attn_from_text'] and the "
                "text hidden states (query) from the model integration"
            )
        step = p.layers.index(llm.layer - 1)
        # Raters once over the LLM-input states of every visual token (official: before the first layer).
        raters = select_text_raters(llm.require("input_visual", "sparsevlm_llm"), state.query,
                                    llm.require("input_visual_mask", "sparsevlm_llm"), state.query_mask)
        rows = attn.transpose(1, 2)  # [B, T, N]
        scores = rater_scores(rows, raters, state.mask)
        if p.keep is not None:
            keep = p.keep[step]
            n0 = llm.input_visual_counts.to(state.counts.device)
            k = torch.full_like(state.counts, keep) if isinstance(keep, int) else torch.floor(
                n0.double() * keep).to(torch.int64).clamp(min=1)
        elif p.count == "table":
            k = table_keep_count(p.budget, PRUNING_LAYERS[step], state.counts)
        else:
            k = adaptive_keep_count(rows, raters, state.mask, p.scale)
        k = torch.minimum(k.to(state.device), state.counts)
        index, valid = ops.topk_per_row(scores, k, state.mask, order="position")
        if not p.recycle or not bool((k < state.counts).any()):
            return ops.keep(state, index, valid)
        return recycle_state(state, scores, index, valid, p.recycle_ratio, p.cluster_divisor)


@hookimpl
def arrcoc_register_plugins(register):
    register(SparseVLM)
    register(SparseVLMLLM)
