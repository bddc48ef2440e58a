"""PruMerge / PruMerge+: equivalence with loops over the official code, invariants, errors, pipeline."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import ArrcocWarning, BudgetError, MissingInputError, ParamsError
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.prumerge import PruMerge, PruMergePlus, iqr_outlier_count

H = W = 10
N0 = H * W


def make_state(B=3, D=12, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = (2.5 * torch.randn(B, N0, generator=g)).softmax(-1)  # heavy-tailed: a few outliers
    return TokenState.from_patches(
        torch.randn(B, N0, D, generator=g), (H, W), cls_token=torch.randn(B, D, generator=g),
        per_token={"cls_attn": attn, "keys": torch.randn(B, N0, C, generator=g)},
    )


def reference(x, keys, attn, plus, neighbors=32):
    """Official token_prune_merge_advanced(_plus) for one image, as plain loops.

    Returns (kept indices in output order, output tokens, owner: output row of each patch)."""
    n = attn.shape[0]
    a = attn.to(torch.float32).numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / n
    idx = sorted(range(n), key=lambda i: (-a[i], i))[: int(n * ratio)]
    if plus:
        step = int(1 / ratio)
        idx = idx + [i for i in range(0, n - 1, int(step / 3)) if i not in idx]
    compl = [i for i in range(n) if i not in idx]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    out, absorbers = [], {j: [] for j in compl}
    for pos, i in enumerate(idx):
        rest = [j for j in idx if j != i] + compl
        sims = [float(unit[i] @ unit[j]) for j in rest]
        top = sorted(range(len(rest)), key=lambda t: -sims[t])[:neighbors]
        out.append(x[i] + sum(attn[rest[t]] * x[rest[t]] for t in top))
        for t in top:
            if rest[t] in absorbers:
                absorbers[rest[t]].append((sims[t], pos))
    out.append(sum(attn[j] * x[j] for j in compl))
    # Provenance (arrcoc's rule): the absorbing kept token with the highest cosine, else the extra token.
    host = max(compl, key=lambda j: (a[j], -j))
    owner = {i: pos for pos, i in enumerate(idx)}
    for j in compl:
        owner[j] = max(absorbers[j])[1] if absorbers[j] and j != host else len(idx)
    return idx, torch.stack(out), [owner[j] for j in range(n)]


@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
def test_matches_official_code(cls):
    state = make_state()
    out = cls()(state).check()
    for b in range(state.B):
        idx, expected, owner = reference(state.tokens[b], state.per_token["keys"][b], state.per_token["cls_attn"][b],
                                         plus=cls is PruMergePlus)
        assert int(out.counts[b]) == len(idx) + 1
        torch.testing.assert_close(out.tokens[b, : len(idx) + 1], expected, rtol=1e-5, atol=1e-5)
        assert out.origin[b].tolist() == owner
    torch.testing.assert_close(out.size, torch.stack([torch.bincount(o, minlength=out.N) for o in out.origin]).float())
    assert out.size.sum(1).tolist() == [float(N0)] * 3
    assert cls().adaptive  # the outlier count depends on the image


def test_a_fixed_keep_makes_prumerge_count_known_in_advance_but_not_prumerge_plus():
    """``keep`` (the official ``if_adaptive=False``) gives keep + 1 tokens whatever the image: a fixed count that
    serving engines (arrcoc.vllm) can reserve placeholders for; PruMerge+'s samples still depend on the image."""
    fixed = PruMerge(keep=9)
    assert not fixed.adaptive
    assert fixed(make_state()).check().counts.tolist() == [10] * 3
    assert PruMergePlus(keep=9).adaptive


def test_adaptive_counts_follow_iqr_per_image():
    state = make_state(B=4, seed=3)
    a = state.per_token["cls_attn"]
    expected = []
    for b in range(4):
        v = a[b].numpy()
        q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
        expected.append(int((v > q3 + 1.5 * (q3 - q1)).sum()))
    assert iqr_outlier_count(a, state.mask).tolist() == expected
    assert PruMerge()(state).counts.tolist() == [e + 1 for e in expected]
    assert len(set(expected)) > 1  # ragged output counts


