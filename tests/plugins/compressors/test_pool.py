"""pool: uniform spatial average pooling as a merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, ParamsError, StateError
from arrcoc.state import TokenState


def make_state(B=2, H=6, W=8, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_patches(torch.randn(B, H * W, D, generator=g), (H, W),
                                   per_token={"cls_attn": torch.rand(B, H * W, generator=g)})


def ref_pool(x, H, W, h, w):
    """Plain loops: cell (i, j) holds rows r with r * h // H == i and columns c with c * w // W == j."""
    out, sizes, centres = [], [], []
    for i in range(h):
        for j in range(w):
            cells = [(r, c) for r in range(H) for c in range(W) if r * h // H == i and c * w // W == j]
            out.append(torch.stack([x[r * W + c] for r, c in cells]).mean(0))
            sizes.append(len(cells))
            centres.append([sum(r for r, _ in cells) / len(cells), sum(c for _, c in cells) / len(cells)])
    return torch.stack(out), sizes, centres


def test_stride_equals_avg_pool2d():
    state = make_state()
    out = arrcoc.create("compressor", "pool", stride=2)(state).check()
    grid = state.tokens.transpose(1, 2).reshape(2, 5, 6, 8)
    ref = Fn.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    assert out.counts.tolist() == [12, 12]
    assert torch.allclose(out.tokens, ref, atol=1e-6)
    assert out.size.unique().tolist() == [4.0]
    attn = Fn.avg_pool2d(state.per_token["cls_attn"].reshape(2, 1, 6, 8), 2).flatten(1)
    assert torch.allclose(out.per_token["cls_attn"], attn, atol=1e-6)  # per-token fields are pooled too
    assert out.positions[0, 0].tolist() == [0.5, 0.5] and out.positions[0, 5].tolist() == [2.5, 2.5]


@pytest.mark.parametrize("cells", [(3, 3), (4, 5), (6, 8), (1, 1)])
def test_grid_matches_reference(cells):
    state = make_state()
    out = arrcoc.create("compressor", "pool", grid=list(cells))(state).check()
    h, w = cells
    for b in range(2):
        ref, sizes, centres = ref_pool(state.tokens[b], 6, 8, h, w)
        assert torch.allclose(out.tokens[b], ref, atol=1e-6)
        assert out.size[b].tolist() == sizes
        assert torch.allclose(out.positions[b], torch.tensor(centres))
        for p in range(48):  # origin: patch (r, c) lives in its cell
            r, c = divmod(p, 8)
            assert out.origin[b, p] == (r * h // 6) * w + c * w // 8
    assert out.size.sum(1).tolist() == [48.0, 48.0]  # total size conserved


def test_stride_not_dividing_gives_smaller_last_cells():
    state = make_state(H=5, W=5)
    out = arrcoc.create("compressor", "pool", stride=[2, 3])(state).check()
    assert out.counts.tolist() == [6, 6]  # ceil(5/2) x ceil(5/3)
    assert out.size[0].tolist() == [6.0, 4.0, 6.0, 4.0, 3.0, 2.0]
    x = state.tokens[0].reshape(5, 5, -1)
    assert torch.allclose(out.tokens[0, 5], x[4, 3:5].mean(0), atol=1e-6)


def test_keep_budget_picks_a_grid():
    state = make_state(H=12, W=12)
    out = arrcoc.create("compressor", "pool", keep=36)(state)
    assert out.counts.tolist() == [36, 36] and out.size[0].unique().tolist() == [4.0]
    with pytest.warns(arrcoc.ArrcocWarning, match="nearest"):
        odd = arrcoc.create("compressor", "pool", keep=0.2)(state)  # 28 tokens -> 5x6 grid
    assert odd.counts.tolist() == [30, 30]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state()
    out = arrcoc.create("compressor", "pool", stride=2)(state.to(dtype=dtype)).check()
    ref = arrcoc.create("compressor", "pool", stride=2)(state)
    assert out.dtype == dtype
    assert torch.allclose(out.tokens.float(), ref.tokens, atol=2e-2)


def test_needs_the_full_grid():
    state = make_state()
    idx = torch.arange(48).expand(2, -1).contiguous()
    pruned = ops.keep(state, idx, idx < torch.tensor([[48], [30]]))
    with pytest.raises(StateError, match=r"full, uncompressed 6x8 patch grid.*\(48, 30\)"):
        arrcoc.create("compressor", "pool", stride=2)(pruned)
    shuffled = ops.keep(state, idx.flip(1))  # all tokens, but not in raster order
    with pytest.raises(StateError, match="full, uncompressed"):
        arrcoc.create("compressor", "pool", grid=[2, 2])(shuffled)


def test_errors():
    with pytest.raises(ParamsError, match="exactly one of grid, stride or keep"):
        arrcoc.create("compressor", "pool", grid=[2, 2], stride=2)
    with pytest.raises(ParamsError, match="exactly one of grid, stride or keep"):
        arrcoc.create("compressor", "pool")
    with pytest.raises(ParamsError, match="stride must be >= 1"):
        arrcoc.create("compressor", "pool", stride=0)
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        arrcoc.create("compressor", "pool", keep=1.5)
    with pytest.raises(BudgetError, match="target grid 7x8 must lie within the 6x8 patch grid"):
        arrcoc.create("compressor", "pool", grid=[7, 8])(make_state())
    with pytest.raises(BudgetError, match="asked to keep 49 tokens"):
        arrcoc.create("compressor", "pool", keep=49)(make_state())


def test_pipeline():
    assert arrcoc.resolve_spec("pool").compress[0].params == {"stride": 2}
    tiny = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}}
    out = arrcoc.run_pipeline({"name": "t", "encoder": tiny, "compress": [{"use": "pool", "grid": [2, 2]}]},
                              torch.rand(2, 3, 64, 64), device="cpu")
    assert out.counts.tolist() == [4, 4] and out.size.sum(1).tolist() == [16.0, 16.0]
