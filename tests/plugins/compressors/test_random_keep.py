"""random_keep: seeded, batched, per-image draws."""

from __future__ import annotations

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, ParamsError
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.random_keep import random_scores


def make_state(B=3, H=4, W=6, D=5, counts=None):
    state = TokenState.from_patches(torch.randn(B, H * W, D, generator=torch.Generator().manual_seed(0)), (H, W))
    if counts is not None:
        idx = torch.arange(H * W).expand(B, -1).contiguous()
        state = ops.keep(state, idx, idx < torch.tensor(counts)[:, None])
    return state


def ref_indices(n, k, seed):
    s = torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(sorted(range(n), key=lambda i: (-s[i], i))[:k])


def test_matches_reference_draws_and_is_deterministic():
    state = make_state()
    plugin = arrcoc.create("compressor", "random_keep", keep=0.25, seed=7)
    out = plugin(state).check()
    assert out.counts.tolist() == [6, 6, 6]
    for b in range(3):
        assert torch.equal(out.tokens[b], state.tokens[b, ref_indices(24, 6, 7 + b)])
    again = plugin(state)
    assert torch.equal(out.tokens, again.tokens) and torch.equal(out.origin, again.origin)
    # images of one batch draw differently (same tokens in every image, different subsets)
    same = TokenState.from_patches(state.tokens[:1].expand(3, -1, -1).contiguous(), (4, 6))
    picked = [tuple(torch.nonzero(plugin(same).origin[b] >= 0).squeeze(1).tolist()) for b in range(3)]
    assert len(set(picked)) == 3
    other = arrcoc.create("compressor", "random_keep", keep=0.25, seed=8)(state)
    assert not torch.equal(other.origin, out.origin)


def test_padded_rows_rank_like_unpadded_ones():
    full = random_scores(2, 30, 5)
    assert torch.equal(full[1, :11], random_scores(1, 11, 6)[0])


def test_ragged_batch_and_counts():
    state = make_state(counts=[24, 10, 3])
    out = arrcoc.create("compressor", "random_keep", keep=0.5, seed=1)(state).check()
    assert out.counts.tolist() == [12, 5, 1]
    assert out.size.sum(1).tolist() == [12.0, 5.0, 1.0]
    for b, n in enumerate([24, 10, 3]):
        assert bool((out.origin[b, n:] == -1).all())  # padded slots never kept
        k = int(out.counts[b])
        assert torch.equal(out.tokens[b, :k], state.tokens[b, ref_indices(n, k, 1 + b)])
    count = arrcoc.create("compressor", "random_keep", keep=3)(state)
    assert count.counts.tolist() == [3, 3, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_same_selection(dtype):
    state = make_state()
    a = arrcoc.create("compressor", "random_keep")(state)
    b = arrcoc.create("compressor", "random_keep")(state.to(dtype=dtype)).check()
    assert b.dtype == dtype and torch.equal(a.origin, b.origin)


def test_errors_and_pipeline():
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        arrcoc.create("compressor", "random_keep", keep=0.0)
    with pytest.raises(ParamsError, match="seed"):
        arrcoc.create("compressor", "random_keep", seed=-1)
    with pytest.raises(BudgetError, match="asked to keep 25 tokens, but an image has only 24"):
        arrcoc.create("compressor", "random_keep", keep=25)(make_state())
    assert arrcoc.resolve_spec("random_keep").compress[0].use == "random_keep"
    tiny = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}}
    out = arrcoc.run_pipeline({"name": "t", "encoder": tiny, "compress": [{"use": "random_keep", "keep": 4}]},
                              torch.rand(2, 3, 64, 64), device="cpu")
    assert out.counts.tolist() == [4, 4]
