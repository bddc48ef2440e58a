"""``information``: propositional relevance — how much a token says that its surroundings do not.

Local feature distinctiveness on the patch grid: every token is broadcast
back to the original patches it stands for (:func:`arrcoc.ops.unmerge`),
each present patch ``p`` gets

    d(p) = 1 - mean_{q in N(p)} cos(x_p, x_q)

over its present 8-neighbours ``N(p)`` (4-neighbours with ``neighbours: 4``;
dropped patches and the outside of the grid are not neighbours), and a token
gets the mean (or max, ``pool: max``) of ``d`` over its patches.  A patch
with no present neighbour has nothing to be compared with and gets ``d = 1``
(maximally distinct).  Patches inside one merged token carry the same
features, so a large merged token is distinct only along its border — as
it should be: its interior says nothing new.

It is a cheap stand-in for an information measure (cf. local entropy /
feature-contrast saliency); it needs nothing but the tokens.  Writes
``per_token["scores:information"]`` (float32, padded slots ``-inf``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from arrcoc import ops
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Scorer
from arrcoc.state import TokenState

from arrcoc.ops import patches_to_tokens

from . import masked_scores

OFFSETS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
OFFSETS_4 = ((-1, 0), (0, -1), (0, 1), (1, 0))


def distinctiveness(features: torch.Tensor, present: torch.Tensor, neighbours: int = 8, eps: float = 1e-6) -> torch.Tensor:
    """``1 - mean cos`` to the present neighbours on the grid.

    ``features`` ``[B, H, W, D]``, ``present`` ``[B, H, W]`` bool -> float32 ``[B, H, W]``
    (1 where a present patch has no present neighbour; 0 on absent patches).
    """
    B, H, W, _ = features.shape
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    # Pad by one patch on each side (absent), then compare with each shifted copy: a loop over 8 offsets.
    xp = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    pp = F.pad(present.float(), (1, 1, 1, 1))
    total = torch.zeros(B, H, W, device=x.device)
    count = torch.zeros(B, H, W, device=x.device)
    for dr, dc in OFFSETS_8 if neighbours == 8 else OFFSETS_4:
        other = xp[:, 1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W]
        valid = pp[:, 1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W]
        total += (x * other).sum(-1) * valid
        count += valid
    d = torch.where(count > 0, 1.0 - total / count.clamp_min(1.0), torch.ones_like(total))
    return d * present


class InformationParams(Params):
    neighbours: Literal[4, 8] = Field(8, description="Neighbourhood on the patch grid: 8 (default) or 4.")
    pool: Literal["mean", "max"] = Field("mean", description="A merged token's score: mean or max of its patches'.")


class Information(Scorer):
    """Local feature distinctiveness: 1 - mean cosine to the 8 grid neighbours."""

    name = "information"
    Params = InformationParams

    def __call__(self, state: TokenState) -> TokenState:
        H0, W0 = state.grid
        feats, present = ops.unmerge(state)
        d = distinctiveness(feats.view(state.B, H0, W0, state.D), present.view(state.B, H0, W0), self.params.neighbours)
        d = d.view(state.B, H0 * W0)
        if self.params.pool == "mean":
            scores = patches_to_tokens(state, d, "mean")
        else:
            sink = torch.where(present, state.origin, torch.full_like(state.origin, state.N))
            scores = torch.full((state.B, state.N + 1), float("-inf"), device=state.device)
            scores = scores.scatter_reduce(1, sink, d.masked_fill(~present, float("-inf")), "amax")[:, : state.N]
        return state.with_per_token(**{"scores:information": masked_scores(state, scores)})


@hookimpl
def arrcoc_register_plugins(register):
    register(Information)
