"""SparseVLM: pre-LLM plugin and in-LLM core functions against plain reference computations."""

from __future__ import annotations

import math

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError, ParamsError
from arrcoc.state import LLMContext, TokenState
from arrcoc_plugins.compressors import sparsevlm as S

TINY = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}, "layer": -1}


def make_state(B=2, H=5, W=6, D=16, T=4, seed=0, counts=None, query=True):
    g = torch.Generator().manual_seed(seed)
    state = TokenState.from_patches(
        torch.randn(B, H * W, D, generator=g), (H, W), cls_token=torch.randn(B, D, generator=g),
        per_token={"cls_attn": torch.rand(B, H * W, generator=g)},
    )
    if counts is not None:  # ragged: image b keeps its first counts[b] tokens
        idx = torch.arange(H * W).expand(B, -1).contiguous()
        state = ops.keep(state, idx, idx < torch.tensor(counts)[:, None])
    if query:
        qm = torch.ones(B, T, dtype=torch.bool)
        qm[0, T - 1] = False  # a padded query token in image 0
        state = state.replace(query=torch.randn(B, T, D, generator=g), query_mask=qm)
    return state


# --------------------------------------------------------------- references
def ref_minmax(v):
    lo, hi = min(v), max(v)
    return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in v]


def ref_importance(tokens, query, qmask, sal, w_text=0.7, w_sal=0.3):
    """Plain loops: max over real query tokens of the cosine, min-max per image, weighted sum."""
    n = tokens.shape[0]
    text = []
    for i in range(n):
        best = -math.inf
        for t in range(query.shape[0]):
            if qmask[t]:
                c = float(torch.dot(tokens[i], query[t]) / (tokens[i].norm() * query[t].norm()))
                best = max(best, c)
        text.append(best)
    text, sal = ref_minmax(text), ref_minmax([float(s) for s in sal])
    return [w_text * a + w_sal * b for a, b in zip(text, sal)]


