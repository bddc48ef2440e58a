"""SCOPE (Deng et al., NeurIPS 2025, "SCOPE: Saliency-Coverage Oriented Token
Pruning for Efficient Multimodel LLMs").

Faithful to kinredon/SCOPE @ 6bf7306, ``scope/clip_encoder.py``
(``CLIPVisionTower_SCOPE.forward`` l.104-138 and ``SCOPE`` l.140-199):

* before the projector, on the patches of CLIP layer -2 (``hidden_states[-2]``,
  ``timm_vit`` with ``layer: -2``), saliency ``a`` = the CLS row of the same
  layer's attention, summed over heads;
* ``S`` = cosine similarity of the patch features, computed in the features'
  dtype (the official code runs in the model dtype, fp16);
* greedy facility location weighted by saliency: start with ``cur_max = 0``;
  at each of ``T`` steps the coverage gain of candidate ``i`` is
  ``gain_i = sum_j max(0, S[j, i] - cur_max_j)`` (over every patch ``j``),
  the score ``gain * a^alpha`` (env ``ALPHA`` 1.0; env ``COMBINED=add``
  gives ``gain + a^alpha``), chosen tokens score ``-inf``, the ``argmax``
  (first index on ties) is picked and ``cur_max = max(cur_max, S[best])``;
* exactly ``T`` picks; the kept patches come out in their original order
  (``masked_select``), nothing is merged.

Quirks of the official code and what arrcoc does with them:

* the budget is divided by the batch: ``int(T / bs)`` per image, where ``bs``
  is every image (LLaVA-NeXT: every view of every image) the vision tower gets
  in one call. At the published setting (LLaVA-1.5, batch 1) this is ``T``;
  elsewhere it makes an image's budget depend on what it is batched with, a
  bug. Default: ``T`` per image; ``divide_by_batch: true`` reproduces the
  official ``int(T / B)`` with ``B`` the rows of the state (a budget that
  comes out 0 is a ``BudgetError``);
* the gains are summed in the model dtype (fp16 in the official runs): copied
  (the computation runs in the features' dtype; an fp16 state gives fp16
  gains);
* the saliency is the head *sum*; the encoders expose the head *mean*. For
  ``combine: multi`` (the default) that is a constant factor on every score,
  the same ranking; for ``combine: add`` the mean is scaled back by
  ``heads`` (default: ``state.meta["num_heads"]``, which ``timm_vit`` sets),
  but not the uniform saliency of ``score: null`` (official ``torch.ones``);
* LLaVA-NeXT crops are put back on 24 x 24 grids without unpad or newline
  tokens, and the shipped NeXT script runs unpruned: not copied (arrcoc prunes
  each view like any image and the model integration places the tokens);
* no class token (SigLIP, Qwen2-VL towers): ``score: null`` is the official
  ``cls_attn=None`` path, a uniform saliency (pure coverage); ``score:
  attn_received`` is the documented alternative, VisPruner's official SigLIP
  rule: the attention each token receives in the tower's last layer (query
  mean, head mean; need ``attention_received``, which the Qwen2-VL / 2.5-VL
  towers give inside a model), a head mean like ``cls_attn`` (``combine: add``
  scales it to the head sum the same way); with the default ``score`` such a
  tower is refused with a ``MissingInputError`` that names both;
* the class token: the official output has none; arrcoc leaves it in
  ``state.cls``, apart, as every compressor does (LLaVA's default feature
  strategy does not feed it to the LLM).

Differences, on purpose: batched with ragged rows (padding never counts in a
gain and is never picked; each row stops at its own budget); a budget above an
image's tokens is a ``BudgetError`` (the official loop would pick ``-inf``
rows); a zero feature vector has cosine 0 with everything (the official
division gives NaN); ``a^alpha`` is the correctly rounded power of each entry
(``saliency_power``), not torch's CPU ``pow``, whose result depends on where
the entry falls in the batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Compressor, Keep, Params
from arrcoc.state import TokenState


#: The per-token field of the attention each token receives (need ``attention_received``), as encoders name it.
RECEIVED = "attn_received"


def cosine_matrix(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` cosine similarity of the real tokens in the features' dtype (official
    ``norm_vectors @ norm_vectors^T``); rows and columns of padding are 0."""
    norm = features.norm(dim=-1, keepdim=True)
    # A zero vector (or padding) would divide by 0: its unit vector is taken as 0 instead of NaN.
    unit = torch.where(norm > 0, features / norm.clamp_min(torch.finfo(features.dtype).tiny), 0.0)
    unit = unit * mask[..., None].to(unit.dtype)
    # The product is taken on whole tiles of rows (as ops.similarity_key does), so an entry's rounding does not
    # depend on how long the batch's longest image is: a ragged batch and the image alone get equal values.
    N = unit.shape[1]
    tiled = F.pad(unit, (0, 0, 0, -N % ops.SIMILARITY_TILE)) if N % ops.SIMILARITY_TILE else unit
    return torch.bmm(tiled, tiled.transpose(1, 2))[:, :N, :N]


