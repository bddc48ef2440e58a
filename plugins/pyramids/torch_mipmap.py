"""Mipmap pyramid of a feature grid in plain torch: build and ``tex2DLod`` sampling.

Two pure functions (any device, fp32 / fp64 / fp16 / bf16, batched,
deterministic) that the ``mipmap`` pyramid plugin
(:mod:`arrcoc_plugins.pyramids.mipmap`) wraps; the CuPy backend
(:mod:`arrcoc_plugins.pyramids.cupy_mipmap`) computes the same numbers.

:func:`build_mipmap` -- mipmap generation (``glGenerateMipmap``)
    Level 0 is the input itself (no copy); level ``l + 1`` has size
    ``max(1, h // 2) x max(1, w // 2)`` -- the size rule of OpenGL, Direct3D
    and CUDA mipmapped arrays -- and each of its texels is the *area average*
    of level ``l`` over the texel's footprint. Per axis (separable) that is:

    * even ``n``: the 2-tap box ``(x[2j] + x[2j+1]) / 2``;
    * odd ``n = 2m + 1`` (``m >= 1``): the 3-tap polyphase box of NVIDIA's
      "Non-Power-of-Two Mipmapping" note, ``((m - j) x[2j] + m x[2j+1] +
      (j + 1) x[2j+2]) / n``: output texel ``j`` covers input texels
      ``[j n/m, (j+1) n/m)``, so every input texel is counted with its exact
      overlap and the normalised-uv footprint of every texel is the same at
      every level (a texel centre stays where :func:`sample_mipmap` assumes);
    * ``n = 1``: unchanged (the other axis still halves).

    Because each level is an exact area average of the previous one, the last
    level (1 x 1) is the mean of level 0 over H x W, for any H and W. The
    chain has ``floor(log2(max(H, W))) + 1`` levels; a 1 x 1 grid has one.

:func:`sample_mipmap` -- CUDA ``tex2DLod(tex, u, v, lod)`` with
``cudaFilterModeLinear``, ``cudaAddressModeClamp``, normalised coordinates and
``mipmapFilterMode = cudaFilterModeLinear`` (trilinear):

    * ``uv = (u, v)`` in [0, 1]: ``u`` along the width (columns), ``v`` along
      the height (rows); texel ``(i, j)`` of an ``h x w`` level has its centre
      at ``((j + 0.5) / w, (i + 0.5) / h)``;
    * bilinear inside a level between the 4 texels around
      ``(x, y) = (u w - 0.5, v h - 0.5)``; clamp-to-edge addressing (indices
      are clamped after the weights are taken, so outside [0, 1] the edge
      texels repeat);
    * ``lod`` clamped to ``[0, L - 1]`` and blended linearly between levels
      ``floor(lod)`` and ``floor(lod) + 1``.

    Differences from the hardware, on purpose: weights are computed in fp32
    (fp64 for fp64 levels) instead of the texture unit's 8-bit fixed point,
    and ``lod`` is used as given (no LOD bias / anisotropy).

Precision: fp16 / bf16 levels are computed in fp32 from the stored previous
level and rounded once per level; sampling reads the stored texels and
accumulates in fp32. fp32 and fp64 compute in their own precision.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from arrcoc.errors import InputError, StateError

#: dtypes both backends support (levels and samples keep the features' dtype).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ geometry
def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Sizes of every level: ``(H, W)``, then ``max(1, n // 2)`` per axis, down to 1 x 1."""
    shapes = [(height, width)]
    while height > 1 or width > 1:
        height, width = max(1, height // 2), max(1, width // 2)
        shapes.append((height, width))
    return shapes


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- validation
def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


def check_features(features: object) -> torch.Tensor:
    """``features`` must be a floating ``[B, C, H, W]`` tensor with every dimension >= 1."""
    if not isinstance(features, torch.Tensor):
        raise InputError(f"mipmap: features must be a torch.Tensor [B, C, H, W], got {_describe(features)}")
    if features.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise InputError(f"mipmap: features must be floating ({names}), got {_describe(features)}")
    if features.dim() != 4:
        raise InputError(f"mipmap: features must be 4-D [B, C, H, W], got {_describe(features)}")
    if min(features.shape) < 1:
        raise InputError(f"mipmap: every dimension of features [B, C, H, W] must be >= 1, got {_describe(features)}")
    return features


def check_finite(top: torch.Tensor, features: torch.Tensor) -> None:
    """Raise if ``features`` hold NaN or inf, read off the 1 x 1 top level.

    Every input texel reaches the top with a positive weight, so a NaN (or
    inf) anywhere in ``features`` makes the top non-finite: one small check
    instead of a pass over the whole input (one device sync on CUDA).
    """
    bad = ~torch.isfinite(top.reshape(top.shape[0], top.shape[1]))
    if bool(bad.any()):
        b, c = (int(v) for v in bad.nonzero()[0])
        where = features[b, c]
        n_nan, n_inf = int(torch.isnan(where).sum()), int(torch.isinf(where).sum())
        raise InputError(
            f"mipmap: features must be finite; batch item {b}, channel {c} of {_describe(features)} "
            f"holds {n_nan} NaN and {n_inf} inf values"
            + ("" if n_nan or n_inf else " (finite values whose average overflows)")
        )


def check_levels(levels: object) -> tuple[torch.Tensor, ...]:
    """A non-empty sequence of ``[B, C, h, w]`` tensors sharing B, C, dtype and device."""
    if not isinstance(levels, (tuple, list)) or not levels:
        raise StateError(f"mipmap: levels must be a non-empty tuple of [B, C, h, w] tensors, got {_describe(levels)}")
    first = levels[0]
    check_features(first)
    for i, level in enumerate(levels):
        if not isinstance(level, torch.Tensor) or level.dim() != 4 or min(level.shape) < 1:
            raise StateError(f"mipmap: level {i} must be a [B, C, h, w] tensor, got {_describe(level)}")
        if level.shape[:2] != first.shape[:2] or level.dtype != first.dtype or level.device != first.device:
            raise StateError(
                f"mipmap: every level must share B, C, dtype and device with level 0 ({_describe(first)}); "
                f"level {i} is {_describe(level)}"
            )
    return tuple(levels)


def check_samples(levels: Sequence[torch.Tensor], uv: object, lod: object) -> None:
    """``uv [B, K, 2]`` and ``lod [B, K]``: floating, finite, on the levels' device, B matching."""
    first = levels[0]
    batch = first.shape[0]
    for name, value, want in (("uv", uv, "[B, K, 2]"), ("lod", lod, "[B, K]")):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"mipmap.sample: {name} must be a torch.Tensor {want}, got {_describe(value)}")
        if not value.is_floating_point():
            raise InputError(f"mipmap.sample: {name} must be floating, got {_describe(value)}")
        if value.device != first.device:
            raise StateError(
                f"mipmap.sample: {name} must be on the pyramid's device {first.device}, got {_describe(value)}"
            )
    if uv.dim() != 3 or uv.shape[0] != batch or uv.shape[2] != 2:
        raise StateError(f"mipmap.sample: uv must be [B={batch}, K, 2] (u, v) per sample, got {_describe(uv)}")
    if lod.shape != uv.shape[:2]:
        raise StateError(
            f"mipmap.sample: lod must be [B, K] = {list(uv.shape[:2])} like uv, got {_describe(lod)}"
        )
    for name, value in (("uv", uv), ("lod", lod)):
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            index = tuple(int(v) for v in (~finite).nonzero()[0])
            raise InputError(f"mipmap.sample: {name} must be finite, got {value[index].item()} at index {index}")