def ref_topk(scores, k):
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def ref_dpc(x, c):
    """Official cluster_and_merge on one image, in loops (ties by index instead of noise)."""
    x = x.double()
    n, C = x.shape
    d = [[float((x[i] - x[j]).norm()) / math.sqrt(C) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:c]) / c) for i in range(n)]
    dmax = max(max(row) for row in d)
    delta = []
    for i in range(n):
        denser = [d[i][j] for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(denser + [dmax]))
    score = [delta[i] * rho[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    assign = []
    for i in range(n):
        if i in centres:
            assign.append(centres.index(i))
        else:
            dist = [d[i][j] for j in centres]
            assign.append(dist.index(min(dist)))
    merged = [torch.stack([x[i] for i in range(n) if assign[i] == k]).mean(0) for k in range(c)]
    return centres, assign, merged


# ----------------------------------------------------------- pre-LLM plugin
@pytest.mark.parametrize("norm", ["minmax", "rank"])
def test_importance_and_selection_match_reference(norm):
    state = make_state()
    plugin = arrcoc.create("compressor", "sparsevlm", keep=0.4, norm=norm)
    out = plugin(state).check()
    k = math.floor(30 * 0.4)
    for b in range(state.B):
        if norm == "minmax":
            ref = ref_importance(state.tokens[b], state.query[b], state.query_mask[b], state.per_token["cls_attn"][b])
            got = S.sparsevlm_importance(state.tokens, state.query, state.per_token["cls_attn"], state.mask,
                                         state.query_mask)[b]
            assert torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)
        else:
            text = ops.query_similarity(state.tokens, state.query, state.query_mask)[b].tolist()
            sal = state.per_token["cls_attn"][b].tolist()

            def rank(v):
                order = sorted(range(len(v)), key=lambda i: (v[i], i))
                r = [0] * len(v)
                for pos, i in enumerate(order):
                    r[i] = pos / (len(v) - 1)
                return r
            ref = [0.7 * a + 0.3 * s for a, s in zip(rank(text), rank(sal))]
        keep = ref_topk(ref, k)
        assert out.counts[b] == k
        assert torch.equal(out.tokens[b, :k], state.tokens[b, keep])
        assert out.size[b, :k].sum() == k  # pure pruning: size = kept count
        assert torch.equal(out.positions[b, :k], state.positions[b, keep])


def test_masked_query_tokens_are_ignored():
    state = make_state()
    q = state.query.clone()
    q[0, -1] = state.tokens[0, 7] * 100  # padded query token identical to token 7: must not matter
    a = ops.query_similarity(state.tokens, state.query, state.query_mask)
    b = ops.query_similarity(state.tokens, q, state.query_mask)
    assert torch.equal(a, b)


def test_weights_only_text_or_only_saliency():
    state = make_state()
    out = arrcoc.create("compressor", "sparsevlm", keep=5, w_text=0.0, w_sal=1.0)(state)
    for b in range(state.B):
        sal = state.per_token["cls_attn"][b].tolist()
        assert torch.equal(out.tokens[b], state.tokens[b, ref_topk(sal, 5)])
    plugin = arrcoc.create("compressor", "sparsevlm", keep=5, w_sal=0.0)
    assert plugin.requirements() == frozenset({"query"})
    no_sal = state.replace(per_token={})
    assert plugin(no_sal).counts.tolist() == [5, 5]


def test_ragged_batch_equals_per_image_runs_and_masked_never_selected():
    state = make_state(counts=[30, 17])
    plugin = arrcoc.create("compressor", "sparsevlm", keep=0.5, recycle=True)
    out = plugin(state).check()
    for b, n in enumerate([30, 17]):
        one = TokenState.from_patches(state.tokens[b:b + 1, :n].contiguous(), (1, n), per_token={
            "cls_attn": state.per_token["cls_attn"][b:b + 1, :n]})
        one = one.replace(query=state.query[b:b + 1], query_mask=state.query_mask[b:b + 1])
        single = plugin(one)
        m = int(single.counts[0])
        assert out.counts[b] == m
        assert torch.allclose(out.tokens[b, :m], single.tokens[0, :m], atol=1e-6)
        assert torch.equal(out.size[b, :m], single.size[0, :m])
    # image 1 had 17 real tokens: nothing it keeps comes from slots >= 17
    assert int((out.origin[1] >= 0).sum()) == int(out.size[1].sum())
    assert bool((out.origin[1, 17:] == -1).all())


def test_recycling_matches_official_reference():
    state = make_state(B=2, H=8, W=8, D=12)
    p = arrcoc.create("compressor", "sparsevlm", keep=0.25, recycle=True)
    out = p(state).check()
    n, k = 64, 16
    scores = S.sparsevlm_importance(state.tokens, state.query, state.per_token["cls_attn"], state.mask,
                                    state.query_mask)
    for b in range(2):
        sc = scores[b].tolist()
        kept = ref_topk(sc, k)
        deleted = [i for i in range(n) if i not in kept]
        m = int(len(deleted) * 0.3) + 1  # official merge_token_num_stage1
        rec = sorted(deleted, key=lambda i: (-sc[i], i))[:m]
        c = m // 10 + 1  # official cluster_num
        centres, assign, merged = ref_dpc(state.tokens[b, rec], c)
        assert out.counts[b] == k + c
        assert torch.equal(out.tokens[b, :k], state.tokens[b, kept])
        want = torch.stack(merged).float()
        assert torch.allclose(out.tokens[b, k:k + c], want, atol=1e-5)
        sizes = [assign.count(j) for j in range(c)]
        assert out.size[b, k:k + c].tolist() == sizes
        assert out.size[b].sum() == k + m  # recycled patches are accounted for, the rest dropped
        for j in range(c):  # origin: every recycled patch points at its cluster token
            for i, r in enumerate(rec):
                if assign[i] == j:
                    assert out.origin[b, r] == k + j


def test_dpc_knn_matches_reference_batched():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 8, generator=g)
    counts, clusters = torch.tensor([20, 13, 5]), torch.tensor([3, 2, 1])
    mask = torch.arange(20)[None] < counts[:, None]
    centres, cvalid, assign = S.dpc_knn(x, clusters, mask)
    for b in range(3):
        n, c = int(counts[b]), int(clusters[b])
        rc, ra, _ = ref_dpc(x[b, :n], c)
        assert centres[b, :c].tolist() == rc
        assert assign[b, :n].tolist() == ra
        assert bool((assign[b, n:] == -1).all())
        assert cvalid[b].tolist() == [True] * c + [False] * (3 - c)


