"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token
Pruning for Large Multimodal Models").

Faithful to vbdi/divprune @ 799e2d9, ``LLaVA/llava/model/llava_arch.py``:
``pairwise_cosine_similarity`` and ``DivPrune`` (l.147-171), called from
``prepare_inputs_labels_for_multimodal`` (l.352-385) with ``LAYER_INDEX=0``
and ``SUBSET_RATIO=0.098`` (``run_Divprune.sh``):

* where: the projected visual tokens at the LLM input (``stage =
  "projector"``), compared as they are (``metric: null``: the tokens
  themselves);
* how many: ``int(round(ratio * N))`` per image (Python's round, half to
  even), ratio 0.098 by default (56 of 576); the ratios 64/576, 128/576 and
  192/576 give exactly 64 / 128 / 192, and an int ``keep`` is a count;
* distance ``Dst = 1 - cos(x_i, x_j)`` (paper Eq. 3-4, the max-min diversity
  problem);
* first pick: the token whose nearest *other* token is farthest, i.e. the
  argmax over ``j`` of the second-smallest entry of column ``j`` (official
  ``torch.topk(m2, 2, dim=0, largest=False).values[1, :]``: the smallest is
  the self-distance, about 0);
* every later pick: ``argmax_j min_{s in S} Dst[s, j]`` (official
  ``torch.min(m2, dim=0)`` over the chosen rows, then ``torch.argmax``: the
  first index on ties); here the running minimum ``m = minimum(m, Dst[s])``
  is updated with the newest pick only (O(kN) instead of the official
  O(k^2 N) re-minimum, same picks);
* output: the chosen tokens in their original order (official
  ``keep_indexs.sort()``), selection only, nothing merged.

The official quirk, and what arrcoc does with it:

* **A token picked twice.** The official loop never masks the chosen tokens:
  a chosen token's score is its own self-distance (about 0; in fp16 it can be
  +-1e-3), so it is picked again whenever every other token's score is no
  larger (duplicates or near-duplicates of chosen tokens), and the LLM is
  then fed that token twice.  That is a bug (the budget is not spent on
  distinct tokens), and it does not shape the published numbers (it needs
  near-duplicate features).  arrcoc masks chosen tokens by default
  (``mask_chosen: true``): ``k`` distinct tokens.  ``mask_chosen: false``
  follows the official pick sequence; a token picked twice is then kept once
  (a token state holds each token once), so such an image hands on fewer than
  ``k`` tokens.  :func:`divprune_select` returns that sequence with its
  repeats.

Differences, on purpose:

* batched with ragged rows: per-image counts, padding never chosen, and the
  greedy loop runs ``max(k)`` steps for the whole batch (no host sync per
  step);
