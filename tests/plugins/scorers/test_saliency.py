
import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import InputError, MissingInputError
from arrcoc.state import TokenState
from arrcoc_plugins.scorers.saliency import attention_rollout

H, W, P = 3, 3, 1
N0 = H * W


def random_maps(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.softmax(torch.randn(B, N0 + P, N0 + P, generator=g), -1) for _ in range(L))


def reference_rollout(maps, residual=0.5):
    """Plain loops: A' = (1 - r) A + r I, rows renormalised, R = A'_L ... A'_1."""
    B, n, _ = maps[0].shape
    out = []
    for b in range(B):
        R = None
        for A in maps:
            Ah = [[(1 - residual) * float(A[b, i, j]) + (residual if i == j else 0.0) for j in range(n)] for i in range(n)]
            Ah = [[v / sum(row) for v in row] for row in Ah]
            if R is None:
                R = Ah
            else:
                R = [[sum(Ah[i][m] * R[m][j] for m in range(n)) for j in range(n)] for i in range(n)]
        out.append(R)
    return torch.tensor(out)


def make_state(B=2, D=4):
    g = torch.Generator().manual_seed(1)
    s = TokenState.from_patches(
        torch.randn(B, N0, D, generator=g), (H, W), cls_token=torch.randn(B, D, generator=g),
        per_token={"cls_attn": torch.rand(B, N0, generator=g)},
    )
    return s.with_meta(attention_maps=random_maps(B, 3), num_prefix_tokens=P)


def test_rollout_equals_plain_loop_reference():
    maps = random_maps(2, 3)
    torch.testing.assert_close(attention_rollout(maps), reference_rollout(maps).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_rollout(maps, 0.2), reference_rollout(maps, 0.2).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_rollout_maps_to_compressed_tokens_through_origin(pool):
    state = make_state()
    # merge patch 1 into 0 and 5 into 4 (both images), then drop the token that holds patch 8 in image 0.
    merged = ops.merge(state, torch.tensor([[1, 5], [1, 5]]), torch.tensor([[0, 4], [0, 4]]))
    index = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 6]])
    kept = ops.keep(merged, index, torch.ones_like(index, dtype=torch.bool))
    kept.check()
    out = arrcoc.create("scorer", "saliency", method="rollout", pool=pool)(kept).per_token["scores:saliency"]
    ref = reference_rollout(state.meta["attention_maps"])[:, 0, P:]
    expect = torch.zeros(kept.B, kept.N, dtype=torch.float64)
    for b in range(kept.B):
        for n in range(kept.N):
            patches = [j for j in range(N0) if int(kept.origin[b, j]) == n]
            total = sum(float(ref[b, j]) for j in patches)
            expect[b, n] = total / len(patches) if pool == "mean" else total
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


def test_cls_attention_passthrough_and_field():
    state = make_state().with_per_token(**{"cls_attn@1": torch.ones(2, N0)})
    out = arrcoc.create("scorer", "saliency")(state).per_token["scores:saliency"]
    torch.testing.assert_close(out, state.per_token["cls_attn"])
    out = arrcoc.create("scorer", "saliency", field="cls_attn@1")(state).per_token["scores:saliency"]
    assert torch.equal(out, torch.ones(2, N0))


def test_requirements_follow_method():
    assert arrcoc.create("scorer", "saliency").requirements() == {"cls_attention"}
    assert arrcoc.create("scorer", "saliency", method="rollout").requirements() == {"attention_maps"}


def test_saliency_missing_inputs():
    state = make_state()
    bare = TokenState.from_patches(state.tokens, (H, W))
    with pytest.raises(MissingInputError, match=r"per_token\['cls_attn'\] is missing"):
        arrcoc.create("scorer", "saliency")(bare)
    with pytest.raises(MissingInputError, match=r"attention_maps"):
        arrcoc.create("scorer", "saliency", method="rollout")(bare)
    with pytest.raises(MissingInputError, match="class token"):
        arrcoc.create("scorer", "saliency", method="rollout")(state.with_meta(num_prefix_tokens=0))
    wrong = state.with_meta(attention_maps=tuple(m[:, 1:, 1:] for m in state.meta["attention_maps"]))
    with pytest.raises(InputError, match=r"cover 9 tokens, expected 10"):
        arrcoc.create("scorer", "saliency", method="rollout")(wrong)


def test_saliency_in_a_real_encoder_run():
    spec = {
        "encoder": {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}},
        "score": [{"use": "saliency", "method": "rollout"}],
    }
    state = arrcoc.run_pipeline(spec, torch.rand(1, 3, 64, 64))
    s = state.per_token["scores:saliency"]
    assert s.shape == (1, 16) and torch.isfinite(s).all()
    # The CLS row of a row-stochastic product sums to 1; the patches hold what the CLS column does not.
    roll = attention_rollout(state.meta["attention_maps"])
    assert float(s.sum()) == pytest.approx(1.0 - float(roll[0, 0, 0]), abs=1e-5)
