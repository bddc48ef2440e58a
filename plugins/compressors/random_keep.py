"""``random_keep``: keep a seeded random subset of each image's tokens (a baseline).

The usual lower bound in token-reduction papers (e.g. the "random" rows of
FastV / SparseVLM / VisionZip ablations): every real token of an image is
equally likely to be kept.  Deterministic: image ``b`` of a batch draws its
scores from a CPU generator seeded with ``seed + b`` (so images of one batch
get different draws, the same seed always gives the same result on any
device, and image ``b`` of a batch equals a one-image run with seed
``seed + b``).  Kept tokens stay in their original order.
"""

from __future__ import annotations

import torch
from pydantic import Field

from arrcoc import ops
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Keep, Params
from arrcoc.state import TokenState


def random_scores(batch: int, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[batch, n]`` uniform scores; row ``b`` comes from ``torch.Generator().manual_seed(seed + b)``.

    Drawn on the CPU so that the numbers do not depend on the device.  Row
    ``b``'s first ``m`` entries equal ``random_scores(1, m, seed + b)``: a
    padded row ranks its real tokens exactly like an unpadded one.
    """
    # (each row drawn as [1, n]: the same numbers as a draw of [n]; one image needs no stacking)
    rows = [torch.rand(1, n, generator=torch.Generator().manual_seed(seed + b)) for b in range(batch)]
    out = rows[0] if batch == 1 else torch.cat(rows) if rows else torch.zeros(0, n)
    return out if out.device == device else out.to(device)


def random_keep(state: TokenState, keep: float | int, seed: int = 0) -> TokenState:
    """Keep ``resolve_keep(keep)`` uniformly random real tokens per image (original order)."""
    k = ops.resolve_keep(keep, state.counts, where="random_keep: keep")
    scores = random_scores(state.B, state.N, seed, state.device)
    return ops.keep_topk(state, scores, k, order="position")


class RandomKeepParams(Params):
    keep: Keep = Field(0.5, description="Tokens kept per image: a ratio in (0, 1] or a count >= 1.")
    seed: int = Field(0, ge=0, description="Image b of a batch draws with seed + b.")


class RandomKeep(Compressor):
    """Keep a seeded, uniformly random subset of the tokens (baseline)."""

    name = "random_keep"
    Params = RandomKeepParams

    def __call__(self, state: TokenState) -> TokenState:
        return random_keep(state, self.params.keep, self.params.seed)


@hookimpl
def arrcoc_register_plugins(register):
    register(RandomKeep)
