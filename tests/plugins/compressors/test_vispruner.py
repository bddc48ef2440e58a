"""VisPruner: equality with a reference written from the official encode_images, ragged batches, ties, errors, budgets."""

from __future__ import annotations

import pytest
import torch

import arrcoc
from arrcoc.errors import BudgetError, InputError, MissingInputError, ParamsError
from arrcoc.plugin import BudgetContext
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.vispruner import VisPruner, diverse_schedule

H = W = 8
N0 = H * W


def make_state(B=3, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_patches(
        torch.randn(B, N0, D, generator=g).to(dtype), (H, W), cls_token=torch.randn(B, D, generator=g).to(dtype),
        per_token={"cls_attn": torch.rand(B, N0, generator=g).softmax(-1)},
    )


def reference(features, attn, T, r):
    """Official ``encode_images`` (llava_arch.py l.141-186) for one image, plain torch: kept indices, ascending.

    Stable sorts (the official argsort leaves ties to torch); the official ``while`` loop, generalised to an odd
    list (a = even positions, b = odd) where the official indexing raises."""
    important_num = int(T * r)
    diverse_num = T - important_num
    order = torch.sort(attn, descending=True, stable=True).indices
    important, residual = order[:important_num], order[important_num:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse_num > 0:
        R = residual.shape[0]
        step = min(8, R - diverse_num)
        if step <= 0:
            break
        tokens = unit[residual]
        a, b = tokens[::2], tokens[1::2]
        scores = (a @ b.T).max(dim=-1).values
        distinct = torch.sort(scores, descending=True, stable=True).indices[step:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    chosen = torch.cat([important, residual]) if diverse_num > 0 else important
    return sorted(chosen.tolist())


def kept_indices(out, b):
    """Original patch index of each kept token of image ``b`` (selection only: one patch per token)."""
    origin = out.origin[b]
    return [int((origin == k).nonzero()[0]) for k in range(int(out.counts[b]))]


@pytest.mark.parametrize("T,r", [(16, 0.5), (12, 0.75), (32, 0.5), (9, 0.5), (7, 0.0), (10, 1.0), (64, 0.5), (40, 0.3)])
def test_matches_official_reference(T, r):
    state = make_state()
    out = VisPruner(keep=T, important_ratio=r)(state).check()
    assert out.counts.tolist() == [T] * state.B
    for b in range(state.B):
        expected = reference(state.tokens[b], state.per_token["cls_attn"][b], T, r)
        assert kept_indices(out, b) == expected  # same tokens, original order
        torch.testing.assert_close(out.tokens[b, :T], state.tokens[b, expected], rtol=0, atol=0)
    assert torch.equal(out.cls, state.cls)


@pytest.mark.parametrize("T,r", [(64, 0.75), (128, 0.5)])
def test_matches_official_reference_at_llava_size(T, r):
    # 576 patches, the README settings: ~50-60 rounds, each reordering the survivors by score, so near-equal
    # scores must round as the official unit-vector products do (dividing the products by the norms instead
    # gave other picks for about 1 image in 8).
    g = torch.Generator().manual_seed(11)
    B, side, D = 8, 24, 64
    state = TokenState.from_patches(torch.randn(B, side * side, D, generator=g), (side, side),
                                    per_token={"cls_attn": torch.rand(B, side * side, generator=g)})
    out = VisPruner(keep=T, important_ratio=r)(state).check()
    for b in range(B):
        expected = reference(state.tokens[b], state.per_token["cls_attn"][b], T, r)
        assert torch.equal(out.tokens[b, :T], state.tokens[b, expected])


def test_official_readme_settings_split():
    # README: 128 tokens at r = 0.5 -> 64 + 64 (56 rounds of 8 on 576), 64 at r = 0.75 -> 48 + 16.
    assert diverse_schedule(576 - 64, 64) == [8] * 56
    assert diverse_schedule(576 - 48, 16) == [8] * 64
    assert diverse_schedule(576 - 32, 32, 8) == [8] * 64
    assert diverse_schedule(20, 3) == [8, 6, 3]  # min(8, R - T_div), at most ceil(R / 2) a-tokens
    assert diverse_schedule(10, 0) == []  # no diverse tokens: no rounds
    plugin = VisPruner(keep=64, important_ratio=0.75)
    imp, div = plugin.budgets(make_state())
    assert imp.tolist() == [48] * 3 and div.tolist() == [16] * 3


def test_ragged_batch_equals_each_image_alone():
    state = make_state(B=4, seed=3)
    # Drop a different number of tokens per image first (ragged rows, real tokens packed in front).
    pruned = arrcoc.ops.keep_topk(state, torch.rand(4, N0, generator=torch.Generator().manual_seed(1)),
                                  torch.tensor([64, 50, 37, 41]))
    for T, r in [(16, 0.5), (21, 0.5), (30, 0.25)]:
        out = VisPruner(keep=T, important_ratio=r)(pruned).check()
        for b in range(4):
            alone = VisPruner(keep=T, important_ratio=r)(pruned.image(b)).check()
            assert out.origin[b].tolist() == alone.origin[0].tolist()
            assert torch.equal(out.tokens[b, :T], alone.tokens[0, :T])
            n = int(pruned.counts[b])
            feats, attn = pruned.tokens[b, :n], pruned.per_token["cls_attn"][b, :n]
            expected = reference(feats, attn, T, r)
            assert torch.equal(alone.tokens[0, :T], feats[expected])


def test_ratio_keep_per_image_counts():
    state = make_state()
    out = VisPruner(keep=0.25)(state).check()
    assert out.counts.tolist() == [16] * 3


def test_ties_broken_by_index():
    # Equal attention everywhere: the important tokens are the lowest indices; identical features: every
    # cosine is 1, so each round drops the first a-tokens of the list.
    B, D = 2, 4
    state = TokenState.from_patches(torch.ones(B, N0, D), (H, W), cls_token=torch.zeros(B, D),
                                    per_token={"cls_attn": torch.full((B, N0), 1.0 / N0)})
    out = VisPruner(keep=16, important_ratio=0.5)(state).check()
    expected = reference(torch.ones(N0, D), torch.full((N0,), 1.0 / N0), 16, 0.5)
    assert expected[:8] == list(range(8))
    for b in range(B):
        assert kept_indices(out, b) == expected


def test_half_precision_features_and_attention():
    state = make_state(dtype=torch.float16)
    state = state.replace(per_token={"cls_attn": state.per_token["cls_attn"].half()})
    out = VisPruner(keep=20)(state).check()
    assert out.tokens.dtype == torch.float16
    for b in range(3):
        expected = reference(state.tokens[b].float(), state.per_token["cls_attn"][b].float(), 20, 0.5)
        assert kept_indices(out, b) == expected


def test_keep_everything_is_identity():
    state = make_state()
    out = VisPruner(keep=N0)(state).check()
    assert torch.equal(out.tokens, state.tokens)
    assert out.origin.tolist() == state.origin.tolist()


def test_budget_above_tokens_is_an_error():
    with pytest.raises(BudgetError, match=r"vispruner.keep: asked to keep 65 tokens, but an image has only 64"):
        VisPruner(keep=65)(make_state())


def test_missing_attention_is_an_error():
    state = make_state()
    bare = state.replace(per_token={})
    with pytest.raises(MissingInputError, match=r"vispruner: needs per_token\['cls_attn'\].*the state has none"):
        VisPruner()(bare)
    no_cls = TokenState.from_patches(state.tokens, (H, W))
    with pytest.raises(MissingInputError, match=r"no class token: use `signal: received` \(the official rule for such towers, SigLIP"):
        VisPruner()(no_cls)
    with pytest.raises(InputError, match=r"must be \[B, N\]=\[3, 64\] scores, got \[3, 64, 2\]"):
        VisPruner()(state.replace(per_token={"cls_attn": torch.rand(3, 64, 2)}))


def test_params_are_checked():
    with pytest.raises(ParamsError, match="important_ratio"):
        VisPruner(important_ratio=1.5)
    with pytest.raises(ParamsError, match="ratio: unknown parameter; valid: keep, important_ratio, step, signal, score, attention_map"):
        VisPruner(ratio=0.5)


def test_budget_rule_reaches_its_targets():
    context = BudgetContext(tokens=576, original=576, grid=(24, 24), layers=32, has_cls=True)
    assert VisPruner.budget_bounds({}, context) == (1.0, 576.0)
    for target in (32, 64, 144, 576):
        params = VisPruner.budget_params({"important_ratio": 0.75}, float(target), context)
        assert params == {"important_ratio": 0.75, "keep": target}
        state = make_state()
        small = BudgetContext(tokens=N0, original=N0, grid=(H, W), layers=4, has_cls=True)
        k = VisPruner.budget_params({}, target * N0 / 576, small)["keep"]
        assert VisPruner(**VisPruner.budget_params({}, target * N0 / 576, small))(state).counts.tolist() == [k] * 3


def test_registered_and_validates():
    assert arrcoc.create("compressor", "vispruner", keep=64).params.keep == 64


def reference_received(maps, prefix):
    """Official SigLIP importance (siglip_encoder.py l.34-41 + encode_images' head mean): per head
    attentions[-1].mean(dim=-2), then the mean over heads; here from per-head maps, plain loops over heads."""
    return torch.stack([m.mean(dim=-2) for m in maps.unbind(1)], 1).mean(1)[:, prefix:]


@pytest.mark.parametrize("prefix", [0, 1])
def test_received_signal_matches_official_siglip_rule(prefix):
    g = torch.Generator().manual_seed(5)
    B, heads, D = 2, 3, 16
    per_head = torch.rand(B, heads, N0 + prefix, N0 + prefix, generator=g).softmax(-1)
    head_mean = per_head.mean(1)  # what timm_vit hands on in meta["attention_maps"]
    features = torch.randn(B, N0, D, generator=g)
    state = TokenState.from_patches(features, (H, W)).with_meta(
        attention_maps=(torch.rand(B, N0 + prefix, N0 + prefix, generator=g), head_mean), num_prefix_tokens=prefix)
    plugin = VisPruner(keep=20, signal="received")
    assert plugin.requirements() == frozenset({"attention_maps"})
    out = plugin(state).check()
    importance = reference_received(per_head, prefix)
    torch.testing.assert_close(plugin.importance(state), importance, rtol=1e-6, atol=1e-7)
    for b in range(B):
        assert kept_indices(out, b) == reference(features[b], importance[b], 20, 0.5)
    # attention_map picks another of the maps: a different importance.
    other = VisPruner(keep=20, signal="received", attention_map=0).importance(state)
    assert not torch.allclose(other, importance)


def test_received_signal_errors():
    state = make_state()
    with pytest.raises(MissingInputError, match=r"state.meta\['attention_maps'\] is missing"):
        VisPruner(signal="received")(state)
    maps = (torch.rand(3, N0, N0),)
    with pytest.raises(InputError, match=r"attention_map=-2: the encoder gave 1 attention maps \(valid: -1..0\)"):
        VisPruner(signal="received", attention_map=-2)(state.with_meta(attention_maps=maps))
    with pytest.raises(InputError, match=r"expected attention maps \[B=3, M, 65\].*got \[3, 64, 64\]"):
        VisPruner(signal="received")(state.with_meta(attention_maps=maps, num_prefix_tokens=1))


def test_received_signal_in_a_pipeline_on_a_tower_without_class_token():
    spec = {"name": "vp_siglip", "encoder": {"use": "timm_vit", "model": "vit_base_patch16_siglip_224", "layer": -1,
                                             "model_kwargs": {"depth": 2, "img_size": 64, "embed_dim": 64,
                                                              "num_heads": 2}},
            "compress": [{"use": "vispruner", "keep": 6, "signal": "received"}]}
    out = arrcoc.run_pipeline(spec, torch.rand(2, 3, 64, 64))
    assert out.counts.tolist() == [6, 6] and out.cls is None
    with pytest.raises(MissingInputError, match=r"needs 'cls_attention'.*has no class token"):
        arrcoc.run_pipeline({**spec, "compress": [{"use": "vispruner", "keep": 6}]}, torch.rand(1, 3, 64, 64))


def test_received_field_is_read_with_attention_map_null():
    # The encoder's own per-token 'attn_received' (inside a model: the Qwen2-VL towers), need 'attention_received':
    # the importance as it is, then the official selection.
    g = torch.Generator().manual_seed(7)
    state = make_state().replace(cls=None, per_token={"attn_received": torch.rand(3, N0, generator=g)})
    plugin = VisPruner(keep=20, signal="received", attention_map=None)
    assert plugin.requirements() == frozenset({"attention_received"})
    assert VisPruner(signal="received").requirements() == frozenset({"attention_maps"})
    out = plugin(state).check()
    for b in range(3):
        assert kept_indices(out, b) == reference(state.tokens[b], state.per_token["attn_received"][b], 20, 0.5)
    with pytest.raises(MissingInputError, match=r"attention_map: null\): needs per_token\['attn_received'\].*"
                                                r"with timm_vit use `attention_map: -1`"):
        plugin(make_state())
    with pytest.raises(MissingInputError, match=r"`attention_map: null` reads the encoder's own per_token"):
        VisPruner(keep=20)(state)