def test_fixed_keep_and_plus_sampling():
    state = make_state()
    out = PruMerge(keep=10)(state).check()
    assert out.counts.tolist() == [11, 11, 11]
    top = state.per_token["cls_attn"].topk(10, dim=1).indices
    # kept tokens in descending attention, each still carrying its own patch
    assert all(out.origin[b, top[b]].tolist() == list(range(10)) for b in range(3))
    plus = PruMergePlus(keep=5)(state).check()  # ratio 1/20: step 20, stride 6
    for b in range(3):
        kept = set(top[b, :5].tolist())
        samples = [i for i in range(0, N0 - 1, 6) if i not in kept]
        assert int(plus.counts[b]) == 5 + len(samples) + 1
        assert plus.origin[b, samples].tolist() == list(range(5, 5 + len(samples)))


def test_edge_cases_are_handled_with_warnings():
    state = make_state(B=2)
    flat = state.with_per_token(cls_attn=torch.full((2, N0), 1.0 / N0))
    with pytest.warns(ArrcocWarning, match="no attention outlier"):
        out = PruMergePlus()(flat).check()  # official: ZeroDivisionError
    # one token kept (index 0 on ties), ratio 1/N: step N, stride N // 3 = 33 -> samples 33, 66
    assert out.counts.tolist() == [4, 4]
    assert out.origin[0, [0, 33, 66]].tolist() == [0, 1, 2]
    with pytest.warns(ArrcocWarning, match="above 1/3"):
        dense = PruMergePlus(keep=0.5)(state).check()  # official: arange step 0
    # every token but the last is kept (top 50 + samples 0..98); the last is kept or becomes the extra token
    assert dense.counts.tolist() == [N0, N0] and bool((dense.size == 1).all())
    small = TokenState.from_patches(torch.randn(1, 16, 4), (4, 4), per_token={
        "cls_attn": torch.rand(1, 16), "keys": torch.randn(1, 16, 3)})
    with pytest.warns(ArrcocWarning, match="fewer than 33 tokens"):
        out = PruMerge(keep=2)(small).check()
    kept = small.per_token["cls_attn"][0].topk(2).indices
    x, a = small.tokens[0], small.per_token["cls_attn"][0]
    total = (a[:, None] * x).sum(0)
    torch.testing.assert_close(out.tokens[0, 0], x[kept[0]] + total - a[kept[0]] * x[kept[0]])


@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
def test_ragged_batch_equals_per_image_runs_and_padding_is_never_used(cls):
    state = make_state()
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(N0, generator=g) for _ in range(3)])
    state = ops.keep(state, index, torch.arange(N0)[None] < torch.tensor([[100], [70], [45]])).check()
    # padding with huge attention must not be selected
    state = state.with_per_token(cls_attn=state.per_token["cls_attn"].masked_fill(~state.mask, 5.0))
    out = cls()(state).check()
    for b in range(3):
        one = cls()(state.image(b)).check()
        n = int(one.counts[0])
        assert int(out.counts[b]) == n
        torch.testing.assert_close(out.tokens[b, :n], one.tokens[0])
        assert torch.equal(out.origin[b], one.origin[0])
        torch.testing.assert_close(out.size[b, :n], one.size[0])
    assert out.size.sum(1).tolist() == [100.0, 70.0, 45.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state()
    half = dataclasses.replace(state, tokens=state.tokens.to(dtype), cls=state.cls.to(dtype))
    out, ref = PruMergePlus()(half).check(), PruMergePlus()(state)
    assert out.dtype == dtype and torch.equal(out.origin, ref.origin)
    torch.testing.assert_close(out.tokens.float(), ref.tokens, rtol=2e-2, atol=5e-2)


def test_bad_inputs():
    state = make_state()
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        PruMerge(keep=0.0)
    with pytest.raises(ParamsError, match="neighbors"):
        PruMerge(neighbors=0)
    with pytest.raises(BudgetError, match="asked to keep 500 tokens, but an image has only 100"):
        PruMerge(keep=500)(state)
    with pytest.raises(MissingInputError, match=r"cls_attn.*attention_layer: -1, cls_attention_heads: single"):
        PruMerge()(state.replace(per_token={"keys": state.per_token["keys"]}))
    with pytest.raises(MissingInputError, match=r"per_token\['keys'\]"):
        PruMergePlus()(state.replace(per_token={"cls_attn": state.per_token["cls_attn"]}))


ENC = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64},
       "layer": -2, "attention_layer": -1, "cls_attention_heads": "single"}


