"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary
in Vision Language Models").

Faithful to dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``) with ``visionzip/utils.py`` (the
patched ``CLIPAttention_forward`` returning the head-mean raw keys as
``metric``) and ``visionzip/main.py`` (``dominant - 1`` patches besides CLS):

* everything from layer -2: its softmaxed attention, its output hidden
  states, and its keys averaged over heads as the metric (``timm_vit`` with
  ``layer: -2``: ``cls_attn`` and ``keys`` of the same block);
* dominant tokens (paper Sec. 4.1): the class token counts as one of
  ``dominant``; the other ``dominant - 1`` are the patches with the most CLS
  attention summed over heads (the encoder's head mean: same ranking), kept
  in original order;
* contextual tokens (paper Sec. 4.2): the ``M`` remaining tokens in original
  order, metric L2-normalised; targets are every ``max(1, M // contextual)``-th
  of them (positions in that list, not on the grid), the first
  ``contextual``; every other remaining token goes to the target of highest
  cosine; contextual token = ``target + mean(assigned tokens)`` (the target
  itself is not in the mean; a target with nothing assigned stays as it is);
* output: dominant patches, then contextual tokens, both in original order
  (the class token stays apart in ``state.cls``).

Budgets: ``dominant`` + ``contextual`` as in the README (54 + 10 = 64,
108 + 20 = 128, 162 + 30 = 192), or ``keep`` as one total (a count, class
token included, or a ratio of the tokens) split like those presets:
``contextual = round(total * 10 / 64)``, so ``keep: 64 / 128 / 192`` are
exactly the three README settings.

How it goes through :mod:`arrcoc.ops`: :func:`visionzip_select` picks the
tokens and the assignment (a pure tensor function); :func:`arrcoc.ops.merge`
merges each assigned token into its target (``size`` conserved, ``origin``
follows, other ``per_token`` fields averaged) and, by its ``order`` key,
puts dominant before contextual; the contextual values are set to the
official ``target + mean(assigned)`` (``dataclasses.replace`` of ``tokens``
only: that sum is not a weighted average, so ``merge`` cannot produce it;
``merge`` moves zero-width tokens, so that no ``D``-wide average is computed
only to be replaced).

Differences, on purpose: batched with ragged rows (per-image ``M``); a budget
that does not fit the image (``contextual > M``, which breaks the official
shapes) is a ``BudgetError``; the state's class token is counted as one of
``dominant`` only when the state has one; the contextual values are computed
in float32 and cast back.
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field, PositiveInt, model_validator

from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Compressor, Keep, Params, budget_count
from arrcoc.state import TokenState

#: The README presets' contextual share: 10 / 64 (= 20 / 128 = 30 / 192).
CONTEXTUAL_SHARE = 10 / 64


def visionzip_select(
    cls_attn: torch.Tensor,
    metric: torch.Tensor,
    mask: torch.Tensor,
    dominant: torch.Tensor,
    contextual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dominant tokens, contextual targets and the assignment of the rest.

    Args:
        cls_attn: ``[B, N]`` CLS attention; metric ``[B, N, C]`` keys; mask ``[B, N]``.
        dominant: ``[B]`` dominant *patches* per image (class token not included).
        contextual: ``[B]`` contextual tokens per image (>= 1, <= remaining tokens).

    Returns:
        ``(dom_index [B, Kd], dom_valid, target_index [B, Kc], target_valid,
        assign [B, N])`` with indices in original order and ``assign[b, j]``
        the slot (0..contextual-1) of the target token ``j`` merges into, -1
        for dominant tokens, targets and padding.
    """
    B, N = mask.shape
    device = mask.device
    dom_index, dom_valid = ops.topk_per_row(cls_attn, dominant, mask, order="position")
    hits = torch.zeros(B, N, dtype=torch.int64, device=device)
    is_dom = hits.scatter_add_(1, dom_index.masked_fill(~dom_valid, 0), dom_valid.to(torch.int64)) > 0
    rest = mask & ~is_dom
    M = rest.sum(1)
    p = torch.cumsum(rest.to(torch.int64), 1) - 1  # position in the list of remaining tokens
    step = torch.div(M, contextual.clamp(min=1), rounding_mode="floor").clamp(min=1)
    is_target = rest & (p % step[:, None] == 0) & (torch.div(p, step[:, None], rounding_mode="floor") < contextual[:, None])
    target_index, target_valid = ops.pack(is_target)
    Kc = target_index.shape[1]
    # Official ``similarity = normalised metric @ target metric^T``, as a ranking key (equal in any batch).
    sim = ops.similarity_key(metric, ops.gather_rows(metric, target_index, target_valid))
    sim = sim.masked_fill(~target_valid[:, None, :], float("-inf"))  # [B, N, Kc]
    assign = sim.argmax(dim=-1)
    assign = torch.where(rest & ~is_target, assign, torch.full_like(assign, -1))
    return dom_index, dom_valid, target_index, target_valid, assign


def contextual_values(
    tokens: torch.Tensor, target_index: torch.Tensor, target_valid: torch.Tensor, assign: torch.Tensor
) -> torch.Tensor:
    """``target + mean(assigned tokens)`` per target ``[B, Kc, D]`` (float32; official
    ``contextual_tokens = target_hidden + aggregated_hidden``, counts clamped to 1)."""
    B, N, D = tokens.shape
    Kc = target_index.shape[1]
    device = tokens.device
    x = tokens.float().reshape(B * N, D)
    slot = torch.where(assign >= 0, assign, torch.full_like(assign, Kc))  # unassigned -> dummy slot Kc
    # Sums per (image, slot) by index_add_ over flat rows (one pass over [B * N, D]; a scatter_add_ with the
    # index expanded over D is several times slower on the CPU).
    flat_slot = (slot + (torch.arange(B, device=device) * (Kc + 1))[:, None]).reshape(-1)
    total = torch.zeros(B * (Kc + 1), D, device=device).index_add_(0, flat_slot, x).view(B, Kc + 1, D)
    count = torch.zeros(B, Kc + 1, device=device).scatter_add_(1, slot, torch.ones(B, N, device=device))
    mean = total[:, :Kc] / count[:, :Kc].clamp(min=1)[..., None]
    target = x.index_select(0, (target_index + (torch.arange(B, device=device) * N)[:, None]).reshape(-1))
    return (target.view(B, Kc, D) + mean) * target_valid[..., None]


class VisionZipParams(Params):
    dominant: PositiveInt | None = Field(
        None, description="Dominant tokens, the class token counted (README: 54, 108, 162); default 54."
    )
    contextual: PositiveInt | None = Field(
        None, description="Contextual tokens (README: 10, 20, 30); default 10."
    )
    keep: Keep | None = Field(
        None,
        description="Instead of dominant/contextual: total tokens (count, class token included, or ratio) split "
        "like the README presets, contextual = round(total * 10 / 64): 64 -> 54+10, 128 -> 108+20, 192 -> 162+30.",
    )
    score: str = Field("cls_attn", description="per_token CLS attention (official: layer -2, timm_vit `layer: -2`).")
    metric: str = Field("keys", description="per_token metric (official: layer -2 keys averaged over heads).")

    @model_validator(mode="after")
    def _one_budget(self) -> "VisionZipParams":
        if self.keep is not None and (self.dominant is not None or self.contextual is not None):
            raise ValueError(
                f"give either keep={self.keep!r} or dominant/contextual "
                f"(got dominant={self.dominant!r}, contextual={self.contextual!r}), not both"
            )
        return self


class VisionZip(Compressor):
    """VisionZip: dominant tokens by CLS attention + contextual tokens by key-similarity merging (Yang et al. 2025)."""

    name = "visionzip"
    Params = VisionZipParams
    needs = frozenset({"cls_attention", "keys"})

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        # `keep` counts the class token, which stays apart and never reaches the LLM: one more than the target.
        rest = {k: v for k, v in params.items() if k not in ("dominant", "contextual", "keep")}
        return {**rest, "keep": budget_count(target, context.tokens) + int(context.has_cls)}

    def budgets(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dominant patches [B], contextual [B])`` per image."""
        p = self.params
        has_cls = int(state.cls is not None)
        counts = state.counts
        if p.keep is None:
            dominant = torch.full_like(counts, p.dominant if p.dominant is not None else 54)
            contextual = torch.full_like(counts, p.contextual if p.contextual is not None else 10)
        else:
            total = ops.resolve_keep(p.keep, counts + has_cls, where="visionzip.keep")
            contextual = torch.floor(total.double() * CONTEXTUAL_SHARE + 0.5).to(torch.int64).clamp(min=1)
            dominant = total - contextual
        no_room = (dominant < has_cls) if p.keep is not None else torch.zeros_like(counts, dtype=torch.bool)
        dominant = dominant - has_cls
        short = dominant + contextual > counts
        # The three checks read in one device sync, raised in the order of the steps they concern.
        any_no_room, any_negative, any_short = torch.stack([no_room.any(), (dominant < 0).any(), short.any()]).tolist()
        if any_no_room:
            raise BudgetError(
                f"visionzip.keep={p.keep!r}: a total of {int(total.min())} tokens leaves no room for the class "
                f"token plus at least one contextual token"
            )
        if any_negative:
            raise BudgetError("visionzip.dominant: counts the class token, so it must be >= 1 when the state has one")
        if any_short:
            b = int(short.nonzero()[0])
            raise BudgetError(
                f"visionzip: dominant={int(dominant[b]) + has_cls} (class token "
                f"{'included' if has_cls else 'absent'}) + contextual={int(contextual[b])} need "
                f"{int(dominant[b] + contextual[b])} patch tokens, but image {b} has {int(counts[b])}"
            )
        return dominant, contextual

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        fields = {}
        for label, name, hint in (
            ("CLS attention", p.score, "the timm_vit encoder provides 'cls_attn' (VisionZip: `layer: -2`)"),
            ("metric", p.metric, "the timm_vit encoder provides 'keys', the head-mean keys of its attention_layer"),
        ):
            if name not in state.per_token:
                raise MissingInputError(
                    f"visionzip: needs per_token[{name!r}] ({label}): {hint}; the state has "
                    f"{sorted(state.per_token) or 'none'}"
                )
            fields[label] = state.per_token[name]
        attn, metric = fields["CLS attention"], fields["metric"]
        if attn.ndim != 2 or metric.ndim != 3:
            raise InputError(f"visionzip: expected {p.score} [B, N] and {p.metric} [B, N, C], got "
                             f"{list(attn.shape)} and {list(metric.shape)}")
        dominant, contextual = self.budgets(state)
        dom_index, dom_valid, target_index, target_valid, assign = visionzip_select(
            attn, metric, state.mask, dominant, contextual
        )
        values = contextual_values(state.tokens, target_index, target_valid, assign)
        # Provenance: each assigned token merges into its target.
        src_mask = assign >= 0
        src, src_valid = ops.pack(src_mask)
        dst = target_index.gather(1, assign.clamp(min=0).gather(1, src))
        # Survivors (dominant + targets) in the output order: the dominant tokens, then the targets, each in
        # original order (merge's ``order`` sort key; the sources' keys are never read).
        B, N, D = state.tokens.shape
        device = state.device
        position = torch.arange(N, device=device).expand(B, N)
        is_target = torch.zeros(B, N + 1, dtype=torch.bool, device=device)
        is_target = is_target.scatter_(1, torch.where(target_valid, target_index, N), True)[:, :N]
        order = torch.where(is_target, position + N, position)
        # The tokens' values are set below (the official sum is not an average): move zero-width tokens, so
        # that merge does not average and gather D-wide rows only to throw them away.
        bare = dataclasses.replace(state, tokens=state.tokens[..., :0], cls=None if state.cls is None else state.cls[:, :0])
        out = ops.merge(bare, src, dst, src_valid, order=order)
        # The values in the layout merge made: an image's dominant tokens (a prefix of ``dom_valid``), then
        # its contextual ones (a prefix of ``target_valid``), then zeros; one index_copy_ of each part.
        Kd, Kc, W = dom_index.shape[1], target_index.shape[1], out.N
        rows = torch.arange(B, device=device)[:, None] * W
        dummy = B * W  # invalid entries land in one extra row, dropped after
        dom_rows = torch.where(dom_valid, rows + torch.arange(Kd, device=device), dummy)
        ctx_rows = torch.where(target_valid, rows + dom_valid.sum(1, keepdim=True) + torch.arange(Kc, device=device), dummy)
        flat_dom = (dom_index + (torch.arange(B, device=device) * N)[:, None]).reshape(-1)
        all_values = torch.zeros(B * W + 1, D, device=device)
        all_values.index_copy_(0, dom_rows.reshape(-1), state.tokens.reshape(B * N, D).index_select(0, flat_dom).float())
        all_values.index_copy_(0, ctx_rows.reshape(-1), values.reshape(B * Kc, D))
        all_values = all_values[: B * W].view(B, W, D)
        return dataclasses.replace(out, tokens=all_values.to(state.dtype), cls=state.cls)


@hookimpl
def arrcoc_register_plugins(register):
    register(VisionZip)
