"""``saliency``: perspectival relevance — what the vision model itself attends to.

Two methods:

* ``cls_attention`` (default): the head-mean attention of the class token
  over the patches at the encoder's ``attention_layer`` (``per_token
  ["cls_attn"]``, or another exposed field such as ``cls_attn@5``).  It
  travels with the tokens through every op (merged tokens average it unless
  the compressor summed it).
* ``rollout``: attention rollout (Abnar & Zuidema 2020, "Quantifying
  Attention Flow in Transformers", Sec. 3): for every block ``l`` the
  head-mean attention ``A_l`` becomes ``Â_l = 0.5 A_l + 0.5 I`` (the
  residual connection), rows renormalised to sum to 1, and
  ``R = Â_L Â_{L-1} ... Â_1``; the score of patch ``j`` is the class
  token's row ``R[0, P + j]`` (``P`` prefix tokens).  The maps come from
  ``meta["attention_maps"]`` (every block run by the encoder, over the
  ORIGINAL patches), so the per-patch rollout is mapped to the current
  tokens through ``origin``: a merged token gets the **sum** of its patches'
  rollout (attention mass it now stands for; ``pool: mean`` gives the
  average instead), and dropped patches count for nothing.

Writes ``per_token["scores:saliency"]`` (float32, padded slots ``-inf``).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from arrcoc.errors import InputError, MissingInputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Scorer
from arrcoc.state import TokenState

from arrcoc.ops import patches_to_tokens

from . import masked_scores


def attention_rollout(maps: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema's rollout ``R = Â_L ... Â_1`` with ``Â = (1 - residual) A + residual I``,
    rows renormalised.  ``maps``: head-mean attention ``[B, N, N]`` of blocks 1..L in order.
    Returns float32 ``[B, N, N]``."""
    rollout = None
    for attn in maps:
        a = attn.float()
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = (1.0 - residual) * a + residual * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise MissingInputError("attention_rollout: no attention maps")
    return rollout


class SaliencyParams(Params):
    method: Literal["cls_attention", "rollout"] = Field(
        "cls_attention", description="CLS attention of one layer, or attention rollout over all blocks run."
    )
    field: str = Field(
        "cls_attn", description="method cls_attention: the per_token field to read (e.g. 'cls_attn@5')."
    )
    residual: float = Field(
        0.5, ge=0.0, le=1.0, description="method rollout: weight of the identity (residual) in 0.5*A + 0.5*I."
    )
    pool: Literal["sum", "mean"] = Field(
        "sum", description="method rollout: a merged token's score = sum (default) or mean of its patches'."
    )


class Saliency(Scorer):
    """Visual saliency: CLS attention of a layer, or attention rollout (Abnar & Zuidema 2020)."""

    name = "saliency"
    Params = SaliencyParams

    def requirements(self) -> frozenset[str]:
        return frozenset({"attention_maps" if self.params.method == "rollout" else "cls_attention"})

    def __call__(self, state: TokenState) -> TokenState:
        if self.params.method == "cls_attention":
            value = state.per_token.get(self.params.field)
            if value is None:
                raise MissingInputError(
                    f"saliency: per_token[{self.params.field!r}] is missing (have {sorted(state.per_token)}); "
                    "the timm_vit encoder provides 'cls_attn' when a stage needs 'cls_attention'"
                )
            if value.ndim != 2:
                raise InputError(f"saliency: per_token[{self.params.field!r}] must be [B, N], got {list(value.shape)}")
            scores = value.float()
        else:
            maps = state.meta.get("attention_maps")
            if not maps:
                raise MissingInputError(
                    "saliency (rollout): state.meta['attention_maps'] is missing; the timm_vit encoder "
                    "provides it when a stage needs 'attention_maps'"
                )
            prefix = int(state.meta.get("num_prefix_tokens", 0))
            if prefix < 1:
                raise MissingInputError("saliency (rollout): needs a class token (num_prefix_tokens >= 1); the model has none")
            n0 = state.origin.shape[1]
            if maps[0].shape[-1] != n0 + prefix:
                raise InputError(
                    f"saliency (rollout): attention maps cover {maps[0].shape[-1]} tokens, expected "
                    f"{n0 + prefix} (the {n0} original patches + {prefix} prefix)"
                )
            rollout = attention_rollout(maps, self.params.residual)
            per_patch = rollout[:, 0, prefix:]
            scores = patches_to_tokens(state, per_patch, self.params.pool)
        return state.with_per_token(**{"scores:saliency": masked_scores(state, scores)})


@hookimpl
def arrcoc_register_plugins(register):
    register(Saliency)
