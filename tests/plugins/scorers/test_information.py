import math

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.state import TokenState

H, W, D = 3, 4, 5


def reference(state, neighbours=8, pool="mean"):
    """Plain loops over patches and their neighbours on the unmerged grid."""
    feats, present = ops.unmerge(state)
    offsets = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    if neighbours == 4:
        offsets = [(-1, 0), (0, -1), (0, 1), (1, 0)]
    out = torch.full((state.B, state.N), -math.inf, dtype=torch.float64)
    for b in range(state.B):
        d = {}
        for i in range(H):
            for j in range(W):
                p = i * W + j
                if not present[b, p]:
                    continue
                cos = []
                for dr, dc in offsets:
                    r, c = i + dr, j + dc
                    if 0 <= r < H and 0 <= c < W and present[b, r * W + c]:
                        x, y = feats[b, p].double(), feats[b, r * W + c].double()
                        cos.append(float(x @ y / (x.norm() * y.norm())))
                d[p] = 1.0 - sum(cos) / len(cos) if cos else 1.0
        for n in range(int(state.counts[b])):
            vals = [v for p, v in d.items() if int(state.origin[b, p]) == n]
            out[b, n] = max(vals) if pool == "max" else sum(vals) / len(vals)
    return out


def make_state():
    g = torch.Generator().manual_seed(3)
    s = TokenState.from_patches(torch.randn(2, H * W, D, generator=g), (H, W))
    merged = ops.merge(s, torch.tensor([[1], [6]]), torch.tensor([[0], [2]]))
    # image 0 keeps 9 tokens, image 1 keeps 5 (ragged; patch 11 of image 0 isolated-ish)
    index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 8, 10], [0, 2, 4, 7, 9, 0, 0, 0, 0]])
    valid = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    return ops.keep(merged, index, valid).check()


@pytest.mark.parametrize("neighbours,pool", [(8, "mean"), (4, "mean"), (8, "max")])
def test_information_equals_plain_loop_reference(neighbours, pool):
    state = make_state()
    out = arrcoc.create("scorer", "information", neighbours=neighbours, pool=pool)(state).per_token["scores:information"]
    torch.testing.assert_close(out.double(), reference(state, neighbours, pool), atol=1e-5, rtol=1e-5)


def test_information_uniform_region_scores_zero_and_outlier_scores_high():
    tokens = torch.ones(1, 16, D)
    tokens[0, 5] = -1.0  # one patch points the other way
    s = TokenState.from_patches(tokens, (4, 4))
    out = arrcoc.create("scorer", "information")(s).per_token["scores:information"][0]
    assert out[5] == pytest.approx(2.0)  # cos -1 to every neighbour
    assert out[15] == pytest.approx(0.0, abs=1e-6)  # far from the outlier: identical neighbours
    assert out.argmax() == 5
