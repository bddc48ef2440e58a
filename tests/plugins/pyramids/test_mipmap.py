"""mipmap pyramid: build and tex2DLod sampling against plain-loop references."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import arrcoc
from arrcoc.errors import InputError, ModelError, ParamsError, StateError
from arrcoc_plugins.pyramids import cupy_mipmap, torch_mipmap
from arrcoc_plugins.pyramids.mipmap import MipChain, Mipmap

HAS_CUPY_GPU = torch.cuda.is_available() and cupy_mipmap.available()[0]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cupy_gpu = pytest.mark.skipif(not HAS_CUPY_GPU, reason="needs CuPy and a CUDA GPU")


# ------------------------------------------------------------- references
def ref_down(grid: list[list[float]]) -> list[list[float]]:
    """One level by area overlap: output texel i covers input [i n/m, (i+1) n/m) per axis, m = max(1, n // 2)."""
    h, w = len(grid), len(grid[0])
    oh, ow = max(1, h // 2), max(1, w // 2)

    def overlap_weights(n: int, m: int, i: int) -> list[float]:
        lo, hi = i * n / m, (i + 1) * n / m
        return [max(0.0, min(hi, p + 1) - max(lo, p)) / (n / m) for p in range(n)]

    out = []
    for i in range(oh):
        wy = overlap_weights(h, oh, i)
        row = []
        for j in range(ow):
            wx = overlap_weights(w, ow, j)
            row.append(sum(wy[p] * wx[q] * grid[p][q] for p in range(h) for q in range(w)))
        out.append(row)
    return out


def ref_build(x: torch.Tensor) -> list[list[list[list[list[float]]]]]:
    """levels[l][b][c] = 2-D list, from float64 loops."""
    grids = [[x[b, c].double().tolist() for c in range(x.shape[1])] for b in range(x.shape[0])]
    levels = [grids]
    while len(levels[-1][0][0]) > 1 or len(levels[-1][0][0][0]) > 1:
        levels.append([[ref_down(g) for g in per_b] for per_b in levels[-1]])
    return levels


def ref_tex2dlod(levels: list[list[list[float]]], u: float, v: float, lod: float) -> float:
    """CUDA tex2DLod: normalised coords, linear filter, clamp-to-edge, trilinear mipmap filter."""
    top = len(levels) - 1
    lod = min(max(lod, 0.0), float(top))
    l0 = math.floor(lod)
    t = lod - l0
    l1 = min(l0 + 1, top)

    def bilinear(grid: list[list[float]]) -> float:
        h, w = len(grid), len(grid[0])
        x, y = u * w - 0.5, v * h - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0

        def texel(i: int, j: int) -> float:
            return grid[min(max(i, 0), h - 1)][min(max(j, 0), w - 1)]

        return ((1 - fy) * ((1 - fx) * texel(y0, x0) + fx * texel(y0, x0 + 1))
                + fy * ((1 - fx) * texel(y0 + 1, x0) + fx * texel(y0 + 1, x0 + 1)))

    return (1 - t) * bilinear(levels[l0]) + t * bilinear(levels[l1])


def ref_sample(levels: tuple[torch.Tensor, ...], uv: torch.Tensor, lod: torch.Tensor) -> torch.Tensor:
    batch, channels = levels[0].shape[:2]
    out = torch.zeros(batch, uv.shape[1], channels, dtype=torch.float64)
    for b in range(batch):
        for c in range(channels):
            grids = [level[b, c].double().tolist() for level in levels]
            for k in range(uv.shape[1]):
                out[b, k, c] = ref_tex2dlod(grids, float(uv[b, k, 0]), float(uv[b, k, 1]), float(lod[b, k]))
    return out


def random_queries(batch: int, count: int, num_levels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uv in [-0.3, 1.3] (outside too), lod in [-1, L + 0.5] with some exact integers."""
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(batch, count, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    lod = torch.rand(batch, count, generator=g, dtype=torch.float64) * (num_levels + 1.5) - 1.0
    lod[:, ::5] = torch.randint(0, num_levels, (batch, len(range(0, count, 5))), generator=g).double()
    return uv, lod


# -------------------------------------------------------------------- build
@pytest.mark.parametrize(
    "hw, shapes",
    [
        ((5, 7), [(5, 7), (2, 3), (1, 1)]),
        ((4, 4), [(4, 4), (2, 2), (1, 1)]),
        ((3, 1), [(3, 1), (1, 1)]),
        ((1, 1), [(1, 1)]),
        ((4, 16), [(4, 16), (2, 8), (1, 4), (1, 2), (1, 1)]),
        ((24, 24), [(24, 24), (12, 12), (6, 6), (3, 3), (1, 1)]),
    ],
)
def test_level_shapes(hw, shapes):
    assert torch_mipmap.level_shapes(*hw) == shapes
    chain = Mipmap(backend="torch").build(torch.rand(1, 2, *hw))
    assert chain.shapes == tuple(shapes)
    assert chain.num_levels == len(shapes) and chain.max_lod == len(shapes) - 1


@pytest.mark.parametrize("hw", [(5, 7), (4, 4), (3, 1), (1, 6), (7, 7), (6, 10), (9, 4), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_build_matches_reference(hw, channels_last, dtype, tol):
    g = torch.Generator().manual_seed(hash(hw) % 1000)
    x = torch.randn(2, 3, *hw, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    levels = torch_mipmap.build_mipmap(x)
    expected = ref_build(x)
    assert levels[0] is x
    assert len(levels) == len(expected)
    for got, want in zip(levels, expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)


def test_build_even_grid_is_plain_2x2_box():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    levels = torch_mipmap.build_mipmap(x)
    assert levels[1].view(-1).tolist() == [2.5, 4.5, 10.5, 12.5]
    assert levels[2].view(-1).tolist() == [7.5]


@pytest.mark.parametrize("hw", [(13, 9), (24, 24), (27, 27), (5, 1)])
def test_top_level_is_mean_of_grid(hw):
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    top = torch_mipmap.build_mipmap(x)[-1]
    assert top.shape == (2, 4, 1, 1)
    torch.testing.assert_close(top[..., 0, 0], x.mean((2, 3)), rtol=1e-12, atol=1e-12)


def test_build_keeps_memory_format_and_matches_across_formats():
    x = torch.randn(2, 8, 12, 10)
    cl = x.contiguous(memory_format=torch.channels_last)
    a, b = torch_mipmap.build_mipmap(x), torch_mipmap.build_mipmap(cl)
    for la, lb in zip(a, b):
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    assert b[1].is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------- sample
@pytest.mark.parametrize("hw", [(5, 7), (4, 4), (3, 1), (1, 1), (8, 6)])
@pytest.mark.parametrize("channels_last", [False, True])  # two gather paths (strided index / fused embedding_bag)
def test_sample_matches_reference_tex2dlod(hw, channels_last):
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    levels = torch_mipmap.build_mipmap(x)
    uv, lod = random_queries(2, 40, len(levels), seed=sum(hw))
    got = torch_mipmap.sample_mipmap(levels, uv, lod)
    assert got.shape == (2, 40, 3) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref_sample(levels, uv, lod), rtol=1e-12, atol=1e-12)


def test_sample_fp32_inputs_match_reference():
    x = torch.randn(2, 5, 6, 9)
    levels = torch_mipmap.build_mipmap(x)
    uv, lod = random_queries(2, 50, len(levels), seed=3)
    uv, lod = uv.float(), lod.float()
    got = torch_mipmap.sample_mipmap(levels, uv, lod)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_sample(levels, uv, lod), rtol=1e-5, atol=1e-5)


def test_sample_out_of_range_uv_and_lod_are_clamped():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    levels = torch_mipmap.build_mipmap(x)
    uv = torch.tensor([[[-5.0, -5.0], [7.0, 0.125], [0.875, 9.0], [0.3, 0.6], [0.3, 0.6]]], dtype=torch.float64)
    lod = torch.tensor([[0.0, 0.0, 0.0, -3.0, 40.0]], dtype=torch.float64)
    got = torch_mipmap.sample_mipmap(levels, uv, lod)[0]
    torch.testing.assert_close(got[0], x[0, :, 0, 0])  # corner texel
    torch.testing.assert_close(got[1], x[0, :, 0, 3])  # v = 0.125 is row 0's centre, u clamped to the last column
    torch.testing.assert_close(got[2], x[0, :, 3, 3])
    torch.testing.assert_close(got[3], torch_mipmap.sample_mipmap(levels, uv[:, 3:4], torch.zeros(1, 1).double())[0, 0])
    torch.testing.assert_close(got[4], x[0].mean((1, 2)))


@pytest.mark.parametrize("hw", [(4, 8), (5, 7)])
def test_texel_centres_at_lod0_return_the_texels(hw):
    h, w = hw
    x = torch.randn(2, 3, h, w)
    levels = torch_mipmap.build_mipmap(x)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    uv = torch.stack(((cols.flatten() + 0.5) / w, (rows.flatten() + 0.5) / h), -1).expand(2, -1, -1)
    got = torch_mipmap.sample_mipmap(levels, uv, torch.zeros(2, h * w))
    want = x.flatten(2).transpose(1, 2)
    if (w & (w - 1)) == 0 and (h & (h - 1)) == 0:
        assert torch.equal(got, want)  # centres are exact in binary: exactly the texels
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lod_at_top_returns_the_mean():
    x = torch.randn(3, 4, 10, 6)
    chain = Mipmap(backend="torch").build(x)
    uv = torch.rand(3, 7, 2)
    for lod_value in (chain.max_lod, chain.max_lod + 3.0):
        got = Mipmap(backend="torch").sample(chain, uv, torch.full((3, 7), lod_value))
        torch.testing.assert_close(got, x.mean((2, 3))[:, None, :].expand(3, 7, 4), rtol=1e-5, atol=1e-6)


def test_trilinear_blend_between_levels():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    levels = torch_mipmap.build_mipmap(x)
    uv = torch.rand(1, 5, 2, dtype=torch.float64)
    at = {lod: torch_mipmap.sample_mipmap(levels, uv, torch.full((1, 5), lod, dtype=torch.float64))
          for lod in (1.0, 1.25, 2.0)}
    torch.testing.assert_close(at[1.25], 0.75 * at[1.0] + 0.25 * at[2.0])


def test_batch_items_are_independent():
    x = torch.randn(3, 4, 9, 7)
    uv, lod = random_queries(3, 30, 4, seed=5)
    levels = torch_mipmap.build_mipmap(x)
    together = torch_mipmap.sample_mipmap(levels, uv.float(), lod.float())
    for b in range(3):
        levels_b = torch_mipmap.build_mipmap(x[b : b + 1])
        alone = torch_mipmap.sample_mipmap(levels_b, uv[b : b + 1].float(), lod[b : b + 1].float())
        torch.testing.assert_close(together[b : b + 1], alone, rtol=0, atol=0)


def test_sample_is_deterministic_and_format_independent():
    x = torch.randn(2, 16, 12, 12)
    uv, lod = random_queries(2, 64, 4, seed=9)
    uv, lod = uv.float(), lod.float()
    a = torch_mipmap.sample_mipmap(torch_mipmap.build_mipmap(x), uv, lod)
    b = torch_mipmap.sample_mipmap(torch_mipmap.build_mipmap(x), uv, lod)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    c = torch_mipmap.sample_mipmap(torch_mipmap.build_mipmap(channels_last), uv, lod)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_sample_no_samples():
    levels = torch_mipmap.build_mipmap(torch.randn(2, 3, 4, 4))
    out = torch_mipmap.sample_mipmap(levels, torch.zeros(2, 0, 2), torch.zeros(2, 0))
    assert out.shape == (2, 0, 3)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_dtypes(dtype, tol):
    x = torch.randn(2, 3, 7, 10)
    chain = Mipmap(backend="torch").build(x.to(dtype))
    exact = ref_build(x.to(dtype))  # reference from the rounded input
    for level, want in zip(chain.levels, exact):
        assert level.dtype == dtype
        torch.testing.assert_close(level.double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)
    uv, lod = random_queries(2, 30, chain.num_levels, seed=1)
    got = Mipmap(backend="torch").sample(chain, uv.to(dtype), lod.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 30, 3)
    want = ref_sample(chain.levels, uv.to(dtype), lod.to(dtype))  # texels as stored, coords as given
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "features, match",
    [
        ([[1.0]], r"must be a torch.Tensor \[B, C, H, W\], got a list"),
        (torch.ones(1, 2, 3, 3, dtype=torch.int64), r"must be floating .*got a torch.int64 tensor"),
        (torch.ones(2, 3, 3), r"must be 4-D \[B, C, H, W\], got a torch.float32 tensor of shape \[2, 3, 3\]"),
        (torch.ones(1, 2, 0, 3), r"every dimension .* must be >= 1, got .*\[1, 2, 0, 3\]"),
    ],
)
def test_bad_features(features, match):
    with pytest.raises(InputError, match=match):
        Mipmap(backend="torch").build(features)


@pytest.mark.parametrize("bad, counts", [(float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf")])
@pytest.mark.parametrize("hw", [(5, 6), (1, 1)])
def test_non_finite_features(bad, counts, hw):
    x = torch.randn(2, 3, *hw)
    x[1, 2, hw[0] - 1, 0] = bad
    with pytest.raises(InputError, match=rf"must be finite; batch item 1, channel 2 .* holds {counts} values"):
        Mipmap(backend="torch").build(x)


def test_bad_samples():
    mip = Mipmap(backend="torch")
    chain = mip.build(torch.randn(2, 3, 4, 4))
    uv, lod = torch.rand(2, 5, 2), torch.rand(2, 5)
    with pytest.raises(StateError, match=r"uv must be \[B=2, K, 2\] .*got a torch.float32 tensor of shape \[2, 5, 3\]"):
        mip.sample(chain, torch.rand(2, 5, 3), lod)
    with pytest.raises(StateError, match=r"uv must be \[B=2, K, 2\] .*shape \[1, 5, 2\]"):
        mip.sample(chain, uv[:1], lod[:1])
    with pytest.raises(StateError, match=r"lod must be \[B, K\] = \[2, 5\] like uv, got .*shape \[2, 4\]"):
        mip.sample(chain, uv, lod[:, :4])
    with pytest.raises(InputError, match=r"lod must be floating, got a torch.int64"):
        mip.sample(chain, uv, torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(StateError, match=r"uv must be on the pyramid's device cpu, got .* on meta"):
        mip.sample(chain, torch.rand(2, 5, 2, device="meta"), lod)
    uv_nan = uv.clone()
    uv_nan[1, 3, 0] = float("nan")
    with pytest.raises(InputError, match=r"uv must be finite, got nan at index \(1, 3, 0\)"):
        mip.sample(chain, uv_nan, lod)
    with pytest.raises(StateError, match=r"needs the MipChain from build\(\), got tuple"):
        mip.sample(chain.levels, uv, lod)
    with pytest.raises(StateError, match=r"level 1 is a torch.float64 tensor"):
        torch_mipmap.sample_mipmap((chain.levels[0], chain.levels[1].double()), uv, lod)


# ------------------------------------------------------------- the plugin
def test_registered_through_entry_point_and_params():
    mip = arrcoc.create("pyramid", "mipmap")
    assert isinstance(mip, Mipmap) and mip.params.backend == "auto"
    with pytest.raises(ParamsError, match=r"backend: .*'auto', 'torch' or 'cupy'"):
        arrcoc.create("pyramid", "mipmap", backend="cuda")
    with pytest.raises(ParamsError, match=r"unknown parameter \(did you mean 'backend'\?\)"):
        arrcoc.create("pyramid", "mipmap", backends="torch")


def test_auto_uses_torch_for_cpu_features():
    chain = Mipmap(backend="auto").build(torch.randn(1, 2, 6, 6))
    assert isinstance(chain, MipChain) and chain.backend == "torch"
    with pytest.raises(Exception):  # frozen
        chain.backend = "cupy"


@pytest.mark.skipif(HAS_CUPY_GPU, reason="CuPy and a GPU are present: backend 'cupy' is allowed here")
def test_cupy_backend_without_gpu_is_a_clear_error():
    with pytest.raises(ModelError, match=r"backend 'cupy' needs CuPy and a CUDA GPU, but .*use backend: torch"):
        Mipmap(backend="cupy")


@needs_cupy_gpu
def test_cupy_backend_with_cpu_features_is_a_clear_error():
    with pytest.raises(InputError, match=r"backend 'cupy' needs features on a CUDA device, got them on cpu"):
        Mipmap(backend="cupy").build(torch.randn(1, 2, 4, 4))


def test_modules_import_without_cupy():
    code = textwrap.dedent(
        """
        import sys, torch
        sys.modules["cupy"] = None  # any `import cupy` now raises ImportError
        from arrcoc_plugins.pyramids import cupy_mipmap
        from arrcoc_plugins.pyramids.mipmap import Mipmap
        ok, reason = cupy_mipmap.available()
        assert not ok and "CuPy cannot be imported" in reason, reason
        chain = Mipmap(backend="auto").build(torch.randn(1, 2, 4, 4))
        assert chain.backend == "torch"
        try:
            Mipmap(backend="cupy")
        except Exception as exc:
            assert type(exc).__name__ == "ModelError" and "CuPy cannot be imported" in str(exc), exc
        else:
            raise AssertionError("backend cupy without CuPy must fail")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("kind", ["build", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cupy_kernels_compile_with_nvrtc(kind, dtype):
    """Compiles the CUDA source to PTX; needs CuPy's NVRTC but no GPU."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy (with NVRTC) to compile-check")
    try:
        program = nvrtc.createProgram(cupy_mipmap.kernel_source(kind, dtype), "mipmap.cu", [], [])
    except Exception as exc:  # NVRTC library absent
        pytest.skip(f"NVRTC unavailable: {exc}")
    try:
        nvrtc.compileProgram(program, ["-arch=compute_80"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(program))
    assert ".entry mip_" in nvrtc.getPTX(program).decode()


# ------------------------------------------------------------------- GPU
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_cuda_matches_cpu(dtype):
    x = torch.randn(2, 8, 11, 16)
    uv, lod = random_queries(2, 64, 5, seed=2)
    cpu = torch_mipmap.sample_mipmap(torch_mipmap.build_mipmap(x.to(dtype)), uv.float(), lod.float())
    levels = torch_mipmap.build_mipmap(x.to(dtype).cuda())
    gpu = torch_mipmap.sample_mipmap(levels, uv.float().cuda(), lod.float().cuda())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=tol, atol=tol)


@needs_cupy_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [(24, 24), (5, 7), (1, 1), (3, 16)])
def test_cupy_matches_torch(dtype, channels_last, hw):
    x = torch.randn(3, 32, *hw, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch_chain = Mipmap(backend="torch").build(x)
    cupy_chain = Mipmap(backend="cupy").build(x)
    auto_chain = Mipmap(backend="auto").build(x)
    assert cupy_chain.backend == "cupy" and auto_chain.backend == "cupy"
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1.6e-2)
    for a, b in zip(torch_chain.levels, cupy_chain.levels):
        assert a.shape == b.shape and b.dtype == dtype
        torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol)
    uv, lod = random_queries(3, 273, torch_chain.num_levels, seed=4)
    uv, lod = uv.cuda(), lod.cuda()
    a = Mipmap(backend="torch").sample(torch_chain, uv, lod)
    b = Mipmap(backend="cupy").sample(cupy_chain, uv, lod)
    assert b.dtype == dtype and b.shape == a.shape
    torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol)
    if hw != (24, 24):  # the plain-loop reference is slow on the big grid
        want = ref_sample(tuple(level.cpu() for level in cupy_chain.levels), uv.cpu(), lod.cpu())
        torch.testing.assert_close(b.double().cpu(), want, rtol=tol, atol=tol)


@needs_cupy_gpu
def test_cupy_non_finite_features():
    x = torch.randn(1, 4, 6, 6, device="cuda")
    x[0, 3, 2, 2] = float("nan")
    with pytest.raises(InputError, match=r"batch item 0, channel 3 .* holds 1 NaN"):
        Mipmap(backend="cupy").build(x)
