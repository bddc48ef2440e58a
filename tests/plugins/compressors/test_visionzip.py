"""VisionZip: equivalence with a loop over the official formula, invariants, errors, pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, MissingInputError, ParamsError
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.visionzip import VisionZip

H = W = 8
N0 = H * W


def make_state(B=3, D=12, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_patches(
        torch.randn(B, N0, D, generator=g), (H, W), cls_token=torch.randn(B, D, generator=g),
        per_token={"cls_attn": torch.rand(B, N0, generator=g).softmax(-1), "keys": torch.randn(B, N0, C, generator=g)},
    )


def reference(hidden, attn, metric, dominant, contextual):
    """Official CLIPVisionTower_VisionZip.forward for one image, written as plain loops.

    hidden / metric include the class token at row 0; attn is the CLS row over the patches.
    Returns (output tokens incl. CLS, owner of each patch as an output row index)."""
    n = attn.shape[0]
    top = sorted(range(n), key=lambda i: (-float(attn[i]), i))[: dominant - 1]
    keep_rows = sorted([0] + [i + 1 for i in top])  # CLS first, original order
    rest = [r for r in range(n + 1) if r not in keep_rows]
    M = len(rest)
    step = max(1, M // contextual)
    targets = list(range(0, M, step))[:contextual]
    unit = [metric[r] / metric[r].norm() for r in rest]
    members = {t: [] for t in targets}
    for p in range(M):
        if p in targets:
            continue
        sims = [float(unit[p] @ unit[t]) for t in targets]
        members[targets[max(range(len(targets)), key=lambda q: (sims[q], -q))]].append(p)
    out = [hidden[r] for r in keep_rows]
    owner = {}
    for pos, r in enumerate(keep_rows[1:]):
        owner[r - 1] = pos
    base = len(keep_rows) - 1
    for q, t in enumerate(targets):
        assigned = members[t]
        mean = torch.stack([hidden[rest[p]] for p in assigned]).mean(0) if assigned else torch.zeros_like(hidden[0])
        out.append(hidden[rest[t]] + mean)
        owner[rest[t] - 1] = base + q
        for p in assigned:
            owner[rest[p] - 1] = base + q
    return torch.stack(out), [owner[j] for j in range(n)]


@pytest.mark.parametrize("dominant,contextual", [(10, 5), (54 // 4, 10 // 4), (2, 1), (30, 30)])
def test_matches_official_formula(dominant, contextual):
    state = make_state()
    out = VisionZip(dominant=dominant, contextual=contextual)(state).check()
    assert out.counts.tolist() == [dominant - 1 + contextual] * state.B
    for b in range(state.B):
        hidden = torch.cat([state.cls[b : b + 1], state.tokens[b]])
        metric = torch.cat([torch.zeros(1, 6), state.per_token["keys"][b]])
        expected, owner = reference(hidden, state.per_token["cls_attn"][b], metric, dominant, contextual)
        torch.testing.assert_close(out.cls[b], expected[0])
        torch.testing.assert_close(out.tokens[b], expected[1:], rtol=1e-5, atol=1e-5)
        assert out.origin[b].tolist() == owner


def test_size_conserved_and_sizes_count_members():
    out = VisionZip(dominant=10, contextual=5)(make_state()).check()
    assert out.size.sum(1).tolist() == [float(N0)] * 3
    assert (out.size[:, :9] == 1).all()  # dominant patches stand for themselves
    counts = torch.stack([torch.bincount(o, minlength=out.N) for o in out.origin]).float()
    torch.testing.assert_close(counts, out.size)


def test_keep_presets_split_like_readme():
    big = TokenState.from_patches(torch.randn(1, 576, 8), (24, 24), cls_token=torch.randn(1, 8),
                                  per_token={"cls_attn": torch.rand(1, 576), "keys": torch.randn(1, 576, 4)})
    for total, (dom, ctx) in {64: (54, 10), 128: (108, 20), 192: (162, 30)}.items():
        assert [t.tolist() for t in VisionZip(keep=total).budgets(big)] == [[dom - 1], [ctx]]
        a = VisionZip(keep=total)(big)
        b = VisionZip(dominant=dom, contextual=ctx)(big)
        assert torch.equal(a.tokens, b.tokens) and a.token_counts() == (total,)
    # a ratio of the tokens (class token included): floor(577 * 0.25) = 144 -> round(22.5) = 23 contextual
    assert [t.tolist() for t in VisionZip(keep=0.25).budgets(big)] == [[144 - 23 - 1], [23]]


def ragged(state: TokenState, counts=(64, 50, 37), seed=1) -> TokenState:
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(N0, generator=g) for _ in counts])
    valid = torch.arange(N0)[None, :] < torch.tensor(counts)[:, None]
    return ops.keep(state, index, valid).check()


@pytest.mark.parametrize("params", [{"dominant": 8, "contextual": 4}, {"keep": 0.3}])
def test_ragged_batch_equals_per_image_runs(params):
    state = ragged(make_state())
    plugin = VisionZip(**params)
    out = plugin(state).check()
    assert len(set(out.counts.tolist())) == (1 if "dominant" in params else 3)
    for b in range(state.B):
        one = plugin(state.image(b)).check()
        n = int(one.counts[0])
        assert int(out.counts[b]) == n
        torch.testing.assert_close(out.tokens[b, :n], one.tokens[0])
        assert torch.equal(out.origin[b], one.origin[0])
        torch.testing.assert_close(out.size[b, :n], one.size[0])
        torch.testing.assert_close(out.positions[b, :n], one.positions[0])
        assert (out.tokens[b, n:] == 0).all()


def test_masked_tokens_never_selected():
    state = ragged(make_state())
    # Padding gets the highest attention: must still never be picked.
    attn = state.per_token["cls_attn"].masked_fill(~state.mask, 10.0)
    out = VisionZip(dominant=8, contextual=4)(state.with_per_token(cls_attn=attn)).check()
    for b, n in enumerate(state.counts.tolist()):
        present = out.origin[b] >= 0
        assert int(present.sum()) == n  # every real patch is carried, nothing else
    assert out.size.sum(1).tolist() == [float(n) for n in state.counts.tolist()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state()
    half = dataclasses.replace(state, tokens=state.tokens.to(dtype), cls=state.cls.to(dtype))
    out, ref = VisionZip(dominant=10, contextual=5)(half).check(), VisionZip(dominant=10, contextual=5)(state)
    assert out.dtype == dtype
    assert torch.equal(out.origin, ref.origin)
    torch.testing.assert_close(out.tokens.float(), ref.tokens, rtol=2e-2, atol=3e-2)


def test_deterministic():
    state = make_state()
    a, b = VisionZip(keep=20)(state), VisionZip(keep=20)(state)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.origin, b.origin)


def test_bad_inputs():
    state = make_state()
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        VisionZip(keep=1.5)
    with pytest.raises(ParamsError, match="not both"):
        VisionZip(keep=64, dominant=54)
    with pytest.raises(BudgetError, match="asked to keep 100 tokens, but an image has only 65"):
        VisionZip(keep=100)(state)
    with pytest.raises(BudgetError, match="need 70 patch tokens, but image 0 has 64"):
        VisionZip(dominant=61, contextual=10)(state)
    no_attn = state.replace(per_token={"keys": state.per_token["keys"]})
    with pytest.raises(MissingInputError, match=r"per_token\['cls_attn'\].*timm_vit.*layer: -2"):
        VisionZip()(no_attn)
    no_keys = state.replace(per_token={"cls_attn": state.per_token["cls_attn"]})
    with pytest.raises(MissingInputError, match=r"per_token\['keys'\]"):
        VisionZip()(no_keys)


TINY = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}, "layer": -2}


def test_pipeline_with_tiny_vit():
    spec = {"name": "vz", "encoder": TINY, "compress": [{"use": "visionzip", "dominant": 6, "contextual": 3}]}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = arrcoc.run_pipeline(spec, images, device="cpu").check()
    assert state.trace[-1].tokens_in == (17, 17) and state.trace[-1].tokens_out == (9, 9)  # 6 dominant (CLS one of them) + 3 contextual
    assert state.size.sum(1).tolist() == [16.0, 16.0]


def test_pipeline_missing_cls_attention_is_caught_before_running():
    enc = {**TINY, "model_kwargs": {"depth": 2, "img_size": 64, "class_token": False, "global_pool": "avg"}}
    with pytest.raises(MissingInputError, match="needs 'cls_attention'.*no class token"):
        arrcoc.load_pipeline({"encoder": enc, "compress": [{"use": "visionzip"}]}, device="cpu")


def test_builtin_pipeline_file_loads():
    spec = arrcoc.resolve_spec("visionzip")
    assert [s.use for s in spec.compress] == ["visionzip"]