def gains_workspace(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers :func:`coverage_gains` writes in, allocated once per call of :func:`scope_select`: ``[B, N, N]``
    in the similarity's dtype and ``[B, N, N]`` float64."""
    return torch.empty_like(similarity), torch.empty_like(similarity, dtype=torch.float64)


def coverage_gains(
    similarity: torch.Tensor, cur_max: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``[B, N]`` coverage gain of every candidate ``i``: ``sum_j max(0, S[j, i] - cur_max_j)`` (official
    l.177-181), in the similarity's dtype.

    ``max(0, S - cur_max)`` is taken in the similarity's dtype (the official fp16), summed in float64, rounded to
    float32 (or the dtype, if wider) and once more to the dtype: the official fp16 ``.sum`` accumulates in float32
    and rounds once. The rows are summed by halving, ``row r += row r + h`` for ``h`` = the powers of two below
    ``N`` from the largest down, each step elementwise: the association of an image's rows does not depend on the
    padding after them (a plain ``.sum``'s blocking depends on ``N``), since padding rows of ``S`` are 0 and
    ``cur_max >= 0``: in a batch the extra steps (``h`` at or above the image's own power of two) add exact zeros,
    then the image alone's steps follow, on the same values. So a ragged batch gives each image its gains alone,
    on any device. For fp16 the float64 sums are exact (every term a multiple of 2^-24 below 2), the gain is the
    exact sum rounded; for float32 / bf16 they are exact unless a positive term involves a cosine or ``cur_max``
    below ~``N`` 2^-29 (1e-6 at ``N`` = 576: nearly orthogonal tokens), and then within ~1e-13 relative of it.
    (This replaced a float32 ``cumsum`` over the rows read at each image's last real row: the same values on the
    CPU, whose scan accumulates in double, at 2-7x the time; on CUDA that scan accumulated in float32.)

    ``workspace`` (:func:`gains_workspace`) is reused across the greedy steps; allocated here if not given.
    """
    N = similarity.shape[1]
    covered, rows = gains_workspace(similarity) if workspace is None else workspace
    torch.sub(similarity, cur_max[:, :, None], out=covered).clamp_min_(0)
    rows.copy_(covered)
    live, half = N, 1 << max(N - 1, 1).bit_length() - 1  # rows >= live are 0; half: the largest power of 2 < N
    while half >= 1 and live > 1:
        rows[:, : live - half] += rows[:, half:live]  # rows [live - half, half) would add zeros: skipped
        live, half = half, half // 2
    gains = rows[:, 0] if N else rows.new_zeros(rows.shape[0], 0)
    return gains.to(torch.promote_types(similarity.dtype, torch.float32)).to(similarity.dtype)


def saliency_power(saliency: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """``a^alpha`` (official ``cls_attn ** ALPHA``) in ``dtype``, every entry a function of its own value only.

    torch's CPU ``pow`` is not: its vectorised loop runs on whole blocks of two vectors (32 floats with AVX-512)
    with the exponent rounded to float32, and the scalar loop on the rest of the tensor with the exponent in float64
    (``std::pow(float, double)``), several ulps apart at ``alpha`` 1.89. An image's powers then depend on where its row
    falls in the flattened batch (alone, 18 tokens are all tail; second in a batch of 2, most are in the first block)
    and its near-tied scores pick differently. ``exp`` and ``log`` run one kernel on every entry (a partial vector
    on the tail), so ``exp(alpha * log(a))`` is taken in float64 (elementwise, ``[B, N]``) and rounded once: within
    ~1e-15 of the exact power, so for fp32 / fp16 / bf16 the correctly rounded one but for ties at a rounding
    boundary. The exponent is ``alpha`` rounded to the computation dtype (float32 for fp16 / bf16), as the
    official CUDA ``pow`` of a model-dtype tensor by a Python float takes it. ``alpha`` 0 and 1 are exact, as
    ``torch.pow`` (``a^0 = 1``, ``0^0`` included; ``a^1 = a``).
    """
    if alpha == 0:
        return torch.ones(saliency.shape, dtype=dtype, device=saliency.device)
    if alpha == 1:
        return saliency.to(dtype)
    exponent = torch.tensor(alpha, dtype=torch.promote_types(dtype, torch.float32)).item()  # host scalar, no sync
    # log(0) = -inf gives exp(-inf) = 0 = 0^alpha (alpha > 0); a negative saliency gives NaN, as pow does for a
    # non-integer exponent (attention is never negative).
    return torch.exp(torch.log(saliency.double()) * exponent).to(dtype)


def scope_select(
    features: torch.Tensor,
    saliency: torch.Tensor,
    mask: torch.Tensor,
    budget: torch.Tensor,
    *,
    alpha: float = 1.0,
    combine: str = "multi",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy saliency-weighted coverage (official ``SCOPE``): tokens picked per image.

    Args:
        features: ``[B, N, D]`` patch features (their dtype is the computation's, as the official code).
        saliency: ``[B, N]`` CLS attention, summed over heads (any positive scale for ``combine="multi"``).
        mask: ``[B, N]`` real tokens.
        budget: ``[B]`` int64 picks per image (``1 <= budget <= real tokens``).
        alpha: exponent of the saliency (official env ``ALPHA``).
        combine: ``"multi"`` (``gain * a^alpha``, official default) or ``"add"`` (``gain + a^alpha``).

    Returns:
        ``(picked [B, K], valid [B, K])``: the indices in pick order (``K`` = the largest budget), entries past
        a row's budget invalid (0).
    """
    B, N, _ = features.shape
    dtype, device = features.dtype, features.device
    # The picks are indices: nothing here carries a gradient (the kept features are gathered by the caller), and
    # autograd would keep every step's [B, N, N] gain terms alive (and refuses the workspace's out= writes).
    features, saliency = features.detach(), saliency.detach()
    similarity = cosine_matrix(features, mask)  # [B, N, N], S[b, j, i]
    powered = saliency_power(saliency.to(dtype), alpha, dtype)  # per entry, as the image alone (see there)
    K = int(budget.max()) if budget.numel() else 0  # the loop length: one sync per call, not per step
    picked = torch.zeros(B, K, dtype=torch.int64, device=device)
    chosen = ~mask  # padding is never a candidate
    cur_max = torch.zeros(B, N, dtype=dtype, device=device)
    rows = torch.arange(B, device=device)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    workspace = gains_workspace(similarity) if K else None
    for step in range(K):  # greedy: one pick per step, all images at once
        gains = coverage_gains(similarity, cur_max, workspace)  # chosen columns are -inf below anyway
        scores = gains * powered if combine == "multi" else gains + powered
        scores = torch.where(chosen, neg_inf, scores)
        best = scores.argmax(dim=1)  # first index on ties, as the official argmax
        picked[:, step] = best
        active = step < budget  # a row past its budget picks nothing more
        chosen = chosen | (torch.nn.functional.one_hot(best, N).bool() & active[:, None])
        cur_max = torch.maximum(cur_max, similarity[rows, best])
    valid = torch.arange(K, device=device)[None, :] < budget[:, None]
    return picked.masked_fill(~valid, 0), valid


class ScopeParams(Params):
    keep: Keep = Field(
        64,
        description="Tokens each image keeps: a count (official SUBSET_RATIO 64 / 128 / 192 of 576) or a ratio "
        "of its tokens.",
    )
    alpha: float = Field(1.0, ge=0.0, description="Exponent of the saliency, a^alpha (official env ALPHA, 1.0).")
    combine: Literal["multi", "add"] = Field(
        "multi", description="gain * a^alpha ('multi', official default) or gain + a^alpha ('add', env COMBINED)."
    )
    score: str | None = Field(
        "cls_attn",
        description="per_token CLS attention, the saliency (official: layer -2, summed over heads; timm_vit's "
        "head mean with `layer: -2`); null = uniform saliency, pure coverage (the official cls_attn=None "
        "path), for towers without a class token; 'attn_received' = the attention each token receives in the "
        "tower's last layer (VisPruner's official rule without a class token; Qwen2-VL towers inside a model).",
    )
    heads: PositiveInt | None = Field(
        None,
        description="Factor from the exposed head-mean attention to the official head sum, used only by "
        "combine 'add' with a `score` ('multi' ranks the same either way; `score: null` is the official "
        "uniform saliency of ones, not scaled); default: the state's meta['num_heads'], else 1.",
    )
    divide_by_batch: bool = Field(
        False,
        description="Official quirk: each image keeps int(keep / B), B = the images (views) in the batch. Equal "
        "to keep at batch 1 (the published LLaVA-1.5 runs); off by default, as it ties a budget to the batching.",
    )


class Scope(Compressor):
    """SCOPE: greedy saliency-weighted coverage (facility location x CLS attention) (Deng et al. 2025)."""

    name = "scope"
    Params = ScopeParams
    needs = frozenset({"cls_attention"})
    stage = "vision"  # before the projector, on CLIP layer -2, as the official CLIPVisionTower_SCOPE

    def requirements(self) -> frozenset[str]:
        # score: null is the official cls_attn=None path (uniform saliency): no CLS attention needed; the
        # attention-received saliency has its own need (the encoder computes it only when asked).
        if self.params.score is None:
            return frozenset()
        return frozenset({"attention_received"}) if self.params.score == RECEIVED else self.needs

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float] | None:
        if params.get("divide_by_batch"):
            raise BudgetError(
                "scope.divide_by_batch: true makes each image's budget depend on the batch size, so no budget "
                "can be set for it; use divide_by_batch: false (the default) to sweep budgets"
            )
        return super().budget_bounds(params, context)

    def budgets(self, state: TokenState) -> torch.Tensor:
        """``[B]`` tokens each image keeps."""
        p = self.params
        budget = ops.resolve_keep(p.keep, state.counts, where="scope.keep")
        if p.divide_by_batch:
            budget = torch.div(budget, state.B, rounding_mode="floor")  # official int(T / bs)
            if state.B and bool((budget < 1).any()):
                raise BudgetError(
                    f"scope.divide_by_batch: keep={p.keep!r} divided by the {state.B} images of the batch leaves "
                    f"{int(budget.min())} tokens for an image; keep at least {state.B} tokens or set "
                    "divide_by_batch: false"
                )
        return budget

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        if p.score is None:  # official cls_attn=None: torch.ones saliency, pure coverage
            saliency = torch.ones(state.mask.shape, dtype=state.dtype, device=state.device)
        else:
            saliency = state.per_token.get(p.score)
        if saliency is None:
            raise MissingInputError(
                f"scope: needs per_token[{p.score!r}] (the CLS attention, its saliency): the timm_vit encoder "
                f"provides 'cls_attn' of its `attention_layer` (SCOPE: `layer: -2`); for a tower without a class "
                f"token there is none: set `score: null` for uniform saliency (pure coverage, the official "
                f"cls_attn=None path), or `score: {RECEIVED}` for the attention each token receives where the "
                f"encoder gives it (Qwen2-VL towers inside a model). The state has "
                f"{sorted(state.per_token) or 'none'}"
            )
        if saliency.shape != state.mask.shape:
            raise InputError(
                f"scope: per_token[{p.score!r}] must be [B, N] = {list(state.mask.shape)} scores, got "
                f"{list(saliency.shape)}"
            )
        if p.combine == "add" and p.score is not None:
            # head mean -> the official head sum (the uniform saliency of score: null is the official ones, as is)
            heads = p.heads if p.heads is not None else int(state.meta.get("num_heads", 1))
            saliency = saliency * heads
        budget = self.budgets(state)
        picked, valid = scope_select(state.tokens, saliency, state.mask, budget, alpha=p.alpha, combine=p.combine)
        # Official masked_select: the kept patches in their original order.
        selected = torch.zeros(state.mask.shape, dtype=torch.int64, device=state.device)
        selected = selected.scatter_add_(1, picked, valid.to(torch.int64)) > 0
        return ops.keep(state, *ops.pack(selected))


@hookimpl
def arrcoc_register_plugins(register):
    register(Scope)
