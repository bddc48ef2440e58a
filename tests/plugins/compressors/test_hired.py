"""HiRED: equivalence with loops over the official selection, invariants, errors, pipeline."""

from __future__ import annotations


import pytest
import yaml
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError, ParamsError
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.hired import HiRED

H = W = 8
N0 = H * W


def make_state(B=3, D=8, seed=0, cls=True):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_patches(
        torch.randn(B, N0, D, generator=g), (H, W), cls_token=torch.randn(B, D, generator=g) if cls else None,
        per_token={"cls_attn": torch.rand(B, N0, generator=g), "cls_attn@0": torch.rand(B, N0, generator=g)},
    )


def topk(scores, k):
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]


def reference_group(bottom, top_full, rate, alpha, crops, mapping="flat"):
    """Official HiRED_token_selection + HiRED_sub_img_budgets for one group [full, crops...]: masks [P, N]."""
    P, n = bottom.shape
    rows, cols = crops
    total = int(P * n * rate)
    full = min(int(total * alpha), n)
    sub = min(total - full, (P - 1) * n)
    mask = torch.zeros(P, n, dtype=torch.bool)
    mask[0, topk(bottom[0], full)] = True
    if sub > 0:
        spatial = torch.zeros(n, dtype=torch.bool)
        spatial[topk(top_full, int(n * (1 - alpha)))] = True
        if mapping == "flat":
            per_crop = spatial.reshape(rows, cols, -1).sum(-1).reshape(-1)
        else:
            per_crop = spatial.reshape(rows, H // rows, cols, W // cols).sum((1, 3)).reshape(-1)
        budget = torch.clamp((per_crop / per_crop.sum() * sub).int(), max=n)
        for i, k in enumerate(budget.tolist()):
            mask[i + 1, topk(bottom[i + 1], k)] = True
    return mask


def test_single_images_keep_top_int_n_rate_in_order():
    state = make_state()
    out = HiRED()(state).check()
    k = int(N0 * 0.2)
    for b in range(3):
        idx = sorted(topk(state.per_token["cls_attn"][b], k))
        assert torch.equal(out.tokens[b], state.tokens[b, idx])  # values untouched, original order
        assert out.origin[b].tolist() == [idx.index(j) if j in idx else -1 for j in range(N0)]
    assert out.size.sum(1).tolist() == [float(k)] * 3  # pure pruning
    assert torch.equal(out.cls, state.cls)
    assert HiRED(keep=5)(state).counts.tolist() == [5, 5, 5]


@pytest.mark.parametrize("mapping", ["flat", "grid"])
@pytest.mark.parametrize("rate,alpha", [(0.2, 0.5), (0.5, 0.3), (0.05, 0.7)])
def test_groups_match_official_budget_split(mapping, rate, alpha):
    state = make_state(B=10, seed=2)  # two groups: [full, 4 crops]
    out = HiRED(keep=rate, alpha=alpha, crops=(2, 2), mapping=mapping)(state).check()
    bottom, top = state.per_token["cls_attn"], state.per_token["cls_attn@0"]
    for g in range(2):
        rows = slice(5 * g, 5 * g + 5)
        mask = reference_group(bottom[rows], top[5 * g], rate, alpha, (2, 2), mapping)
        for p in range(5):
            b = 5 * g + p
            idx = mask[p].nonzero().flatten()
            assert int(out.counts[b]) == len(idx)
            assert torch.equal(out.tokens[b, : len(idx)], state.tokens[b, idx])


def test_flat_and_grid_mappings_differ_as_documented():
    from arrcoc_plugins.compressors.hired import crop_of_positions

    pos = make_state(B=1).positions
    flat = crop_of_positions(pos, (H, W), (2, 2), "flat").view(H, W)
    grid = crop_of_positions(pos, (H, W), (2, 2), "grid").view(H, W)
    assert flat[:2].eq(0).all() and flat[2:4].eq(1).all() and flat[6:].eq(3).all()  # horizontal bands
    assert grid[:4, :4].eq(0).all() and grid[:4, 4:].eq(1).all() and grid[4:, :4].eq(2).all()  # quadrants


def test_one_by_three_crops_and_count_budget():
    state = make_state(B=8, seed=4)  # two groups [full, 3 crops]
    out = HiRED(keep=60, crops=(1, 3))(state).check()
    counts = out.counts.view(2, 4)
    assert counts[:, 0].tolist() == [30, 30]  # int(60 * 0.5)
    assert bool((counts[:, 1:].sum(1) <= 30).all()) and bool((counts[:, 1:].sum(1) >= 28).all())  # floors


def test_ragged_batch_equals_per_image_runs_and_padding_is_never_kept():
    state = make_state()
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(N0, generator=g) for _ in range(3)])
    state = ops.keep(state, index, torch.arange(N0)[None] < torch.tensor([[64], [40], [23]])).check()
    state = state.with_per_token(cls_attn=state.per_token["cls_attn"].masked_fill(~state.mask, 9.0))
    out = HiRED(keep=0.25)(state).check()
    assert out.counts.tolist() == [16, 10, 5]
    for b in range(3):
        one = HiRED(keep=0.25)(state.image(b)).check()
        n = int(one.counts[0])
        assert torch.equal(out.tokens[b, :n], one.tokens[0]) and torch.equal(out.origin[b], one.origin[0])
    assert out.size.sum(1).tolist() == [16.0, 10.0, 5.0]


