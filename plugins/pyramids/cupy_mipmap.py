"""Mipmap build and ``tex2DLod`` sampling as CUDA ``cupy.RawKernel``s.

The same two functions as :mod:`arrcoc_plugins.pyramids.torch_mipmap`, with
the same semantics and numbers (within float rounding: the order of the
additions differs):

* :func:`build_mipmap` -- one kernel launch per level; a thread per output
  texel and channel applies the separable 2-tap box (even sizes) / 3-tap
  polyphase box (odd sizes) of the previous level, accumulating in fp32;
* :func:`sample_mipmap` -- one kernel launch for all ``B * K`` samples and
  ``C`` channels (a thread per sample and channel, channels fastest, so
  channels_last levels are read coalesced): lod clamp, the two levels,
  bilinear with clamp-to-edge, trilinear blend.

Tensors stay torch tensors: they are handed to CuPy zero-copy through DLPack
(``cupy.from_dlpack``), outputs are allocated by torch, and kernels run on
torch's current CUDA stream, so no copy and no extra synchronisation happen.

dtypes: fp32, fp64 (computed in fp64), fp16 and bf16 (bit patterns read as
16-bit integers, converted with ``cvt.f32.f16`` / a bf16 shift, computed in
fp32, rounded to nearest even on store) -- no CUDA fp16/bf16 headers needed.
Strides are passed to the kernels, so channels-first, channels_last and other
strided inputs work without a copy.

CuPy is imported inside the functions: importing this module never fails
without CuPy or CUDA; :func:`available` says whether the backend can run.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from arrcoc.errors import InputError, ModelError

from .torch_mipmap import (
    check_features,
    check_finite,
    check_levels,
    check_samples,
    compute_dtype,
    level_shapes,
)

_THREADS = 256

# Per dtype: storage type in the kernel, accumulation type, load / store helpers.
_TYPES = {
    torch.float32: ("float", "float", "__device__ float ld(const float* p) { return *p; }\n"
                    "__device__ void st(float* p, float v) { *p = v; }\n"),
    torch.float64: ("double", "double", "__device__ double ld(const double* p) { return *p; }\n"
                    "__device__ void st(double* p, double v) { *p = v; }\n"),
    torch.float16: ("unsigned short", "float",
                    "__device__ float ld(const unsigned short* p) {\n"
                    "  float f; unsigned short h = *p; asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(f) : \"h\"(h)); return f; }\n"
                    "__device__ void st(unsigned short* p, float v) {\n"
                    "  unsigned short h; asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(h) : \"f\"(v)); *p = h; }\n"),
    torch.bfloat16: ("unsigned short", "float",
                     "__device__ float ld(const unsigned short* p) { return __uint_as_float(((unsigned int)*p) << 16); }\n"
                     "__device__ void st(unsigned short* p, float v) {\n"
                     "  unsigned int u = __float_as_uint(v);\n"
                     "  if ((u & 0x7fffffffu) > 0x7f800000u) { *p = (unsigned short)((u >> 16) | 0x40u); return; }\n"
                     "  u += 0x7fffu + ((u >> 16) & 1u); *p = (unsigned short)(u >> 16); }\n"),
}

_BUILD_SOURCE = r"""
typedef STORAGE T;
typedef ACCUM A;
HELPERS
// Taps of output texel j along an axis of n input texels (m = max(1, n / 2) outputs).
__device__ int axis_taps(long long n, long long j, long long* t, A* w) {
  if (n == 1) { t[0] = 0; w[0] = (A)1; return 1; }
  if ((n & 1) == 0) { t[0] = 2 * j; t[1] = 2 * j + 1; w[0] = (A)0.5; w[1] = (A)0.5; return 2; }
  long long m = n / 2;
  t[0] = 2 * j; t[1] = 2 * j + 1; t[2] = 2 * j + 2;
  w[0] = (A)(m - j) / (A)n; w[1] = (A)m / (A)n; w[2] = (A)(j + 1) / (A)n;
  return 3;
}

