"""HiRED: High-to-low Resolution Elastic Dependency (Arif et al., AAAI 2025,
"HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models").

Faithful to hasanar1f/HiRED (the patched ``transformers`` models):

* LLaVA-1.5 (``models/llava/modeling_llava.py``, ``HiRED_token_selection``):
  keep the top ``int(N * token_budget_rate)`` patches by the CLS attention of
  ViT layer 22 (of 24, i.e. ``hidden_states[-2]``'s own block), rate 0.2 by
  default (paper Sec. 3.2, "token dropping");
* LLaVA-NeXT (``models/llava_next/modeling_llava_next.py``,
  ``HiRED_token_selection`` + ``HiRED_sub_img_budgets``; paper Sec. 3.1,
  "token budget distribution"): a full image plus ``P - 1`` sub-images share
  ``total = int(P * N * rate)`` tokens; the full image gets ``min(int(total *
  alpha), N)`` (alpha 0.5), the sub-images ``min(total - full, (P - 1) * N)``
  in proportion to how many of the full image's top ``int(N * (1 - alpha))``
  tokens by **layer-0** CLS attention fall into each sub-image's share of the
  full image, floored (``int()``) and clamped to ``N``; then every image keeps
  its top tokens by layer-22 CLS attention. Selection only: the kept tokens
  stay in their original order, nothing is merged.

Partitions in arrcoc: a single image is its own partition (``crops: null``,
or ``auto`` without a view layout). Inside a LLaVA-NeXT model (``arrcoc.hf``)
``crops: auto`` (the default) reads each image's actual crop grid from
``meta["views"]``, so a batch may mix grids. By hand, set ``crops: [rows, cols]`` and
stack each image's views consecutively in the batch: ``[full, crop_1, ...,
crop_K]`` with ``K = rows * cols`` crops in raster order, then the next
image's views. The batch must hold a whole number of such groups.

A sub-image's "share" of the full image is, as in the official code, a flat
chunk of the full image's raster order (``reshape(rows, cols, -1)`` of the 576
tokens: chunk ``k`` = tokens ``[k * N0 / K, (k + 1) * N0 / K)``, i.e.
horizontal bands), which is the default ``mapping: flat``; ``mapping: grid``
uses the 2-D cell of the crop grid the token lies in, which is what the
sub-images actually cover. A token's raster index is read from its
``positions`` (so the split also works after an earlier stage merged
tokens).

Differences, on purpose:

* the official code sums the attention over heads; the ``timm_vit`` encoder
  exposes the head mean, which is the sum divided by the number of heads —
  the same ranking and the same selection;
* a ratio keeps at least one token per single image
  (:func:`arrcoc.ops.resolve_keep`); the official ``int(N * rate)`` can be 0;
* with ragged rows (an earlier stage pruned), ``N`` is each row's real token
  count, and the group total is ``int(rate * sum of the group's counts)``
  (equal to the official ``int(P * N * rate)`` when all rows hold ``N``);
* a count ``keep: k`` means ``k`` tokens per image (single images) or per
  group (``crops`` set).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt

from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Keep, Params
from arrcoc.state import TokenState


def hired_single_budget(counts: torch.Tensor, keep: float | int) -> torch.Tensor:
    """LLaVA-1.5 budget: ``int(N * rate)`` per image (at least 1), or a count."""
    return ops.resolve_keep(keep, counts, where="hired.keep")


def hired_group_budgets(
    counts: torch.Tensor,
    early_attn: torch.Tensor,
    mask: torch.Tensor,
    chunk: torch.Tensor,
    num_crops: int,
    keep: float | int,
    alpha: float,
) -> torch.Tensor:
    """Tokens each view keeps in LLaVA-NeXT groups ``[full, crop_1..crop_K]``
    (official ``HiRED_token_selection`` / ``HiRED_sub_img_budgets``).

    Args:
        counts: ``[G, P]`` real tokens per view, ``P = 1 + K``.
        early_attn: ``[G, N]`` the full image's early-layer (layer 0) CLS attention.
        mask: ``[G, N]`` real tokens of the full image.
        chunk: ``[G, N]`` int64, which sub-image (0..K-1) each full-image token maps to.
        num_crops: ``K``.
        keep: ratio (``token_budget_rate``) or count (per group).
        alpha: share of the total budget for the full image.

    Returns:
        ``[G, P]`` int64 budgets.
    """
    G, P = counts.shape
    group_tokens = counts.sum(1)
    if isinstance(keep, float):
        total = torch.floor(group_tokens.double() * keep).to(torch.int64)  # int(P * N * rate)
    else:
        if bool((group_tokens < keep).any()):
            raise BudgetError(
                f"hired.keep: asked to keep {keep} tokens per group, but a group (full image + "
                f"{num_crops} crops) has only {int(group_tokens.min())}"
            )
        total = torch.full_like(group_tokens, keep)
    n_full = counts[:, 0]
    full = torch.minimum(torch.floor(total.double() * alpha).to(torch.int64), n_full)
    sub = torch.minimum(total - full, counts[:, 1:].sum(1))
    # Spatial distribution: the full image's top int(N * (1 - alpha)) tokens by layer-0 attention.
    n_spatial = torch.floor(n_full.double() * (1.0 - alpha)).to(torch.int64)
    if bool(((n_spatial < 1) & (sub > 0)).any()):
        raise BudgetError(
            f"hired: alpha={alpha} leaves int(N * (1 - alpha)) = 0 tokens of the full image to split the "
            f"sub-images' budget by; use a smaller alpha"
        )
    index, valid = ops.topk_per_row(early_attn, n_spatial, mask)
    hits = torch.zeros(G, num_crops, dtype=torch.int64, device=counts.device)
    hits.scatter_add_(1, chunk.gather(1, index), valid.to(torch.int64))
    # Official arithmetic: float32 ratio (int64 / int64), times the budget, truncated by .int().
    ratio = hits.float() / hits.sum(1, keepdim=True).clamp_min(1).float()
    crops = (ratio * sub[:, None].float()).to(torch.int64)
    crops = torch.minimum(crops, counts[:, 1:]).masked_fill((sub <= 0)[:, None], 0)
    return torch.cat([full[:, None], crops], 1)


def crop_of_positions(positions: torch.Tensor, grid: tuple[int, int], crops: tuple[int, int], mapping: str) -> torch.Tensor:
    """Which of the ``rows x cols`` sub-images each token (by its grid position) belongs to.

    ``flat``: the official reshape of raster order into ``K`` contiguous chunks;
    ``grid``: the 2-D cell of the crop grid.
    """
    H0, W0 = grid
    rows, cols = crops
    r = positions[..., 0].round().to(torch.int64).clamp(0, H0 - 1)
    c = positions[..., 1].round().to(torch.int64).clamp(0, W0 - 1)
    if mapping == "flat":
        return torch.div((r * W0 + c) * (rows * cols), H0 * W0, rounding_mode="floor")
    return torch.div(r * rows, H0, rounding_mode="floor") * cols + torch.div(c * cols, W0, rounding_mode="floor")


class HiREDParams(Params):
    keep: Keep = Field(
        0.2,
        description="Token budget: a ratio of each image's tokens (official token_budget_rate 0.2) or a count "
        "(per image; per group of views when `crops` is set).",
    )
    score: str = Field(
        "cls_attn",
        description="per_token CLS attention that picks the tokens (official: layer 22 of 24, the block of "
        "hidden_states[-2]; timm_vit's `cls_attn` with `layer: -2`).",
    )
    crops: tuple[PositiveInt, PositiveInt] | Literal["auto"] | None = Field(
        "auto",
        description="LLaVA-NeXT-style sub-image grid [rows, cols]: the batch holds groups [full image, "
        "rows*cols crops in raster order]; 'auto' = each image's own grid from meta['views'] (set by the "
        "LLaVA-NeXT integration; images without it are single partitions); null = every image alone (LLaVA-1.5).",
    )
    alpha: float = Field(0.5, gt=0.0, lt=1.0, description="Share of a group's budget for the full image (official 0.5).")
    early_score: str = Field(
        "cls_attn@0",
        description="per_token early-layer CLS attention that splits the budget among crops (official layer 0; "
        "timm_vit's `extra_attention_layers: [0]`). Used only with `crops`.",
    )
    mapping: Literal["flat", "grid"] = Field(
        "flat",
        description="Full-image tokens -> sub-image: 'flat' chunks of raster order (official reshape) or 'grid' "
        "(the 2-D crop cell the token lies in).",
    )


class HiRED(Compressor):
    """HiRED: CLS-attention token dropping with a budget split across image partitions (Arif et al. 2025)."""

    name = "hired"
    Params = HiREDParams
    needs = frozenset({"cls_attention"})

    def _field(self, state: TokenState, name: str, hint: str) -> torch.Tensor:
        value = state.per_token.get(name)
        if value is None:
            raise MissingInputError(
                f"hired: needs per_token[{name!r}] ({hint}); the state has {sorted(state.per_token) or 'none'}"
            )
        if value.ndim != 2:
            raise InputError(f"hired: per_token[{name!r}] must be [B, N] scores, got shape {list(value.shape)}")
        return value

    def budgets(self, state: TokenState) -> torch.Tensor:
        """``[B]`` tokens each image keeps."""
        p = self.params
        layout = state.meta.get("views") if p.crops == "auto" else None
        if p.crops is None or (p.crops == "auto" and layout is None):
            return hired_single_budget(state.counts, p.keep)
        if layout is not None:
            # Each image's own crop grid (images of one batch may differ): one group at a time.
            budgets, row = [], 0
            for grid in layout:
                P = 1 + grid[0] * grid[1]
                budgets.append(self._group_budgets(state, row, P, tuple(grid)))
                row += P
            if row != state.B:
                raise InputError(f"hired: meta['views'] describes {row} views, the batch holds {state.B}")
            return torch.cat(budgets)
        rows, cols = p.crops
        P = 1 + rows * cols
        if state.B % P:
            raise InputError(
                f"hired.crops={list(p.crops)}: the batch must hold groups of {P} views (full image + "
                f"{rows * cols} crops), got {state.B} images"
            )
        early = self._field(
            state, p.early_score,
            "the early-layer CLS attention that splits the budget among crops: set the timm_vit encoder's "
            "`extra_attention_layers: [0]`",
        )
        G = state.B // P
        full_rows = torch.arange(G, device=state.device) * P
        chunk = crop_of_positions(state.positions[full_rows], state.grid, p.crops, p.mapping)
        budgets = hired_group_budgets(
            state.counts.view(G, P), early[full_rows].float(), state.mask[full_rows], chunk,
            rows * cols, p.keep, p.alpha,
        )
        return budgets.reshape(-1)

    def _group_budgets(self, state: TokenState, row: int, P: int, grid: tuple[int, int]) -> torch.Tensor:
        """Budgets of the views ``row .. row + P - 1`` (one image and its ``grid`` of crops)."""
        p = self.params
        if P == 1:
            return hired_single_budget(state.counts[row:row + 1], p.keep)
        early = self._field(state, p.early_score, "the early-layer CLS attention that splits the budget among crops: "
                            "set the encoder's `extra_attention_layers: [0]`")
        full = slice(row, row + 1)
        chunk = crop_of_positions(state.positions[full], state.grid, grid, p.mapping)
        return hired_group_budgets(state.counts[row:row + P].view(1, P), early[full].float(), state.mask[full], chunk,
                                   grid[0] * grid[1], p.keep, p.alpha).reshape(-1)

    def __call__(self, state: TokenState) -> TokenState:
        scores = self._field(
            state, self.params.score,
            "CLS attention of the selection layer: the timm_vit encoder provides 'cls_attn' of its "
            "`attention_layer` (default: `layer`) when a stage needs cls_attention",
        )
        return ops.keep_topk(state, scores, self.budgets(state), order="position")


@hookimpl
def arrcoc_register_plugins(register):
    register(HiRED)