# --------------------------------------------------------------------- build
def _is_channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _filter_axis(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Halve axis ``dim`` (-2 rows, -1 columns) with the box / polyphase taps; result in ``dtype``."""
    n = x.shape[dim]
    if n == 1:
        return x.to(dtype)
    m = n // 2

    def tap(start: int) -> torch.Tensor:  # x[2j + start] for j < m, a strided view
        index = [slice(None)] * x.dim()
        index[dim] = slice(start, start + 2 * m - 1, 2)
        return x[tuple(index)]

    if n % 2 == 0:
        out = tap(0) + tap(1) if x.dtype == dtype else tap(0).to(dtype).add_(tap(1))
        return out.mul_(0.5)
    # n = 2m + 1: weights (m - j) / n, m / n, (j + 1) / n -- they sum to 1 for every j.
    j = torch.arange(m, device=x.device, dtype=dtype)
    shape = [m, 1] if dim == -2 else [m]
    out = tap(0) * ((m - j) / n).view(shape)
    out.add_(tap(1), alpha=m / n)
    return out.addcmul_(tap(2), ((j + 1) / n).view(shape))


def _down(x: torch.Tensor) -> torch.Tensor:
    """One mip level: ``[B, C, h, w] -> [B, C, max(1, h//2), max(1, w//2)]``, same dtype and memory format."""
    h, w = x.shape[-2:]
    if h % 2 == 0 and w % 2 == 0 and x.dtype in (torch.float32, torch.float64) and (
        x.is_cuda or _is_channels_last(x)
    ):
        # One pass, exactly the 2x2 box; fast on CUDA and for channels_last on CPU
        # (channels-first avg_pool2d on CPU is several times slower than the slices below).
        return F.avg_pool2d(x, 2)
    dtype = compute_dtype(x.dtype)
    # Rows first: in channels-first memory each row pair is two contiguous runs
    # (vectorised adds over the full input); the strided column pass then reads half as much.
    out = _filter_axis(_filter_axis(x, -2, dtype), -1, dtype)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def build_mipmap(features: torch.Tensor, *, check: bool = True) -> tuple[torch.Tensor, ...]:
    """All mip levels of ``features [B, C, H, W]``, level 0 being ``features`` itself.

    See the module docstring for the size rule and the odd-size filter. Levels
    keep the dtype, device and memory format (channels-first or channels_last)
    of the input. With ``check`` (default) non-finite features raise
    :class:`~arrcoc.errors.InputError`.
    """
    check_features(features)
    levels = [features]
    for _ in level_shapes(*features.shape[-2:])[1:]:
        levels.append(_down(levels[-1]))
    if check:
        check_finite(levels[-1], features)
    return tuple(levels)


# -------------------------------------------------------------------- sample
def _bilinear_taps(
    u: torch.Tensor, v: torch.Tensor, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 clamped texel indices (row-major ``i * w + j``) and bilinear weights, ``[n, 4]`` each."""
    x = (u * w - 0.5).clamp(-1.0, float(w))  # clamping here changes nothing (edge texels repeat)
    y = (v * h - 0.5).clamp(-1.0, float(h))  # but keeps the integer conversion in range
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    cols = torch.stack((x0, x0 + 1), -1).clamp_(0, w - 1)  # [n, 2]
    rows = torch.stack((y0, y0 + 1), -1).clamp_(0, h - 1)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(-1, 4)  # (y0,x0) (y0,x1) (y1,x0) (y1,x1)
    wx = torch.stack((1 - fx, fx), -1)
    wy = torch.stack((1 - fy, fy), -1)
    weight = (wy[:, :, None] * wx[:, None, :]).reshape(-1, 4)
    return index, weight


def sample_mipmap(levels: Sequence[torch.Tensor], uv: torch.Tensor, lod: torch.Tensor) -> torch.Tensor:
    """``tex2DLod`` of every sample: ``levels`` (from :func:`build_mipmap`), ``uv [B, K, 2]``,
    ``lod [B, K]`` -> ``[B, K, C]`` in the levels' dtype.

    Each sample needs at most two levels (none above when ``lod`` is an
    integer): the samples' level taps are sorted by level and each level
    gathers only its own 4 texels per tap, so the work is ``O(B K C)``
    whatever the number of levels (one device sync on CUDA to size the
    per-level groups). Results are put back by index (no atomics):
    deterministic.
    """
    levels = check_levels(levels)
    check_samples(levels, uv, lod)
    first = levels[0]
    batch, channels = first.shape[:2]
    count = uv.shape[1]
    dtype = compute_dtype(first.dtype)
    device = first.device
    num_levels = len(levels)

    lod = lod.to(dtype).clamp(0, num_levels - 1)
    low = lod.floor()
    frac = lod - low
    low = low.long()
    high = torch.where(frac > 0, low + 1, torch.full_like(low, num_levels))  # num_levels: no tap
    # Taps: [2, B, K] -> flat; tap t belongs to sample t % (B K).
    tap_level = torch.stack((low, high)).reshape(-1)
    tap_weight = torch.stack((1 - frac, frac)).reshape(-1)
    order = torch.argsort(tap_level, stable=True)
    sizes = torch.bincount(tap_level, minlength=num_levels + 1).tolist()

    samples = order % (batch * count)
    u_all = uv[..., 0].to(dtype).reshape(-1)[samples]
    v_all = uv[..., 1].to(dtype).reshape(-1)[samples]
    batch_all = samples // count
    weight_all = tap_weight[order]

    out = torch.zeros(2 * batch * count, channels, dtype=dtype, device=device)
    start = 0
    for level, size in zip(levels, sizes[:num_levels]):
        if size == 0:
            continue
        part = slice(start, start + size)
        start += size
        h, w = level.shape[-2:]
        index, weight = _bilinear_taps(u_all[part], v_all[part], h, w)
        weight = weight * weight_all[part, None]
        texels = level.permute(0, 2, 3, 1)  # [B, h, w, C]: a view for both memory formats
        if texels.is_contiguous() and level.dtype == dtype:
            # channels_last fp32 / fp64: a fused weighted gather of 4 contiguous rows per tap.
            rows = (batch_all[part, None] * (h * w) + index).reshape(-1)
            out[order[part]] = F.embedding_bag(
                rows, texels.reshape(-1, channels), torch.arange(0, 4 * size, 4, device=device),
                mode="sum", per_sample_weights=weight.reshape(-1),
            )
        else:
            values = texels.flatten(1, 2)[batch_all[part, None], index]  # [n, 4, C]
            out[order[part]] = torch.bmm(weight[:, None, :], values.to(dtype)).squeeze(1)
    result = out.view(2, batch, count, channels).sum(0)
    return result if result.dtype == first.dtype else result.to(first.dtype)
