"""FastV: attention-received scoring from the last token, and the `llm`-stage plugin."""

from __future__ import annotations

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, MissingInputError, ParamsError, SpecError
from arrcoc.state import TokenState
from arrcoc_plugins.compressors import fastv as F


def make_state(B=2, H=4, W=5, D=8, seed=0, counts=None, heads=False):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(B, H * W, 3, generator=g) if heads else torch.rand(B, H * W, generator=g)
    state = TokenState.from_patches(torch.randn(B, H * W, D, generator=g), (H, W), per_token={"attn_from_last": attn})
    if counts is not None:
        idx = torch.arange(H * W).expand(B, -1).contiguous()
        state = ops.keep(state, idx, idx < torch.tensor(counts)[:, None])
    return state


def test_scores_are_head_mean_attention_from_the_last_token():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(2, 4, 12, 12, generator=g)  # [B, heads, L, L]: 2 system, 6 image, 4 text tokens
    got = F.fastv_scores(attn, slice(2, 8))
    for b in range(2):
        for v in range(6):
            ref = sum(float(attn[b, h, 11, 2 + v]) for h in range(4)) / 4
            assert abs(float(got[b, v]) - ref) < 1e-6
    with pytest.raises(arrcoc.StateError, match=r"expected attention \[B, heads, L, L\]"):
        F.fastv_scores(attn[0])


def test_selection_matches_reference_order_and_positions():
    state = make_state()
    out = arrcoc.create("compressor", "fastv", keep=0.5)(state).check()
    for b in range(2):
        s = state.per_token["attn_from_last"][b].tolist()
        keep = sorted(sorted(range(20), key=lambda i: (-s[i], i))[:10])  # topk, then sorted: original order
        assert torch.equal(out.tokens[b], state.tokens[b, keep])
        assert torch.equal(out.positions[b], state.positions[b, keep])  # positions kept
        assert out.size[b].sum() == 10  # pure pruning


def test_per_head_field_is_averaged_over_heads():
    state = make_state(heads=True)
    out = arrcoc.create("compressor", "fastv", keep=6)(state)
    mean = state.with_per_token(attn_from_last=state.per_token["attn_from_last"].mean(-1))
    ref = arrcoc.create("compressor", "fastv", keep=6)(mean)
    assert torch.equal(out.tokens, ref.tokens)


def test_rounding_official_vs_floor():
    n = torch.tensor([7, 5, 576])
    assert F.fastv_keep_count(n, 0.5, "floor").tolist() == [3, 2, 288]
    assert F.fastv_keep_count(n, 0.5, "round").tolist() == [4, 2, 288]  # round(3.5)=4, round(2.5)=2
    assert [round(int(v) * 0.5) for v in n] == [4, 2, 288]  # Python's round, as the official code
    assert F.fastv_keep_count(n, 4, "round").tolist() == [4, 4, 4]  # counts are counts


def test_ragged_batch_equals_per_image_and_masked_never_selected():
    state = make_state(counts=[20, 9])
    plugin = arrcoc.create("compressor", "fastv", keep=0.5)
    out = plugin(state).check()
    assert out.counts.tolist() == [10, 4]
    assert bool((out.origin[1, 9:] == -1).all())
    for b, n in enumerate([20, 9]):
        one = TokenState.from_patches(state.tokens[b:b + 1, :n].contiguous(), (1, n), per_token={
            "attn_from_last": state.per_token["attn_from_last"][b:b + 1, :n]})
        single = plugin(one)
        k = int(single.counts[0])
        assert torch.equal(out.tokens[b, :k], single.tokens[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state().to(dtype=dtype)
    out = arrcoc.create("compressor", "fastv")(state).check()
    assert out.dtype == dtype and out.counts.tolist() == [10, 10]


def test_errors():
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        arrcoc.create("compressor", "fastv", keep=2.0)
    with pytest.raises(ParamsError, match="layer"):
        arrcoc.create("compressor", "fastv", layer=0)
    with pytest.raises(BudgetError, match="asked to keep 21 tokens, but an image has only 20"):
        arrcoc.create("compressor", "fastv", keep=21)(make_state())
    with pytest.raises(MissingInputError, match=r"per_token\['attn_from_last'\].*integrations.hf"):
        arrcoc.create("compressor", "fastv")(make_state().replace(per_token={}))


def test_llm_stage_in_pipelines():
    assert F.FastV.stage == "llm"
    spec = arrcoc.resolve_spec("fastv")
    assert spec.llm[0].use == "fastv" and spec.llm[0].params == {"layer": 2, "keep": 0.5}
    tiny = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}}
    with pytest.raises(SpecError, match="put it under 'llm:'"):
        arrcoc.resolve_spec({"name": "t", "encoder": tiny, "compress": [{"use": "fastv"}]})
    pipe = arrcoc.load_pipeline({"name": "t", "encoder": tiny, "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]},
                                device="cpu")
    assert [p.name for _, p in pipe.llm] == ["fastv"]
    out = pipe(torch.rand(1, 3, 64, 64))  # llm stages do not run before the LLM
    assert out.counts.tolist() == [16]