* cosines in float32 through :func:`arrcoc.ops.similarity_key` (the official
  code works in the model's dtype, fp16): the self-distance and the distance
  between duplicates are then exactly 0, so equal scores are broken by index
  in a batch and alone alike; a zero vector has cosine 0 with every token
  (official: NaN, no eps);
* an image with one token keeps it (the official ``topk(2)`` raises);
* a count above an image's tokens is a :class:`~arrcoc.errors.BudgetError`
  (official: an index error); a ratio keeps at least one token.

Not copied: the hard-coded ``SYS_TOKEN_LEN = 35`` image start (arrcoc knows
where the image is) and the batch-1 rule (row 0 decides for every row).

Multi-view images (LLaVA-NeXT): the official code selects once over the whole
flattened image at the LLM input, ``N`` = base view + unpadded crops + newline
tokens (e.g. 2340), newline tokens competing like any other token, and the
count is ``int(round(ratio * N))`` of that ``N``.  ``selection: image`` (the
default) does that: the plugin's ``packed_images`` flag asks the model
integration for each image as the one sequence the LLM receives (one state
row per image), and a kept newline token goes to the LLM as it is.
``selection: view`` selects in each view apart (base and every crop keep
``keep`` of their own tokens; the integration then packs the kept tokens with
their newlines), which is not the official method.  Images of one view
(LLaVA-1.5, Qwen2-VL, a standalone encoder) are one sequence already: both
give the same picks.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from arrcoc import ops
from arrcoc.errors import InputError, MissingInputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Keep, Params
from arrcoc.state import TokenState


def divprune_budget(keep: float | int, counts: torch.Tensor) -> torch.Tensor:
    """``[B]`` tokens each image keeps: a ratio as the official ``int(round(ratio * N))`` (half to even, at
    least 1), a count as it is (a :class:`~arrcoc.errors.BudgetError` above an image's tokens)."""
    if isinstance(keep, float) and not isinstance(keep, bool):
        ops.resolve_keep(keep, counts, where="divprune.keep")  # the ratio's range check
        # torch.round rounds half to even like Python's round; [B] elementwise in float64 (no matmul).
        return torch.round(counts.double() * keep).to(torch.int64).clamp_(min=1).minimum(counts.to(torch.int64))
    return ops.resolve_keep(keep, counts, where="divprune.keep")


def divprune_distances(metric: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` cosine distances ``1 - cos`` in float32 (official ``1.0 - pairwise_cosine_similarity``).

    Through :func:`arrcoc.ops.similarity_key`, so a token's self-distance and the distance between duplicates
    are exactly 0 and an entry does not depend on the batch's padding.
    """
    x = metric.float()
    return 1.0 - ops.similarity_key(x, x)


def divprune_select(
    distance: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, *, mask_chosen: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min selection (official ``DivPrune``), batched.

    Args:
        distance: ``[B, N, N]`` distances, ``distance[b, s, j]`` from token ``s`` to token ``j``.
        mask: ``[B, N]`` real tokens (padding is never chosen and never anyone's nearest token).
        k: ``[B]`` int64 picks per image (``1 <= k <= count``).
        mask_chosen: a chosen token is never picked again (arrcoc's default); ``False`` follows the official
            loop, whose chosen tokens keep their self-distance as score and come back when no other token
            scores higher.

    Returns:
        ``(index [B, K], valid [B, K])`` in pick order, ``K = max(k)``; ``valid[b, t]`` is ``t < k[b]``.
        With ``mask_chosen=False`` a row may repeat an index.
    """
    B, N, _ = distance.shape
    device = distance.device
    K = int(k.max()) if B else 0  # the loop's length: one host sync per call
    real_rows = mask[:, :, None]
    if N >= 2:
        # First pick: per column j, the second-smallest distance over the real tokens i (the smallest is j's own).
        column = distance.masked_fill(~real_rows, float("inf"))
        score = torch.topk(column, 2, dim=1, largest=False).values[:, 1, :]
    else:
        score = torch.full((B, N), float("inf"), dtype=distance.dtype, device=device)
    padding = ~mask
    score = score.masked_fill(padding, float("-inf"))
    index = torch.zeros(B, K, dtype=torch.int64, device=device)
    chosen = torch.zeros(B, N, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    nearest = None
    for step in range(K):
        if step:
            # min over the chosen rows of Dst[s, j], updated with the newest pick s only.
            newest = distance[rows, pick]
            nearest = newest if nearest is None else torch.minimum(nearest, newest)
            blocked = padding | chosen if mask_chosen else padding
            score = nearest.masked_fill(blocked, float("-inf"))
        pick = score.argmax(dim=1)  # the first index among equal scores
        index[:, step] = pick
        if mask_chosen:
            chosen[rows, pick] = True
    valid = torch.arange(K, device=device)[None, :] < k[:, None]
    return index, valid


class DivPruneParams(Params):
    keep: Keep = Field(
        0.098,
        description="Tokens kept per image: a ratio, counted as the official int(round(ratio * N)) (SUBSET_RATIO "
        "0.098 = 56 of 576; 64/576 = 64), or a count.",
    )
    mask_chosen: bool = Field(
        True,
        description="Never pick a chosen token again (arrcoc's fix). false = the official loop, which can pick "
        "a token twice (its score is its self-distance, ~0); such a token is kept once, so the image keeps "
        "fewer than `keep` tokens.",
    )
    metric: str | None = Field(
        None,
        description="What the cosine distances compare: null = the tokens themselves (official: the projected "
        "features at the LLM input), or the name of a per_token field [B, N, C].",
    )
    selection: Literal["image", "view"] = Field(
        "image",
        description="Multi-view images (LLaVA-NeXT): 'image' = one selection over the whole sequence the LLM "
        "receives (base view, unpadded crops, newline tokens; official, `keep` counted on that length); 'view' = "
        "each view (base, every crop) apart. The same for one-view images.",
    )


class DivPrune(Compressor):
    """DivPrune: keep the most diverse tokens by greedy max-min cosine distance (Alvar et al. 2025)."""

    name = "divprune"
    Params = DivPruneParams
    stage = "projector"  # in a VLM: the projected features at the LLM input, where the official code acts

    @property
    def packed_images(self) -> bool:
        """Whether a model integration hands this stage each image as the one sequence the LLM receives (official:
        one global selection over LLaVA-NeXT's flattened image) rather than one row per view."""
        return self.params.selection == "image"

    def _metric(self, state: TokenState) -> torch.Tensor:
        name = self.params.metric
        if name is None:
            return state.tokens
        value = state.per_token.get(name)
        if value is None:
            raise MissingInputError(
                f"divprune.metric: needs per_token[{name!r}] to compare tokens by; the state has "
                f"{sorted(state.per_token) or 'none'} (metric: null compares the tokens themselves; multi-view "
                "images packed for selection: image are the LLM's sequences and carry no per-token fields)"
            )
        if value.ndim != 3 or not value.is_floating_point():
            raise InputError(
                f"divprune.metric: expected per_token[{name!r}] as floating [B, N, C] features, got "
                f"{value.dtype} {list(value.shape)}"
            )
        return value

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        k = divprune_budget(p.keep, state.counts)
        index, valid = divprune_select(divprune_distances(self._metric(state)), state.mask, k,
                                       mask_chosen=p.mask_chosen)
        # The kept set in original order (official ``keep_indexs.sort()``); a repeated pick is kept once.
        B, N = state.mask.shape
        chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=state.device)
        chosen = chosen.scatter_(1, index.masked_fill(~valid, N), True)[:, :N]
        return ops.keep(state, *ops.pack(chosen))


@hookimpl
def arrcoc_register_plugins(register):
    register(DivPrune)