extern "C" __global__ void mip_down(
    const T* src, T* dst, long long B, long long C, long long h, long long w, long long oh, long long ow,
    long long sb, long long sc, long long sh, long long sw,
    long long db, long long dc, long long dh, long long dw, int channels_inner) {
  long long total = B * C * oh * ow;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    long long r = i, b, c, y, x;
    if (channels_inner) { c = r % C; r /= C; x = r % ow; r /= ow; y = r % oh; b = r / oh; }
    else { x = r % ow; r /= ow; y = r % oh; r /= oh; c = r % C; b = r / C; }
    long long ty[3], tx[3]; A wy[3], wx[3];
    int ny = axis_taps(h, y, ty, wy), nx = axis_taps(w, x, tx, wx);
    const T* base = src + b * sb + c * sc;
    A acc = (A)0;
    for (int a = 0; a < ny; ++a) {
      A row = (A)0;
      for (int e = 0; e < nx; ++e) row += wx[e] * ld(base + ty[a] * sh + tx[e] * sw);
      acc += wy[a] * row;
    }
    st(dst + b * db + c * dc + y * dh + x * dw, acc);
  }
}
"""

_SAMPLE_SOURCE = r"""
typedef STORAGE T;
typedef ACCUM A;
HELPERS
// meta: per level (pointer, h, w, stride_b, stride_c, stride_h, stride_w), strides in elements.
__device__ A bilinear(const long long* meta, int level, long long b, long long c, A u, A v) {
  const long long* m = meta + 7 * level;
  const T* base = (const T*)m[0] + b * m[3] + c * m[4];
  long long h = m[1], w = m[2];
  A x = u * (A)w - (A)0.5, y = v * (A)h - (A)0.5;
  x = x < (A)-1 ? (A)-1 : (x > (A)w ? (A)w : x);   // keeps the integer conversion in range
  y = y < (A)-1 ? (A)-1 : (y > (A)h ? (A)h : y);
  A xf = floor(x), yf = floor(y);
  A fx = x - xf, fy = y - yf;
  long long x0 = (long long)xf, y0 = (long long)yf, x1 = x0 + 1, y1 = y0 + 1;
  x0 = x0 < 0 ? 0 : (x0 > w - 1 ? w - 1 : x0); x1 = x1 < 0 ? 0 : (x1 > w - 1 ? w - 1 : x1);
  y0 = y0 < 0 ? 0 : (y0 > h - 1 ? h - 1 : y0); y1 = y1 < 0 ? 0 : (y1 > h - 1 ? h - 1 : y1);
  A t00 = ld(base + y0 * m[5] + x0 * m[6]), t01 = ld(base + y0 * m[5] + x1 * m[6]);
  A t10 = ld(base + y1 * m[5] + x0 * m[6]), t11 = ld(base + y1 * m[5] + x1 * m[6]);
  return ((A)1 - fy) * (((A)1 - fx) * t00 + fx * t01) + fy * (((A)1 - fx) * t10 + fx * t11);
}

extern "C" __global__ void mip_sample(
    const long long* meta, int L, const A* uv, const A* lod, T* out, long long B, long long K, long long C) {
  long long total = B * K * C;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    long long s = i / C, c = i % C, b = s / K;
    A u = uv[2 * s], v = uv[2 * s + 1], l = lod[s];
    l = l < (A)0 ? (A)0 : (l > (A)(L - 1) ? (A)(L - 1) : l);
    int l0 = (int)floor(l);
    A t = l - (A)l0;
    A acc = ((A)1 - t) * bilinear(meta, l0, b, c, u, v);
    if (t > (A)0) acc += t * bilinear(meta, l0 + 1 < L ? l0 + 1 : L - 1, b, c, u, v);
    st(out + i, acc);
  }
}
"""


def _import_cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library missing at import time
        raise ModelError(
            f"mipmap backend 'cupy': CuPy cannot be imported ({type(exc).__name__}: {exc}); "
            "install arrcoc[gpu] (cupy-cuda12x) or use backend: torch"
        ) from None
    return cupy


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """``(True, "")`` when CuPy imports and sees a CUDA GPU, else ``(False, why not)``."""
    try:
        import cupy
    except Exception as exc:
        return False, f"CuPy cannot be imported ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    return True, ""


def kernel_source(kind: str, dtype: torch.dtype) -> str:
    """CUDA source of the ``build`` or ``sample`` kernel for ``dtype`` (also used to compile-check)."""
    storage, accum, helpers = _TYPES[dtype]
    source = _BUILD_SOURCE if kind == "build" else _SAMPLE_SOURCE
    return source.replace("STORAGE", storage).replace("ACCUM", accum).replace("HELPERS", helpers)


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, dtype: torch.dtype):
    cupy = _import_cupy()
    name = "mip_down" if kind == "build" else "mip_sample"
    return cupy.RawKernel(kernel_source(kind, dtype), name)


def _require_cuda(what: str, tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda":
        raise InputError(f"mipmap backend 'cupy': {what} must be on a CUDA device, got it on {tensor.device}")


def _as_cupy(cupy, tensor: torch.Tensor):
    """Zero-copy CuPy view of ``tensor``; 16-bit floats travel as int16 bit patterns (CuPy has no bf16)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.view(torch.int16)
    return cupy.from_dlpack(tensor)