def test_encoder_single_head_attention_is_prumerge_attention():
    """cls_attention_heads: single == softmax(q k^T * C ** -0.5) from the last block's q/k on hidden_states[-2]."""
    pipe = arrcoc.load_pipeline({"encoder": ENC, "compress": [{"use": "prumerge"}]}, device="cpu")
    enc = pipe.encoder
    pixels = enc.preprocess(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    state = enc.encode(pixels)
    m = enc.model
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))
        h = m.blocks[0](h)  # hidden_states[-2] of a 2-block model
        blk = m.blocks[1]
        C = h.shape[-1]
        q, k, _ = blk.attn.qkv(blk.norm1(h)).split(C, dim=-1)  # q_proj / k_proj outputs (with bias)
        attn = ((q @ k.transpose(1, 2)) * C ** -0.5).softmax(-1)
    torch.testing.assert_close(state.per_token["cls_attn"], attn[:, 0, 1:])
    torch.testing.assert_close(state.per_token["keys"], k[:, 1:])
    torch.testing.assert_close(state.tokens, h[:, 1:])


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_pipeline_with_tiny_vit(name):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArrcocWarning)  # 16 tokens < 33: neighbours clamped
        state = arrcoc.run_pipeline({"encoder": ENC, "compress": [{"use": name}]}, images, device="cpu").check()
    assert state.trace[-1].plugin == name
    assert state.size.sum(1).tolist() == [16.0, 16.0]
    assert arrcoc.resolve_spec(name).encoder.params["cls_attention_heads"] == "single"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
def test_tied_key_cosines_give_the_same_neighbours_batched_and_alone(cls, seed):
    # few distinct keys: many equal cosines; torch.topk's order of ties depended on the row length
    g = torch.Generator().manual_seed(seed)
    attn = (2.5 * torch.randn(3, N0, generator=g)).softmax(-1)
    keys = torch.randint(0, 3, (3, N0, 4), generator=g).float()
    state = TokenState.from_patches(torch.randn(3, N0, 6, generator=g), (H, W), per_token={"cls_attn": attn, "keys": keys})
    state = ops.keep(state, torch.arange(N0).expand(3, N0).contiguous(), torch.arange(N0)[None] < torch.tensor([[100], [70], [45]]))
    out = cls()(state).check()
    for b in range(3):
        one = cls()(state.image(b)).check()
        n = int(one.counts[0])
        assert torch.equal(out.origin[b], one.origin[0])
        assert torch.equal(out.size[b, :n], one.size[0])
        torch.testing.assert_close(out.tokens[b, :n], one.tokens[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
def test_duplicate_keys_give_the_same_result_batched_and_alone(cls, dtype):
    # Counterexample class of the property tests: keys copied from 3 vectors, so whole groups of cosines are
    # mathematically equal; float32 products rounded them differently in a batch and alone
    # (now ranked by ops.similarity_key: equal cosines are equal, ties go to the lower index).
    fails = 0
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        attn = torch.floor(3 * torch.rand(3, N0, generator=g)) / 3
        keys = torch.randn(3, 3, 6, generator=g).gather(1, torch.randint(0, 3, (3, N0, 1), generator=g).expand(3, N0, 6))
        state = TokenState.from_patches(torch.randn(3, N0, 2, generator=g).to(dtype), (H, W),
                                        per_token={"cls_attn": attn.to(dtype), "keys": keys.to(dtype)})
        state = ops.keep(state, torch.arange(N0).expand(3, N0).contiguous(),
                         torch.arange(N0)[None] < torch.tensor([[100], [70], [45]]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ArrcocWarning)
            out = cls()(state)
            for b in range(3):
                one = cls()(state.image(b))
                fails += not torch.equal(out.origin[b], one.origin[0])
    assert fails == 0


@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
def test_an_image_with_no_token_left(cls):
    # Property-test counterexample: an earlier in-LLM stage may leave an image (or all) with no token;
    # the quantiles of an empty row and the absorber of no kept token used to raise.
    state = make_state(B=2)
    state = ops.keep(state, torch.arange(N0).expand(2, N0).contiguous(), torch.arange(N0)[None] < torch.tensor([[0], [60]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArrcocWarning)
        out = cls()(state).check()
        alone = [cls()(state.image(b)).check() for b in range(2)]
    assert out.counts[0] == 0 and alone[0].N == 0 and bool((out.origin[0] == -1).all())
    assert torch.equal(out.origin[1], alone[1].origin[0]) and out.counts[1] == alone[1].counts[0]
    # A count asks nothing of an image with no token (as a ratio does), and is checked against the others.
    assert cls(keep=2)(state.image(0)).check().counts.tolist() == [0]
    with pytest.raises(BudgetError, match=r"asked to keep 61 tokens, but an image has only 60"):
        cls(keep=61)(state)