def test_dpc_knn_duplicate_tokens_are_deterministic():
    x = torch.ones(1, 6, 4)  # every density and distance ties
    centres, _, assign = S.dpc_knn(x, 2)
    again = S.dpc_knn(x, 2)
    assert torch.equal(centres, again[0]) and torch.equal(assign, again[2])
    # equal densities: the lower index counts as denser, so the centres are tokens 0 and 1;
    # equal distances go to the first centre, and each centre owns itself
    assert centres[0].tolist() == [0, 1]
    assert assign[0].tolist() == [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state().to(dtype=dtype)
    out = arrcoc.create("compressor", "sparsevlm", keep=0.4, recycle=True)(state).check()
    assert out.dtype == dtype and out.counts.tolist() == [13, 13]
    assert torch.isfinite(out.tokens.float()).all()


# ------------------------------------------------------------------- errors
def test_bad_budgets():
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        arrcoc.create("compressor", "sparsevlm", keep=1.5)
    with pytest.raises(ParamsError, match="count must be >= 1"):
        arrcoc.create("compressor", "sparsevlm", keep=0)
    with pytest.raises(ParamsError, match="w_text and w_sal are both 0"):  # used to keep the first k tokens silently
        arrcoc.create("compressor", "sparsevlm", w_text=0.0, w_sal=0.0)
    with pytest.raises(BudgetError, match="asked to keep 31 tokens, but an image has only 30"):
        arrcoc.create("compressor", "sparsevlm", keep=31)(make_state())


def test_missing_inputs_called_directly():
    plugin = arrcoc.create("compressor", "sparsevlm")
    with pytest.raises(MissingInputError, match="needs a query"):
        plugin(make_state(query=False))
    with pytest.raises(MissingInputError, match=r"per_token\['cls_attn'\].*attention_layer"):
        plugin(make_state().replace(per_token={}))
    wide = make_state()
    wide = wide.replace(query=torch.randn(2, 3, 7), query_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="query width 7 differs from the visual token width 16"):
        plugin(wide)


def test_pipeline_checks_cls_attention_at_load_and_query_at_run():
    no_cls = {**TINY, "model_kwargs": {"depth": 2, "img_size": 64, "class_token": False, "global_pool": "avg"}}
    with pytest.raises(MissingInputError, match="needs 'cls_attention'.*no class token"):
        arrcoc.load_pipeline({"name": "t", "encoder": no_cls, "compress": [{"use": "sparsevlm"}]}, device="cpu")
    spec = {"name": "t", "encoder": TINY, "query_encoder": {"use": "toy_text"}, "compress": [{"use": "sparsevlm"}]}
    pipe = arrcoc.load_pipeline(spec, device="cpu")
    with pytest.raises(MissingInputError, match="needs a query"):
        pipe(torch.rand(1, 3, 64, 64))
    out = pipe(torch.rand(2, 3, 64, 64), query="red cat on a mat")
    assert out.counts.tolist() == [6, 6]  # 16 patches * 0.4
    assert out.trace[-1].tokens_out == (7, 7)


def test_shipped_pipeline_validates():
    spec = arrcoc.resolve_spec("sparsevlm")
    stage = spec.compress[0]
    assert stage.use == "sparsevlm" and stage.params["keep"] == 0.4
    assert spec.encoder.params["model"] == spec.query_encoder.params["model"] == "arrcoc:toyvqa"
    assert (spec.encoder.use, spec.query_encoder.use) == ("hf_vision", "hf_text")


# ------------------------------------------------------------ in-LLM core
def test_text_raters_match_reference():
    g = torch.Generator().manual_seed(5)
    V, T = torch.randn(2, 9, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    tm = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    raters = S.select_text_raters(V, T, text_mask=tm)
    for b in range(2):
        t = int(tm[b].sum())
        m = [0.0] * t
        for i in range(9):
            logits = [float(V[b, i] @ T[b, j]) for j in range(t)]
            z = max(logits)
            e = [math.exp(v - z) for v in logits]
            for j in range(t):
                m[j] += e[j] / sum(e) / 9
        mean = sum(m) / t
        assert raters[b].tolist() == [v > mean for v in m] + [False] * (5 - t)


def test_rater_scores_and_counts():
    g = torch.Generator().manual_seed(6)
    attn = torch.rand(2, 4, 5, 10, generator=g)  # [B, heads, T, Nv]
    raters = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    got = S.rater_scores(attn, raters)
    for b in range(2):
        rows = [t for t in range(5) if raters[b, t]]
        for v in range(10):
            ref = sum(float(attn[b, h, t, v]) for h in range(4) for t in rows) / (4 * len(rows))
            assert abs(float(got[b, v]) - ref) < 1e-6
    # official tables at layers [2, 6, 15], capped at n - 1
    assert [int(S.table_keep_count(192, l, 576)) for l in (2, 6, 15)] == [300, 200, 110]
    assert [int(S.table_keep_count(64, l, 576)) for l in (2, 6, 15)] == [66, 30, 17]
    assert [int(S.table_keep_count(128, l, 576)) for l in (2, 6, 15)] == [303, 110, 36]
    assert [int(S.table_keep_count(96, l, 576)) for l in (2, 6, 15)] == [238, 48, 26]
    assert int(S.table_keep_count(192, 2, 250)) == 249
    with pytest.raises(arrcoc.StateError, match="budget must be one of"):
        S.table_keep_count(100, 2, 576)
    # the paper's rank-based count: delete scale * (Lv - rank(P))
    low_rank = torch.ones(1, 1, 3, 8)  # rank 1 -> delete 7 -> keep 1
    assert S.adaptive_keep_count(low_rank, torch.ones(1, 3, dtype=torch.bool)).tolist() == [1]
    full = torch.rand(1, 1, 8, 6, generator=g)  # rank 6 = Lv -> delete nothing
    assert S.adaptive_keep_count(full, torch.ones(1, 8, dtype=torch.bool)).tolist() == [6]
    half = S.adaptive_keep_count(low_rank, torch.ones(1, 3, dtype=torch.bool), scale=0.5)
    assert half.tolist() == [8 - 3]


def test_sparsevlm_llm_reads_the_llm_context():
    # Visual tokens at pruning layer 2's output (8 and 6 left); the LLM input had 10 and 8 (input_visual).
    state = make_state(H=2, W=4, counts=[8, 6])
    g = torch.Generator().manual_seed(11)
    T = state.query.shape[1]
    attn = torch.rand(2, 8, T, generator=g) * state.query_mask[:, None, :] * state.mask[:, :, None]
    input_visual = torch.randn(2, 10, 16, generator=g)
    input_mask = torch.arange(10)[None] < torch.tensor([10, 8])[:, None]
    llm = LLMContext(layer=3, num_layers=4, input_visual_counts=torch.tensor([10, 8]),
                     text_mask=state.query_mask, input_visual=input_visual, input_visual_mask=input_mask)
    plugin = arrcoc.create("compressor", "sparsevlm_llm", layers=[2], keep=[0.5], recycle=False)
    out = plugin(state.with_per_token(attn_from_text=attn).replace(llm=llm)).check()
    raters = S.select_text_raters(input_visual, state.query, input_mask, state.query_mask)
    scores = S.rater_scores(attn.transpose(1, 2), raters, state.mask)
    for b, (n, n0) in enumerate([(8, 10), (6, 8)]):
        k = n0 // 2  # a ratio of the visual tokens at the LLM input (input_visual_counts), not of those left
        kept = ref_topk(scores[b, :n].tolist(), k)
        assert out.counts[b] == k and torch.equal(out.tokens[b, :k], state.tokens[b, kept])
    outside = r"sparsevlm_llm: runs inside an LLM \(arrcoc.hf.apply\).*state.llm is None"
    with pytest.raises(MissingInputError, match=outside):
        plugin(state.with_per_token(attn_from_text=attn))
    with pytest.raises(MissingInputError, match=r"sparsevlm_llm: state.llm.input_visual is missing.*'attn_from_text'"):
        plugin(state.with_per_token(attn_from_text=attn).replace(
            llm=LLMContext(layer=3, num_layers=4, input_visual_counts=torch.tensor([10, 8]))))
    with pytest.raises(MissingInputError, match=r"per_token\['attn_from_text'\]"):
        plugin(state.replace(llm=llm))
    # A layer it does not act at (layers [2] -> the input of layer 3) used to fail with a bare ValueError
    # ('1 is not in list') from p.layers.index.
    for layer in (1, 2, 4):
        wrong = LLMContext(layer=layer, num_layers=5, input_visual_counts=torch.tensor([10, 8]),
                           text_mask=state.query_mask, input_visual=input_visual, input_visual_mask=input_mask)
        with pytest.raises(arrcoc.StateError, match=rf"sparsevlm_llm: acts at decoder layers \[3\] of a 5-layer "
                                                   rf"LLM, got state.llm.layer {layer}"):
            plugin(state.with_per_token(attn_from_text=attn).replace(llm=wrong))


def test_recycling_with_nothing_deleted_keeps_everything():
    # keep = every token: nothing is deleted, so nothing is recycled (used to crash in dpc_knn on an empty set)
    state = make_state()
    out = arrcoc.create("compressor", "sparsevlm", keep=1.0, recycle=True)(state).check()
    assert out.counts.tolist() == [30, 30] and torch.equal(out.tokens, state.tokens)


# ------------------------------------------------- issue 12: hardening cases
def per_image_run(plugin, state, b):
    """Image ``b`` of a ragged state run alone."""
    return plugin(state.image(b))


@pytest.mark.parametrize(
    "params, counts",
    [
        ({"recycle": True}, [200, 10]),  # default params: used to give NaN densities (inf * 0 in dpc_knn)
        ({"recycle": True, "cluster_divisor": 2}, [200, 10]),
        ({"recycle": True, "cluster_divisor": 2, "keep": 9}, [200, 10]),  # one deleted token in image 1
        ({"recycle": True, "cluster_divisor": 1}, [200, 10]),  # m // 1 + 1 > m clusters: clamped to m
    ],
)
def test_recycling_on_a_ragged_batch_equals_per_image_runs(params, counts):
    state = make_state(H=10, W=20, counts=counts, seed=2)
    plugin = arrcoc.create("compressor", "sparsevlm", **params)
    out = plugin(state).check()
    assert torch.isfinite(out.tokens).all()
    for b in range(state.B):
        single = per_image_run(plugin, state, b).check()
        m = int(single.counts[0])
        assert int(out.counts[b]) == m
        torch.testing.assert_close(out.tokens[b, :m], single.tokens[0])
        assert torch.equal(out.size[b, :m], single.size[0])
        assert torch.equal(out.origin[b], single.origin[0])


def test_cluster_count_is_clamped_to_the_recycled_tokens():
    # official cluster_num = int(m / divisor) + 1 would exceed m for divisor 1 (and the official topk fails)
    scores = torch.arange(10.0)[None]
    mask = torch.ones(1, 10, dtype=torch.bool)
    index, valid = torch.tensor([[9, 8]]), torch.ones(1, 2, dtype=torch.bool)
    for divisor, clusters in [(1, 3), (2, 2), (10, 1)]:
        rec, rec_valid, c = S.recycle_plan(scores, index, valid, mask, 0.3, divisor)  # d = 8 -> m = 3
        assert int(rec_valid.sum()) == 3 and c.tolist() == [clusters]
    state = make_state(counts=[30, 12])
    out = arrcoc.create("compressor", "sparsevlm", keep=10, recycle=True, cluster_divisor=1)(state).check()
    # d = 20 -> m = 7 clusters of one token each; d = 2 -> m = 1
    assert out.counts.tolist() == [17, 11]
    assert out.size[0, 10:17].tolist() == [1.0] * 7


def test_dpc_knn_rows_with_fewer_tokens_than_another_rows_clusters():
    # row 1 has 2 tokens, row 0 asks for 4 clusters: the padded nearest distances are inf and must not count
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, generator=g)
    mask = torch.arange(12)[None] < torch.tensor([12, 2])[:, None]
    centres, cvalid, assign = S.dpc_knn(x, torch.tensor([4, 1]), mask)
    alone = S.dpc_knn(x[1:, :2], 1)
    assert centres[1, :1].tolist() == alone[0][0].tolist()
    assert assign[1, :2].tolist() == alone[2][0].tolist()


def test_near_constant_scores_are_constant_after_minmax():
    # a spread of 1e-9 on values ~1e-3 is rounding noise: min-max must not stretch it to [0, 1]
    base = torch.full((1, 6), 1e-3)
    noisy = base + torch.tensor([[0.0, 1e-9, 0.0, 2e-9, 0.0, 1e-9]])
    assert (noisy != base).any()
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert ops.normalize_scores(noisy, mask, "minmax").tolist() == [[0.0] * 6]
    assert ops.normalize_scores(noisy, mask, "zscore").tolist() == [[0.0] * 6]
    # so the selection is decided by the other term, as with exactly constant saliency
    state = make_state()
    flat = state.with_per_token(cls_attn=torch.full((2, 30), 1e-3))
    jitter = state.with_per_token(cls_attn=1e-3 + 1e-9 * torch.rand(2, 30, generator=torch.Generator().manual_seed(1)))
    plugin = arrcoc.create("compressor", "sparsevlm", keep=0.3)
    assert torch.equal(plugin(flat).origin, plugin(jitter).origin)


def test_a_state_with_no_token_slot():
    # Property-test counterexample: min-max normalisation reduced over an empty dimension
    state = make_state(counts=[0, 0])
    assert state.N == 0
    out = arrcoc.create("compressor", "sparsevlm", recycle=True)(state).check()
    assert out.N == 0
    assert ops.normalize_scores(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), "minmax").shape == (2, 0)
