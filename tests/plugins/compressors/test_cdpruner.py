"""CDPruner: equivalence with the official encode_images written for one image, quirks, ties, errors, budgets."""

from __future__ import annotations

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError, ParamsError
from arrcoc.plugin import BudgetContext
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.cdpruner import CDPruner, cdpruner_relevance, cdpruner_select, cdpruner_similarity


def make_state(B=3, N=48, D=64, T=5, seed=0, counts=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    state = TokenState.from_patches(torch.randn(B, N, D, generator=g).to(dtype), (1, N))
    if counts is not None:  # ragged: image b keeps its first counts[b] tokens
        idx = torch.arange(N).expand(B, -1).contiguous()
        state = ops.keep(state, idx, idx < torch.tensor(counts)[:, None])
    qm = torch.ones(B, T, dtype=torch.bool)
    qm[0, T - 1] = False  # a padded query token in image 0: takes no part
    return state.replace(query=torch.randn(B, T, D, generator=g).to(dtype), query_mask=qm)


def official(x, q, T, negate=True, theta=None, guard=None, relevance=None):
    """Official ``encode_images`` (llava_arch.py l.141-184) for one image, plain torch: x [N, D] features
    (also the relevance embeddings: the arrcoc variant), q [M, D] instruction rows.  ``guard`` (a float): stop
    the DPP where d^2 <= guard * max diag(L) and fill by the largest kernel diagonal (arrcoc's guard of quirk 2).
    ``relevance`` ([N]): use it in place of the official l.154-159 (arrcoc's guard of quirk 3 gives ones)."""
    x, q, forced = x[None], q, relevance
    B, N, C = x.shape
    xn = (x / x.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(xn, xn.transpose(1, 2))
    e_img = x.float() / x.float().norm(dim=-1, keepdim=True)
    e_txt = q.float() / q.float().norm(dim=-1, keepdim=True)
    relevance = torch.matmul(e_img, e_txt.t())
    relevance = (-relevance if negate else relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    if forced is not None:
        relevance = forced.float()[None]
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((T, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    quality = di2s.clone()
    select_idx = torch.empty((T, B), dtype=torch.long)
    for i in range(T):
        j = torch.argmax(di2s, dim=-1)
        if guard is not None and not bool(di2s[0, j] > guard * quality.max()):
            j = torch.argmax(quality.masked_fill(torch.isneginf(di2s), float("-inf")), dim=-1)
            select_idx[i] = j
            di2s[torch.arange(B), j] = -float("inf")
            continue
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return torch.sort(select_idx.t()).values[0].tolist()


def kept(out: TokenState, b: int) -> list[int]:
    """Original indices (on a 1 x N grid) of image b's kept tokens, in output order."""
    return out.positions[b, : int(out.counts[b]), 1].round().long().tolist()


# ------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("negate", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_official_encode_images(seed, negate, dtype):
    state = make_state(seed=seed, dtype=dtype)
    for k in (8, 16):
        out = arrcoc.create("compressor", "cdpruner", keep=k, negate=negate)(state).check()
        for b in range(state.B):
            q = state.query[b][state.query_mask[b]]
            expected = official(state.tokens[b], q, k, negate=negate)
            assert kept(out, b) == expected
            assert torch.equal(out.tokens[b, :k], state.tokens[b, expected])  # selection only, values untouched


def test_negation_changes_the_picks_and_theta_matches_reference():
    state = make_state(seed=3)
    neg = arrcoc.create("compressor", "cdpruner", keep=8)(state)
    pos = arrcoc.create("compressor", "cdpruner", keep=8, negate=False)(state)
    assert any(kept(neg, b) != kept(pos, b) for b in range(state.B))
    out = arrcoc.create("compressor", "cdpruner", keep=8, theta=0.5)(state)
    for b in range(state.B):
        assert kept(out, b) == official(state.tokens[b], state.query[b][state.query_mask[b]], 8, theta=0.5)


def test_ragged_batch_equals_per_image_runs():
    counts = [48, 30, 17]
    state = make_state(counts=counts, seed=2)
    plugin = arrcoc.create("compressor", "cdpruner", keep=0.3)
    out = plugin(state).check()
    assert out.counts.tolist() == [14, 9, 5]
    for b, n in enumerate(counts):
        one = TokenState.from_patches(state.tokens[b:b + 1, :n].contiguous(), (1, n))
        one = one.replace(query=state.query[b:b + 1], query_mask=state.query_mask[b:b + 1])
        single = plugin(one)
        assert kept(out, b) == kept(single, 0)
        assert kept(out, b) == official(state.tokens[b, :n], state.query[b][state.query_mask[b]], len(kept(out, b)))
        assert torch.equal(out.origin[b, :n], single.origin[0])
        assert bool((out.origin[b, n:] == -1).all())


def test_duplicate_tokens_tie_by_index():
    # Each token twice: every copy ties exactly with its original, so the picks are the originals' (lower index).
    base = make_state(B=2, N=24, seed=4)
    doubled = TokenState.from_patches(torch.cat([base.tokens, base.tokens], 1), (1, 48))
    doubled = doubled.replace(query=base.query, query_mask=base.query_mask)
    plugin = arrcoc.create("compressor", "cdpruner", keep=6)
    once, twice = plugin(base), plugin(doubled)
    for b in range(2):
        assert kept(twice, b) == kept(once, b)
    # Identical tokens everywhere: equal relevance (guarded) and S = 1, so one DPP pick, then the fill by index.
    same = TokenState.from_patches(base.tokens[:, :1].expand(2, 24, -1).contiguous(), (1, 24))
    same = same.replace(query=base.query, query_mask=base.query_mask)
    out = plugin(same).check()
    assert [kept(out, b) for b in range(2)] == [[0, 1, 2, 3, 4, 5]] * 2


# ---------------------------------------------------------------- quirks
def test_past_the_rank_the_official_code_repeats_and_arrcoc_fills_by_relevance():
    # D = 4 < k: rank(L) <= 4, so d^2 reaches 0 and the official loop repeats indices (NaN argmax).
    state = make_state(B=2, N=20, D=4, T=3, seed=5)
    out = arrcoc.create("compressor", "cdpruner", keep=10)(state).check()
    for b in range(2):
        q = state.query[b][state.query_mask[b]]
        with torch.no_grad():
            broken = official(state.tokens[b], q, 10)
        assert len(set(broken)) < 10  # the official quirk
        got = kept(out, b)
        assert len(set(got)) == 10 and got == official(state.tokens[b], q, 10, guard=1e-5)
        # the first rank(L) picks are the official ones
        assert set(official(state.tokens[b], q, 4)) <= set(got)
    # eps: 0 stops only where the official sqrt goes NaN: still 10 distinct tokens, no NaN
    bare = arrcoc.create("compressor", "cdpruner", keep=10, eps=0.0)(state).check()
    assert all(len(set(kept(bare, b))) == 10 for b in range(2))


def test_equal_relevance_is_guarded():
    # A zero instruction: every cosine is 0, max r == min r (official: division by zero, NaN kernel).
    state = make_state(B=2, N=30, D=40, seed=6)
    state = state.replace(query=torch.zeros_like(state.query))
    r = cdpruner_relevance(state.tokens, state.query, state.query_mask, state.mask)
    assert torch.equal(r, torch.ones_like(r))
    out = arrcoc.create("compressor", "cdpruner", keep=7)(state).check()
    for b in range(2):  # pure diversity: the official loop (no helper of the plugin) with r = 1
        expected = official(state.tokens[b], state.query[b], 7, relevance=torch.ones(30))
        assert len(set(expected)) == 7 and kept(out, b) == expected
        S = cdpruner_similarity(state.tokens[b:b + 1], state.mask[b:b + 1])
        index, valid = cdpruner_select(S, torch.ones(1, 30), state.mask[b:b + 1], torch.tensor([7]))
        assert index[0].tolist() == expected and bool(valid.all())


def test_zero_tokens_are_zero_rows_not_nan():
    state = make_state(B=1, N=16, D=32, seed=7)
    tokens = state.tokens.clone()
    tokens[0, 3] = 0.0
    state = state.replace(tokens=tokens)
    S = cdpruner_similarity(state.tokens, state.mask)
    assert torch.isfinite(S).all() and bool((S[0, 3] == 0).all()) and bool((S[0, :, 3] == 0).all())
    out = arrcoc.create("compressor", "cdpruner", keep=16)(state).check()  # everything, the zero token last
    assert sorted(kept(out, 0)) == list(range(16))


def test_views_share_the_relevance_min_max():
    state = make_state(B=3, N=20, D=16, seed=8)
    grouped = cdpruner_relevance(state.tokens, state.query, state.query_mask, state.mask,
                                 torch.tensor([0, 0, 1]))
    # rows 0 and 1 (one image's two views) normalised together, each with its own query: official l.159
    raw = -ops.query_similarity(state.tokens, state.query, state.query_mask, reduce="mean")
    lo, hi = raw[:2].min(), raw[:2].max()
    assert torch.allclose(grouped[:2], (raw[:2] - lo + 1e-6) / (hi - lo), atol=1e-6)
    alone = cdpruner_relevance(state.tokens, state.query, state.query_mask, state.mask)
    assert torch.equal(grouped[2], alone[2]) and not torch.allclose(grouped[0], alone[0])
    # the plugin reads the layout from meta["views"] (1 + 1 * 1 views for image 0; image 1 alone: 1 + 0 views)
    out = CDPruner(keep=5)(state.with_meta(views=[(1, 1), (0, 0)])).check()
    assert out.counts.tolist() == [5, 5, 5]
    with pytest.raises(InputError, match="describes 2 views, the batch holds 3"):
        CDPruner(keep=5)(state.with_meta(views=[(1, 1)]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    out = arrcoc.create("compressor", "cdpruner", keep=0.25)(make_state(dtype=dtype)).check()
    assert out.dtype == dtype and out.counts.tolist() == [12, 12, 12]


# ------------------------------------------------------- errors, budget
def test_errors():
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        arrcoc.create("compressor", "cdpruner", keep=1.5)
    with pytest.raises(ParamsError, match="theta"):
        arrcoc.create("compressor", "cdpruner", theta=1.0)
    with pytest.raises(ParamsError, match="eps"):
        arrcoc.create("compressor", "cdpruner", eps=-1.0)
    with pytest.raises(BudgetError, match="cdpruner.keep: asked to keep 49 tokens, but an image has only 48"):
        arrcoc.create("compressor", "cdpruner", keep=49)(make_state())
    with pytest.raises(MissingInputError, match="cdpruner: needs a query"):
        arrcoc.create("compressor", "cdpruner")(make_state().replace(query=None, query_mask=None))
    wide = make_state().replace(query=torch.randn(3, 2, 7), query_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(InputError, match="query width 7 differs from the visual token width 64"):
        arrcoc.create("compressor", "cdpruner")(wide)


def test_plugin_flags_and_budget_rule():
    assert CDPruner.stage == "projector" and CDPruner.needs == frozenset({"query"})
    assert CDPruner.Params().keep == 64 and CDPruner.Params().negate is True
    context = BudgetContext(tokens=48, original=48, grid=(1, 48), layers=4)
    assert CDPruner.budget_bounds({}, context) == (1.0, 48.0)
    for target in (1.0, 12.4, 48.0):
        params = CDPruner.budget_params({"negate": False}, target, context)
        assert params["negate"] is False
        out = CDPruner(**params)(make_state())
        assert out.counts.tolist() == [round(target)] * 3


TINY = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}}


def test_pipeline_with_tiny_vit_and_toy_text_query():
    spec = {"name": "cd", "encoder": TINY, "query_encoder": {"use": "toy_text"},
            "compress": [{"use": "cdpruner", "keep": 5}]}
    pipe = arrcoc.load_pipeline(spec, device="cpu")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MissingInputError, match=r"compress\[0\] \(cdpruner\) needs a query"):
        pipe(images)
    state = pipe(images, query=["a red cat on a mat", "two dogs"]).check()
    assert state.counts.tolist() == [5, 5] and state.cls is not None  # the class token stays apart
    assert state.trace[-1].tokens_in == (17, 17) and state.trace[-1].tokens_out == (6, 6)


def test_builtin_pipeline_file_is_the_official_llava_setting():
    spec = arrcoc.resolve_spec("cdpruner")
    assert [s.as_yaml_dict() for s in spec.compress] == [{"use": "cdpruner", "keep": 64}]  # vtn 64 of 576
    assert spec.encoder.params["model"] == "vit_large_patch14_clip_336.openai" and spec.encoder.params["layer"] == -2
    assert spec.query_encoder.use == "toy_text"


def test_float64_tokens_rank_in_float32():
    # No float64 product (house rule); the official relevance is float32 too (CLIP's projections load in float32).
    state = make_state(B=2, N=24, D=32, seed=9)
    wide = state.replace(tokens=state.tokens.double(), query=state.query.double())
    r64 = cdpruner_relevance(wide.tokens, wide.query, wide.query_mask, wide.mask)
    r32 = cdpruner_relevance(state.tokens, state.query, state.query_mask, state.mask)
    assert r64.dtype == torch.float32 and torch.equal(r64, r32)
    assert cdpruner_similarity(wide.tokens, wide.mask).dtype == torch.float32
    out = arrcoc.create("compressor", "cdpruner", keep=6)(wide).check()
    assert out.dtype == torch.float64
    for b in range(2):
        assert kept(out, b) == official(wide.tokens[b], wide.query[b][wide.query_mask[b]], 6)