def test_groups_after_a_merging_stage_use_positions():
    # merged tokens: the full image's chunk comes from each token's (row, col) centroid
    state = make_state(B=5, seed=5)
    from arrcoc_plugins.compressors.tome import ToMe

    merged = ToMe(r=8, metric="tokens")(state).check()
    out = HiRED(keep=0.3, crops=(2, 2))(merged).check()
    assert out.counts[0] == min(int(int(5 * 56 * 0.3) * 0.5), 56)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state(B=5)
    half = state.to(dtype=dtype).with_per_token(**{k: v.to(dtype) for k, v in state.per_token.items()})
    out = HiRED(crops=(2, 2))(half).check()
    ref = HiRED(crops=(2, 2))(state)
    assert out.dtype == dtype and out.counts.tolist() == ref.counts.tolist()


def test_bad_inputs():
    state = make_state()
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        HiRED(keep=1.2)
    with pytest.raises(ParamsError, match="alpha"):
        HiRED(alpha=1.0)
    with pytest.raises(ParamsError, match="crops"):
        HiRED(crops=(0, 2))
    with pytest.raises(BudgetError, match="asked to keep 65 tokens, but an image has only 64"):
        HiRED(keep=65)(state)
    with pytest.raises(BudgetError, match="per group"):
        HiRED(keep=400, crops=(2, 2))(make_state(B=5))
    with pytest.raises(InputError, match="groups of 5 views"):
        HiRED(crops=(2, 2))(state)
    with pytest.raises(MissingInputError, match=r"per_token\['cls_attn'\].*timm_vit"):
        HiRED()(state.replace(per_token={}))
    five = make_state(B=5)
    with pytest.raises(MissingInputError, match=r"cls_attn@0.*extra_attention_layers: \[0\]"):
        HiRED(crops=(2, 2))(five.replace(per_token={"cls_attn": five.per_token["cls_attn"]}))


TINY = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64},
        "layer": -2, "extra_attention_layers": [0]}


def test_pipeline_single_and_groups():
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    single = arrcoc.run_pipeline({"encoder": TINY, "compress": [{"use": "hired", "keep": 0.25}]}, images, device="cpu")
    assert single.trace[-1].tokens_out == (5,) * 5  # 4 patches + CLS
    grouped = arrcoc.run_pipeline(
        {"encoder": TINY, "compress": [{"use": "hired", "keep": 0.25, "crops": [2, 2]}]}, images, device="cpu"
    ).check()
    # total int(5 * 16 * 0.25) = 20: the full image takes int(20 * 0.5) = 10, the crops share at most 10
    assert int(grouped.counts[0]) == 10 and 0 < int(grouped.counts[1:].sum()) <= 10


def test_pipeline_without_class_token_is_rejected_before_running():
    enc = {**TINY, "model_kwargs": {"depth": 2, "img_size": 64, "class_token": False, "global_pool": "avg"}}
    enc.pop("extra_attention_layers")
    with pytest.raises(MissingInputError, match="hired.*needs 'cls_attention'"):
        arrcoc.load_pipeline({"encoder": enc, "compress": [{"use": "hired"}]}, device="cpu")


def test_builtin_pipelines_load():
    assert arrcoc.resolve_spec("hired").compress[0].use == "hired"


def test_multistage_pipeline_composes_existing_stages():
    spec = arrcoc.resolve_spec("hired_multistage")
    assert [s.use for s in spec.compress] == ["hired", "sparsevlm"] and [s.use for s in spec.llm] == ["fastv"]
    data = {**yaml.safe_load(spec.to_yaml()), "encoder": TINY}  # same stages on a tiny ViT
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = arrcoc.run_pipeline(data, images, query="a red ball", device="cpu").check()
    assert [r.plugin for r in state.trace] == ["timm_vit", "hired", "sparsevlm"]
    assert [r.tokens_out for r in state.trace] == [(17, 17), (9, 9), (5, 5)]  # 16 -> 8 -> 4 patches (+ CLS)
