import math

import pytest
import torch
import torch.nn.functional as F

import arrcoc
from arrcoc import ops
from arrcoc.errors import ArrcocWarning, InputError, MissingInputError, ParamsError
from arrcoc.state import TokenState

TIERS = [[4, 4], [6, 2], [5, 1]]  # 16 + 12 + 5 = 33 tokens from 15 of 16 regions


def make_state(B=2, H=8, W=8, D=6, seed=0, relevance=None):
    g = torch.Generator().manual_seed(seed)
    rel = torch.rand(B, H * W, generator=g) if relevance is None else relevance
    return TokenState.from_patches(
        torch.randn(B, H * W, D, generator=g), (H, W), cls_token=torch.randn(B, D, generator=g),
        per_token={"relevance": rel},
    )


def pooled(state, how="max", region=(2, 2)):
    """Plain loop: region relevance from patches (through origin), -inf where none present."""
    H, W = state.grid
    rh, rw = region
    out = torch.full((state.B, H // rh, W // rw), -math.inf, dtype=torch.float64)
    for b in range(state.B):
        for R in range(H // rh):
            for C in range(W // rw):
                vals = []
                for i in range(R * rh, R * rh + rh):
                    for j in range(C * rw, C * rw + rw):
                        o = int(state.origin[b, i * W + j])
                        if o >= 0:
                            vals.append(float(state.per_token["relevance"][b, o]))
                if vals:
                    out[b, R, C] = max(vals) if how == "max" else sum(vals) / len(vals)
    return out


def run(state, **params):
    return arrcoc.create("allocator", "homunculus", **params)(state)


@pytest.mark.parametrize("how", ["max", "mean"])
def test_token_count_equals_tier_sum_and_tiers_follow_relevance(how):
    state = make_state()
    out = run(state, tiers=TIERS, pool=how).check()
    assert out.counts.tolist() == [33, 33]
    alloc = out.allocation
    ref = pooled(state, how)
    torch.testing.assert_close(alloc.region_scores.double(), ref.float().double())
    for b in range(2):
        order = sorted(range(16), key=lambda r: (-float(ref[b].flatten()[r]), r))
        expect = [0] * 4 + [1] * 6 + [2] * 5 + [-1]
        got = [int(alloc.tier_map[b].flatten()[r]) for r in order]
        assert got == expect
    # per-token tier / lod / size follow the tiers: tier 0 magnifies (lod 0), tier 2 reads level 1
    tier = out.per_token["tier"][0]
    assert tier.tolist() == [0] * 16 + [1] * 12 + [2] * 5
    assert torch.allclose(out.per_token["lod"][0], torch.tensor([0.0] * 16 + [math.log(2, 4)] * 12 + [1.0] * 5))
    assert torch.allclose(out.size[0], torch.tensor([1.0] * 16 + [2.0] * 12 + [4.0] * 5))
    assert out.cls is state.cls and out.allocation.budget == 33


def test_samples_lie_in_their_region_and_origin_points_to_nearest_sample():
    state = make_state()
    out = run(state, tiers=TIERS)
    tier_map = out.allocation.tier_map
    for b in range(2):
        for n in range(int(out.counts[b])):
            r, c = out.positions[b, n].tolist()
            R, C = int((r + 0.5) // 2), int((c + 0.5) // 2)
            assert tier_map[b, R, C] == out.per_token["tier"][b, n]
        for p in range(64):
            i, j = divmod(p, 8)
            o = int(out.origin[b, p])
            if tier_map[b, i // 2, j // 2] < 0:
                assert o == -1
                continue
            same = [n for n in range(int(out.counts[b]))
                    if int(((out.positions[b, n] + 0.5) // 2)[0]) == i // 2 and int(((out.positions[b, n] + 0.5) // 2)[1]) == j // 2]
            d = [float((out.positions[b, n] - torch.tensor([i, j], dtype=torch.float32)).square().sum()) for n in same]
            assert o == same[d.index(min(d))]


def test_k_le_area_samples_the_most_relevant_patch_centres():
    # k=1 at a patch centre at lod 0 reads that patch's feature exactly.
    state = make_state()
    out = run(state, tiers=[[16, 1]], region=[2, 2])
    pyramid = out.pyramid
    for b in range(2):
        for n in range(16):
            r, c = out.positions[b, n].tolist()
            assert r == int(r) and c == int(c)
            # the chosen patch is the region's best
            R, C = int(r) // 2, int(c) // 2
            patches = [(R * 2 + a) * 8 + C * 2 + e for a in (0, 1) for e in (0, 1)]
            best = max(patches, key=lambda p: (float(state.per_token["relevance"][b, p]), -p))
            assert int(r) * 8 + int(c) == best
    assert len(pyramid.levels) >= 2
    k_eq = run(state, tiers=[[16, 4]])  # lod 0, every patch centre of each region
    feats = state.tokens
    for b in range(2):
        for n in range(64):
            r, c = k_eq.positions[b, n].long().tolist()
            torch.testing.assert_close(k_eq.tokens[b, n], feats[b, r * 8 + c], atol=1e-5, rtol=1e-5)


def test_planted_query_region_gets_top_tier_through_query_and_relevance():
    g = torch.Generator().manual_seed(5)
    D = 16
    tokens = torch.randn(2, 64, D, generator=g)
    query = torch.randn(2, 1, D, generator=g)
    planted = {0: [2 * 8 + 4, 2 * 8 + 5, 3 * 8 + 4, 3 * 8 + 5], 1: [7 * 8 + 0, 7 * 8 + 1, 6 * 8 + 0]}
    for b, patches in planted.items():
        tokens[b, patches] = query[b, 0]
    state = TokenState.from_patches(tokens, (8, 8)).replace(query=query, query_mask=torch.ones(2, 1, dtype=torch.bool))
    state = arrcoc.create("scorer", "relevance", weights={"query": 1.0})(state)
    out = run(state, tiers=[[1, 8], [5, 2]])
    assert out.allocation.tier_map[0, 1, 2] == 0  # region rows 2-3, cols 4-5
    assert out.allocation.tier_map[1, 3, 0] == 0  # region rows 6-7, cols 0-1
    assert (out.allocation.tier_map == 0).sum() == 2


def test_ragged_input_and_fewer_regions_than_tiers():
    state = make_state()
    # image 0 keeps patches from 3 regions only; image 1 keeps one patch of every region.
    keep0 = [0, 1, 9, 2, 36]  # regions (0,0), (0,1), (2,2)
    keep1 = [(R * 2) * 8 + C * 2 for R in range(4) for C in range(4)]
    index = torch.zeros(2, 16, dtype=torch.long)
    index[0, :5] = torch.tensor(keep0)
    index[1] = torch.tensor(keep1)
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[0, :5] = True
    valid[1] = True
    kept = ops.keep(state, index, valid)
    with pytest.warns(ArrcocWarning, match=r"images \[0\] have only \[3\] regions"):
        out = run(kept, tiers=TIERS)
    out.check()
    assert out.counts.tolist() == [12, 33]  # 3 regions, all in tier 0 (k=4)
    assert (out.allocation.tier_map[0] >= 0).sum() == 3
    ref = pooled(kept)
    torch.testing.assert_close(out.allocation.region_scores.double(), ref)
    assert torch.isinf(out.per_token["relevance"][0, 12:]).all()
    # Dropped patches of an eligible region are chosen last; a region with one present patch samples it.
    assert out.origin[0].ge(0).sum() == 12  # 3 regions x 4 patches


def test_fill_rule_merged_patches_take_their_token_and_drops_the_mean():
    from arrcoc_plugins.allocators.homunculus import fill_features

    state = make_state(B=1, H=2, W=4, D=3)
    merged = ops.merge(state, torch.tensor([[1]]), torch.tensor([[0]]))
    kept = ops.keep(merged, torch.tensor([[0, 1, 2]]))  # patches 0+1 merged; 2, 3 kept; 4..7 dropped
    grid = fill_features(kept)  # [1, D, 2, 4]
    flat = grid.flatten(2)[0].T
    torch.testing.assert_close(flat[0], kept.tokens[0, 0])
    torch.testing.assert_close(flat[1], kept.tokens[0, 0])
    torch.testing.assert_close(flat[3], kept.tokens[0, 2])
    mean = (kept.tokens[0] * kept.size[0, :, None]).sum(0) / kept.size[0].sum()
    for p in range(4, 8):
        torch.testing.assert_close(flat[p], mean)


def test_background_token_for_the_rest():
    state = make_state()
    out = run(state, tiers=[[2, 4], [3, 1]], background=True).check()
    assert out.counts.tolist() == [12, 12]
    assert out.per_token["tier"][:, -1].tolist() == [-1, -1]
    assert out.size[:, -1].tolist() == [44.0, 44.0]  # 11 regions x 4 patches
    rest = out.allocation.tier_map < 0
    for b in range(2):
        patches = [p for p in range(64) if rest[b, (p // 8) // 2, (p % 8) // 2]]
        assert all(int(out.origin[b, p]) == 11 for p in patches)
        torch.testing.assert_close(out.tokens[b, -1], state.tokens[b, patches].mean(0), atol=1e-5, rtol=1e-5)


def test_magnification_lattice_for_one_patch_regions():
    state = make_state(B=1, H=4, W=4)
    out = run(state, tiers=[[2, 8], [3, 3]], region=[1, 1]).check()
    assert out.counts.tolist() == [25]
    pos = out.positions[0, :8]
    centre = pos.round()
    assert (centre == centre[0]).all()  # one patch region: all 8 samples inside it
    assert ((pos - centre).abs() <= 1 / 3 + 1e-6).all()  # on the 3x3 lattice of sub-cells
    assert len({tuple(p) for p in pos.tolist()}) == 8
    assert (out.per_token["lod"] == 0).all()


def test_bad_inputs():
    state = make_state()
    with pytest.raises(ParamsError, match=r"at least one"):
        arrcoc.create("allocator", "homunculus", tiers=[])
    with pytest.raises(ParamsError, match=r"count and k must be >= 1, got \[\[2, 0\]\]"):
        arrcoc.create("allocator", "homunculus", tiers=[[4, 2], [2, 0]])
    with pytest.raises(ParamsError, match=r"count and k must be >= 1, got \[\[-1, 2\]\]"):
        arrcoc.create("allocator", "homunculus", tiers=[[-1, 2]])
    with pytest.raises(ParamsError, match=r"more than the pyramid can place: a 2x2 region holds at most 16 x 4 = 64 samples.*got \[\[1, 65\]\]"):
        arrcoc.create("allocator", "homunculus", tiers=[[1, 65]])
    with pytest.raises(ParamsError, match="pyramid"):
        arrcoc.create("allocator", "homunculus", pyramid={"use": "mipmapp"})
    bare = TokenState.from_patches(state.tokens, (8, 8))
    with pytest.raises(MissingInputError, match=r"needs per_token\['relevance'\].*use: relevance"):
        run(bare)
    nan = state.per_token["relevance"].clone()
    nan[1, 7] = float("nan")
    with pytest.raises(InputError, match="1 NaN"):
        run(state.with_per_token(relevance=nan))
    inf = state.per_token["relevance"].clone()
    inf[0, 3] = float("inf")  # used to pass and turn the sampled relevance (and the ranking near it) into NaN
    with pytest.raises(InputError, match="0 NaN and 1 infinite"):
        run(state.with_per_token(relevance=inf))
    tiny = make_state(B=1, H=2, W=2)
    with pytest.raises(InputError, match=r"1x1 grid of 2x2 regions; nothing to rank"):
        run(tiny)
    with pytest.raises(InputError, match=r"region 3x3 does not divide the 8x8 patch grid"):
        run(state, region=[3, 3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state().to(dtype=dtype)
    out = run(state, tiers=TIERS)
    assert out.tokens.dtype == dtype and out.counts.tolist() == [33, 33]
    ref = run(state.to(dtype=torch.float32), tiers=TIERS)
    torch.testing.assert_close(out.tokens.float(), ref.tokens, atol=0.05, rtol=0.05)


def reference_tex2dlod(levels, uv, lod):
    """tex2DLod the plain way: grid_sample (texel centres, clamp-to-edge) on every level, linear between levels."""
    grid = (uv * 2 - 1)[:, None]  # [B, 1, K, 2]
    per_level = torch.stack(
        [F.grid_sample(lv, grid.to(lv.dtype), mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]
         for lv in levels], 0
    )  # [L, B, C, K]
    lod = lod.clamp(0, len(levels) - 1)
    lo = lod.floor().long()
    hi = (lo + 1).clamp(max=len(levels) - 1)
    frac = (lod - lo)[..., None]
    b = torch.arange(uv.shape[0])[:, None]
    k = torch.arange(uv.shape[1])[None, :]
    values = per_level.permute(1, 3, 2, 0)  # [B, K, C, L]
    low, high = values[b, k, :, lo], values[b, k, :, hi]
    return low + (high - low) * frac


def test_samples_equal_a_plain_tex2dlod_reference():
    """Every token is the reference trilinear sample of the output pyramid at (uv, lod)."""
    state = make_state()
    out = run(state, tiers=TIERS)
    H, W = state.grid
    pos = out.positions
    uv = torch.stack([(pos[..., 1] + 0.5) / W, (pos[..., 0] + 0.5) / H], -1)
    ref = reference_tex2dlod(out.pyramid.levels, uv, out.per_token["lod"])
    torch.testing.assert_close(out.tokens, ref, atol=1e-5, rtol=1e-5)
    # level 0 of the pyramid is the (unmerged) feature grid
    torch.testing.assert_close(out.pyramid.levels[0].flatten(2).transpose(1, 2), state.tokens)