def _launch(cupy, kernel, total: int, args: tuple) -> None:
    if total == 0:
        return
    blocks = min((total + _THREADS - 1) // _THREADS, 65535 * 8)
    kernel((blocks,), (_THREADS,), args)


class _on_torch_stream:
    """Run CuPy work on the device and current CUDA stream torch uses for ``tensor``."""

    def __init__(self, cupy, tensor: torch.Tensor) -> None:
        self.device = cupy.cuda.Device(tensor.device.index if tensor.device.index is not None else 0)
        self.stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(tensor.device).cuda_stream)

    def __enter__(self):
        self.device.__enter__()
        self.stream.__enter__()
        return self

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.device.__exit__(*exc)


def build_mipmap(features: torch.Tensor, *, check: bool = True) -> tuple[torch.Tensor, ...]:
    """Like :func:`arrcoc_plugins.pyramids.torch_mipmap.build_mipmap`, one RawKernel launch per level.

    Levels keep the input's dtype and memory format (channels_last in,
    channels_last out; anything else gives contiguous levels).
    """
    check_features(features)
    _require_cuda("features", features)
    cupy = _import_cupy()
    kernel = _kernel("build", features.dtype)
    channels_last = features.shape[1] > 1 and features.is_contiguous(memory_format=torch.channels_last) \
        and not features.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batch, channels = features.shape[:2]
    levels = [features]
    with _on_torch_stream(cupy, features):
        for oh, ow in level_shapes(*features.shape[-2:])[1:]:
            src = levels[-1]
            dst = torch.empty((batch, channels, oh, ow), dtype=src.dtype, device=src.device, memory_format=fmt)
            h, w = src.shape[-2:]
            args = (
                _as_cupy(cupy, src), _as_cupy(cupy, dst),
                *(cupy.int64(v) for v in (batch, channels, h, w, oh, ow, *src.stride(), *dst.stride())),
                cupy.int32(1 if channels_last else 0),
            )
            _launch(cupy, kernel, batch * channels * oh * ow, args)
            levels.append(dst)
    if check:
        check_finite(levels[-1], features)
    return tuple(levels)


def sample_mipmap(levels: Sequence[torch.Tensor], uv: torch.Tensor, lod: torch.Tensor) -> torch.Tensor:
    """Like :func:`arrcoc_plugins.pyramids.torch_mipmap.sample_mipmap`, one RawKernel launch, no sync."""
    levels = check_levels(levels)
    _require_cuda("the pyramid", levels[0])
    check_samples(levels, uv, lod)
    cupy = _import_cupy()
    first = levels[0]
    batch, channels = first.shape[:2]
    count = uv.shape[1]
    accum = compute_dtype(first.dtype)
    kernel = _kernel("sample", first.dtype)
    meta = torch.tensor(
        [[level.data_ptr(), level.shape[2], level.shape[3], *level.stride()] for level in levels],
        dtype=torch.int64,
    ).to(first.device)
    uv_c = uv.to(accum).contiguous()
    lod_c = lod.to(accum).contiguous()
    out = torch.empty(batch, count, channels, dtype=first.dtype, device=first.device)
    with _on_torch_stream(cupy, first):
        args = (
            _as_cupy(cupy, meta), cupy.int32(len(levels)), _as_cupy(cupy, uv_c), _as_cupy(cupy, lod_c),
            _as_cupy(cupy, out), cupy.int64(batch), cupy.int64(count), cupy.int64(channels),
        )
        _launch(cupy, kernel, batch * count * channels, args)
    return out
