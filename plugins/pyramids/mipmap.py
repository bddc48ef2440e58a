"""``mipmap``: a mipmap pyramid of a feature grid, sampled like GPU ``tex2DLod``.

The homunculus allocator builds one pyramid over the feature grid
``[B, D, H, W]`` (and optionally over the image) and reads each region's
tokens as texture samples ``sample(u, v, lod)``: level of detail where the
relevance is.

* :meth:`Mipmap.build` -- mipmap generation (``glGenerateMipmap``): level 0 is
  the input, every next level ``max(1, n // 2)`` per axis, a 2x2 box filter
  (a 3-tap polyphase box on odd sizes, so each level is the exact area
  average of the previous one and the 1 x 1 top is the mean of the grid);
  non-square grids halve each axis on its own (5 x 7 -> 2 x 3 -> 1 x 1); a
  1 x 1 grid gives a one-level chain.
* :meth:`Mipmap.sample` -- CUDA ``tex2DLod`` with linear filtering,
  clamp-to-edge addressing, normalised coordinates and trilinear mipmap
  filtering: ``uv = (u, v)`` with ``u`` along the width, texel centres at
  ``((j + 0.5) / w, (i + 0.5) / h)``, ``lod`` clamped to ``[0, L - 1]``.

The semantics, the odd-size rule and the precision are spelt out in
:mod:`arrcoc_plugins.pyramids.torch_mipmap`; ``docs/pyramid.md`` is the user's
version. Backends: ``torch`` (any device) and ``cupy`` (CUDA RawKernels,
:mod:`arrcoc_plugins.pyramids.cupy_mipmap`); ``auto`` takes CuPy when it
imports, sees a GPU and the features are on CUDA, torch otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from arrcoc.errors import InputError, ModelError, StateError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Pyramid

from . import cupy_mipmap, torch_mipmap

BACKENDS = ("torch", "cupy")


@dataclass(frozen=True)
class MipChain:
    """A built pyramid: ``levels[0]`` is the input ``[B, C, H, W]``, ``levels[-1]`` is ``[B, C, 1, 1]``.

    ``backend`` is the backend that built it and that :meth:`Mipmap.sample` uses.
    """

    levels: tuple[torch.Tensor, ...]
    backend: str

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def max_lod(self) -> float:
        """The largest useful ``lod``: ``num_levels - 1`` (larger values are clamped to it)."""
        return float(len(self.levels) - 1)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """``(h, w)`` of every level."""
        return tuple((int(x.shape[-2]), int(x.shape[-1])) for x in self.levels)


class MipmapParams(Params):
    backend: Literal["auto", "torch", "cupy"] = Field(
        "auto",
        description="'torch' (any device), 'cupy' (CUDA RawKernels; needs CuPy and a GPU), or 'auto': "
        "cupy when CuPy imports, sees a GPU and the features are on CUDA, torch otherwise.",
    )


class Mipmap(Pyramid):
    """Mipmap pyramid (2x2 box per level) sampled with GPU tex2DLod semantics (trilinear, clamp-to-edge)."""

    name = "mipmap"
    Params = MipmapParams

    def __init__(self, params: MipmapParams | None = None, /, **kwargs) -> None:
        super().__init__(params, **kwargs)
        if self.params.backend == "cupy":
            ok, reason = cupy_mipmap.available()
            if not ok:
                raise ModelError(
                    f"pyramid 'mipmap': backend 'cupy' needs CuPy and a CUDA GPU, but {reason}; "
                    "install arrcoc[gpu] on a machine with a GPU, or use backend: torch (or auto)"
                )

    def backend_for(self, features: torch.Tensor) -> str:
        """The backend :meth:`build` uses for ``features``."""
        if self.params.backend == "torch":
            return "torch"
        if self.params.backend == "cupy":
            if features.device.type != "cuda":
                raise InputError(
                    f"pyramid 'mipmap': backend 'cupy' needs features on a CUDA device, got them on "
                    f"{features.device}; move them with .cuda() or use backend: torch (or auto)"
                )
            return "cupy"
        if features.device.type == "cuda" and cupy_mipmap.available()[0]:
            return "cupy"
        return "torch"

    def build(self, features: torch.Tensor) -> MipChain:
        """``features [B, C, H, W]`` (floating, finite) -> every mip level, down to 1 x 1.

        Channels-last features (e.g. tokens ``[B, H*W, C]`` viewed as
        ``[B, H, W, C]`` and permuted to ``[B, C, H, W]``, no copy) are the fastest
        to build from and sample.
        """
        torch_mipmap.check_features(features)
        backend = self.backend_for(features)
        module = cupy_mipmap if backend == "cupy" else torch_mipmap
        return MipChain(levels=tuple(module.build_mipmap(features)), backend=backend)

    def sample(self, chain: MipChain, uv: torch.Tensor, lod: torch.Tensor) -> torch.Tensor:
        """``tex2DLod``: ``uv [B, K, 2]`` (u along the width), ``lod [B, K]`` -> ``[B, K, C]``."""
        if not isinstance(chain, MipChain):
            raise StateError(f"pyramid 'mipmap': sample needs the MipChain from build(), got {type(chain).__name__}")
        if chain.backend not in BACKENDS:
            raise StateError(f"pyramid 'mipmap': unknown chain backend {chain.backend!r}; expected one of {BACKENDS}")
        module = cupy_mipmap if chain.backend == "cupy" else torch_mipmap
        return module.sample_mipmap(chain.levels, uv, lod)


@hookimpl
def arrcoc_register_plugins(register):
    register(Mipmap)
