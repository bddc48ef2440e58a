"""A stand-in ``mipmap`` pyramid for when the real one (plugins/pyramids/mipmap.py) is not installed.

It follows the pyramid contract (2x2 box filter per level, ``tex2DLod``
sampling: clamp-to-edge, bilinear inside a level, linear between levels) in
the plainest torch, and is registered only if no ``mipmap`` exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import arrcoc
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Pyramid


@dataclass(frozen=True)
class StandInChain:
    levels: tuple
    backend: str = "torch"


class StandInParams(Params):
    backend: Literal["auto", "torch", "cupy"] = "auto"


class StandInMipmap(Pyramid):
    name = "mipmap"
    Params = StandInParams

    def build(self, features):
        levels = [features]
        while levels[-1].shape[-1] > 1 or levels[-1].shape[-2] > 1:
            x = levels[-1]
            h, w = x.shape[-2:]
            x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
            levels.append(F.avg_pool2d(x, 2))
        return StandInChain(tuple(levels))

    def sample(self, chain, uv, lod):
        grid = (uv * 2 - 1)[:, None]  # [B, 1, K, 2]
        per_level = torch.stack(
            [F.grid_sample(lv, grid.to(lv.dtype), mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]
             for lv in chain.levels], 0
        )  # [L, B, C, K]
        lod = lod.clamp(0, len(chain.levels) - 1)
        lo = lod.floor().long()
        hi = (lo + 1).clamp(max=len(chain.levels) - 1)
        frac = (lod - lo)[:, None, :]
        b = torch.arange(uv.shape[0])[:, None]
        k = torch.arange(uv.shape[1])[None, :]
        a = per_level.permute(1, 3, 2, 0)[b, k, :, lo]  # [B, K, C]
        c = per_level.permute(1, 3, 2, 0)[b, k, :, hi]
        return a + (c - a) * frac.transpose(1, 2)


class _StandInModule:
    @staticmethod
    @hookimpl
    def arrcoc_register_plugins(register):
        register(StandInMipmap)


def ensure_mipmap() -> None:
    registry = arrcoc.get_registry()
    if "mipmap" not in registry.names("pyramid"):
        registry.register(_StandInModule, name="test-standin-mipmap")
