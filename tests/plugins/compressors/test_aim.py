"""AIM: iterative bipartite merging (pre-LLM) and the in-LLM PageRank core, against plain references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, MissingInputError, ParamsError, StateError
from arrcoc.state import LLMContext, TokenState
from arrcoc_plugins.compressors import aim as A


def make_state(B=2, H=6, W=8, D=12, seed=0, counts=None):
    g = torch.Generator().manual_seed(seed)
    state = TokenState.from_patches(torch.randn(B, H * W, D, generator=g), (H, W),
                                    per_token={"keys": torch.randn(B, H * W, 4, generator=g)})
    if counts is not None:
        idx = torch.arange(H * W).expand(B, -1).contiguous()
        state = ops.keep(state, idx, idx < torch.tensor(counts)[:, None])
    return state


def ref_official_merge(x, r):
    """Official bipartite_soft_matching_merge(metric=x, r, x, mode='mean') for one image, in loops.

    Returns the output rows as lists of original-token groups, in the official order
    [unmerged A by decreasing similarity, all B], and the merged values.
    """
    n = len(x)
    r = min(r, n // 2)
    a = list(range(0, n, 2))
    b = list(range(1, n, 2))
    unit = [v / v.norm() for v in x]
    best = []
    for i in a:
        sims = [float(unit[i] @ unit[j]) for j in b]
        j = max(range(len(b)), key=lambda t: (sims[t], -t))  # first maximum
        best.append((sims[j], b[j]))
    edges = sorted(range(len(a)), key=lambda t: (-best[t][0], t))
    src, unm = edges[:r], edges[r:]
    groups = {j: [j] for j in b}
    for t in src:
        groups[best[t][1]].append(a[t])
    rows = [[a[t]] for t in unm] + [groups[j] for j in b]
    return rows


def apply_rows(x, rows):
    return torch.stack([torch.stack([x[i] for i in g]).mean(0) for g in rows])


def official_rounds(n, keeps):
    """Merges per round as llava_arch.py budgets them: r = n // 2 then r = n // 4, both of the
    original n; generalised, round i merges floor(nominal_{i-1} - nominal_i) with nominal_0 = n and
    nominal_i = nominal_{i-1} * keep_i (a count: the tokens present minus it, nominal_i = count)."""
    rs, nominal, present = [], float(n), n
    for k in keeps:
        r = present - k if isinstance(k, int) else math.floor(nominal - nominal * k)
        nominal = float(k) if isinstance(k, int) else nominal * k
        r = min(r, present // 2)
        rs.append(r)
        present -= r
    return rs


@pytest.mark.parametrize("keeps", [(0.5, 0.5), (0.75, 0.75), (0.6, 20)])
def test_two_rounds_match_the_official_merge_in_value_and_order(keeps):
    state = make_state()
    out = arrcoc.create("compressor", "aim_merge", keep=list(keeps))(state).check()
    for b in range(state.B):
        x = [state.tokens[b, i] for i in range(48)]
        r1, r2 = official_rounds(48, keeps)
        rows1 = ref_official_merge(x, r1)  # (0.5, 0.5): official r = n // 2 ...
        x1 = list(apply_rows(torch.stack(x), rows1))
        n1 = 48 - r1
        rows2 = ref_official_merge(x1, r2)  # ... then r = n // 4 of the original n
        n2 = n1 - r2
        x2 = apply_rows(torch.stack(x1), rows2)
        assert out.counts[b] == n2
        assert torch.allclose(out.tokens[b], x2, atol=1e-5)
        # provenance: each output token stands for the patches of its groups
        patches = [sorted(p for g in grp for p in rows1[g]) for grp in rows2]
        for slot, ps in enumerate(patches):
            assert sorted(torch.nonzero(out.origin[b] == slot).squeeze(1).tolist()) == ps
            assert out.size[b, slot] == len(ps)
    spatial = arrcoc.create("compressor", "aim_merge", keep=list(keeps), order="spatial")(state)
    # with r = n / 2 every A token merges, so [unmerged A, all B] is the original order; otherwise not
    assert torch.equal(spatial.origin, out.origin) == (keeps == (0.5, 0.5))


def test_plain_mean_is_not_size_weighted_and_size_option_is():
    state = make_state()
    mean = arrcoc.create("compressor", "aim_merge", keep=[0.5, 0.5], order="spatial")(state)
    wavg = arrcoc.create("compressor", "aim_merge", keep=[0.5, 0.5], order="spatial", weighting="size")(state)
    assert torch.equal(mean.origin, wavg.origin)  # same matching (first round is identical)
    for b in range(state.B):
        for slot in range(int(wavg.counts[b])):
            members = torch.nonzero(wavg.origin[b] == slot).squeeze(1)
            assert torch.allclose(wavg.tokens[b, slot], state.tokens[b, members].mean(0), atol=1e-5)
    assert not torch.allclose(mean.tokens, wavg.tokens)  # a plain mean of means differs from the patch mean


def test_spatial_order_is_the_same_set_in_original_order():
    state = make_state()
    off = arrcoc.create("compressor", "aim_merge", keep=0.75)(state)
    spa = arrcoc.create("compressor", "aim_merge", keep=0.75, order="spatial")(state)
    for b in range(state.B):
        # one round: each token is a B token (odd index) with the A tokens merged into it, or an unmerged
        # A token; spatial order = increasing index of that surviving token
        survivor = []
        for s in range(36):
            group = torch.nonzero(spa.origin[b] == s).squeeze(1).tolist()
            odd = [p for p in group if p % 2 == 1]
            survivor.append(odd[0] if odd else group[0])
        assert survivor == sorted(survivor)
        # same tokens: map via origin of patch 0..47
        for p in range(48):
            assert torch.allclose(off.tokens[b, off.origin[b, p]], spa.tokens[b, spa.origin[b, p]], atol=1e-6)


def test_ragged_batch_equals_per_image_runs_and_counts():
    state = make_state(counts=[48, 31])
    plugin = arrcoc.create("compressor", "aim_merge", keep=[0.6, 15])  # 48 -> 29 -> 15, 31 -> 19 -> 15
    out = plugin(state).check()
    assert out.counts.tolist() == [15, 15]
    assert out.size.sum(1).tolist() == [48.0, 31.0]  # merging conserves total size
    for b, n in enumerate([48, 31]):
        one = TokenState.from_patches(state.tokens[b:b + 1, :n].contiguous(), (1, n))
        single = plugin(one)
        assert torch.allclose(out.tokens[b, :15], single.tokens[0], atol=1e-6)
        assert torch.equal(out.size[b, :15], single.size[0])


def test_odd_count_cap_is_a_recorded_warning():
    state = make_state(H=7, W=7)  # 49 tokens: budget 'present' keep 0.5 -> 24 needs 25 merges, at most 24 possible
    with pytest.warns(arrcoc.ArrcocWarning, match="at most half"):
        out = arrcoc.create("compressor", "aim_merge", keep=0.5, budget="present")(state)
    assert out.counts.tolist() == [25, 25]
    x = [state.tokens[0, i] for i in range(49)]
    assert torch.allclose(out.tokens[0], apply_rows(torch.stack(x), ref_official_merge(x, 24)), atol=1e-5)
    with pytest.warns(arrcoc.ArrcocWarning, match="at most half"):  # the official budget: r = 29 > 24
        arrcoc.create("compressor", "aim_merge", keep=0.4)(state)


@pytest.mark.parametrize("n", [15, 16, 17, 18, 19, 23, 49, 576, 577])
def test_rounds_are_budgeted_like_the_official_code(n):
    # llava_arch.py: r = orig_num // 2, then r = orig_num // 4 (of the original count, capped at t // 2).
    # N = 15: 15 -> 8 -> 5; keeping floor(n / 2) per round of the tokens present gave 15 -> 8 (capped) -> 4.
    state = TokenState.from_patches(torch.randn(1, n, 6, generator=torch.Generator().manual_seed(n)), (1, n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official rounds never hit the n // 2 cap
        out = arrcoc.create("compressor", "aim_merge", keep=[0.5, 0.5])(state).check()
    x = [state.tokens[0, i] for i in range(n)]
    rows1 = ref_official_merge(x, n // 2)
    x1 = list(apply_rows(torch.stack(x), rows1))
    rows2 = ref_official_merge(x1, n // 4)
    assert int(out.counts[0]) == n - n // 2 - min(n // 4, (n - n // 2) // 2)
    torch.testing.assert_close(out.tokens[0], apply_rows(torch.stack(x1), rows2))
    present = arrcoc.create("compressor", "aim_merge", keep=[0.5, 0.5], budget="present")
    t = n
    for _ in range(2):  # keep floor(t / 2) of the tokens present, capped at t // 2 merges
        t -= min(t - t // 2, t // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert int(present(state).counts[0]) == t


def test_seed_pair_merge_halves_the_norm():
    t = torch.randn(16)
    merged = A.seed_pair_merge(t, t, 0.3)
    assert torch.allclose(merged.norm(), t.norm() / 2)
    official = (t + t) / 2  # scatter_reduce(mode="mean") of the pair
    assert torch.allclose(official.norm(), t.norm())
    # the plugin's seed option: a single pair of equal tokens comes out with half the norm
    x = torch.stack([t, t])[None]
    state = TokenState.from_patches(x, (1, 2))
    out = arrcoc.create("compressor", "aim_merge", keep=1, weighting="seed")(state)
    assert torch.allclose(out.tokens[0, 0], t / 2, atol=1e-6)
    mean = arrcoc.create("compressor", "aim_merge", keep=1)(state)
    assert torch.allclose(mean.tokens[0, 0], t, atol=1e-6)


def test_seed_weighting_formula_on_a_pair():
    g = torch.Generator().manual_seed(2)
    ti, tj = torch.randn(6, generator=g), torch.randn(6, generator=g)
    tj = ti + 0.3 * tj  # similar, positive cosine
    state = TokenState.from_patches(torch.stack([ti, tj])[None], (1, 2))
    out = arrcoc.create("compressor", "aim_merge", keep=1, weighting="seed")(state)
    s = float(torch.nn.functional.cosine_similarity(ti, tj, dim=0))
    assert torch.allclose(out.tokens[0, 0], A.seed_pair_merge(ti, tj, s), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    state = make_state().to(dtype=dtype)
    out = arrcoc.create("compressor", "aim_merge")(state).check()
    assert out.dtype == dtype and out.counts.tolist() == [12, 12]
    # the same matching as float32 on the same (rounded) values: cosines are ranked in float64 (ops.similarity_key)
    ref = arrcoc.create("compressor", "aim_merge")(state.to(dtype=torch.float32))
    assert torch.equal(out.origin, ref.origin)
    assert torch.allclose(out.tokens.float(), ref.tokens, atol=0.02)


def test_keys_metric_and_errors():
    state = make_state()
    out = arrcoc.create("compressor", "aim_merge", keep=0.5, metric="keys")(state).check()
    assert out.counts.tolist() == [24, 24]
    with pytest.raises(MissingInputError, match=r"per_token\['keys'\].*attention_layer"):
        arrcoc.create("compressor", "aim_merge", metric="keys")(state.replace(per_token={}))
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        arrcoc.create("compressor", "aim_merge", keep=[0.5, 1.5])
    with pytest.raises(ParamsError, match="at least one round"):
        arrcoc.create("compressor", "aim_merge", keep=[])
    with pytest.raises(BudgetError, match="keep=30 tokens, but an image has only 24"):
        arrcoc.create("compressor", "aim_merge", keep=[0.5, 30])(state)


def test_pipeline_runs_and_shipped_file_validates():
    spec = arrcoc.resolve_spec("aim")
    assert spec.compress[0].use == "aim_merge" and spec.compress[0].params["keep"] == [0.5, 0.5]
    tiny = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}}
    out = arrcoc.run_pipeline({"name": "t", "encoder": tiny, "compress": [{"use": "aim_merge"}]},
                              torch.rand(2, 3, 64, 64), device="cpu")
    assert out.counts.tolist() == [4, 4] and out.size.sum(1).tolist() == [16.0, 16.0]


# --------------------------------------------------------------- in the LLM
def ref_importance(logits, tau=0.1, iters=5, d=0.0):
    """Official get_importance, written out per head with Python lists."""
    B, H, N, _ = logits.shape
    out = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        per_head = []
        for h in range(H):
            M = torch.softmax(logits[b, h].double() / tau, -1)
            dist = [1.0 / N] * N
            for _ in range(iters):
                dist = [sum(dist[i] * float(M[i, j]) for i in range(N)) * (1 - d) + d / N for j in range(N)]
            per_head.append(dist)
        for j in range(N):
            out[b, j] = math.sqrt(sum(per_head[h][j] ** 2 for h in range(H)) / H)
    return out


def test_aim_importance_matches_official_pagerank():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, 7, generator=g)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    logits = logits + causal
    got = A.aim_importance(logits)
    assert torch.allclose(got.double(), ref_importance(logits), atol=1e-6)
    damped = A.aim_importance(logits, damping=0.15)
    assert torch.allclose(damped.double(), ref_importance(logits, d=0.15), atol=1e-6)


def test_aim_importance_ragged_equals_per_image():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 2, 9, 9, generator=g)
    mask = torch.arange(9)[None] < torch.tensor([9, 6])[:, None]
    got = A.aim_importance(logits, mask)
    one = A.aim_importance(logits[1:, :, :6, :6])
    assert torch.allclose(got[1, :6], one[0], atol=1e-6)
    assert bool((got[1, 6:] == 0).all())


def test_retention_schedule_and_pruning():
    sched = A.aim_retention_schedule()
    assert len(sched) == 28
    assert sched[:14] == [1.0] * 14
    assert sched[14:22] == [1 - k * 0.125 for k in range(1, 9)]
    assert sched[21:] == [0.0] * 7
    assert A.aim_retention_schedule(10, 4, 0.25) == [1.0] * 4 + [0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    # layer l: 3 system tokens, 8 visual, 2 question tokens; keep int(8 * 0.5) = 4 visual by importance
    L = 13
    visual = torch.zeros(1, L, dtype=torch.bool)
    visual[0, 3:11] = True
    protected = ~visual
    imp = torch.rand(1, L, generator=torch.Generator().manual_seed(0))
    alive = torch.ones(1, L, dtype=torch.bool)
    alive[0, 4] = False  # pruned at an earlier layer: never comes back
    kept = A.aim_prune_keep(imp, visual, alive, protected, 0.5)
    cand = [i for i in range(3, 11) if i != 4]
    top = sorted(sorted(cand, key=lambda i: (-float(imp[0, i]), i))[:4])
    assert torch.nonzero(kept[0]).squeeze(1).tolist() == [0, 1, 2] + top + [11, 12]


def test_aim_prune_reads_the_llm_context():
    # Image 0: 3 prompt tokens, 8 visual (columns 3..10), 2 question tokens; image 1: 6 visual, then padding.
    state = make_state(H=2, W=4, counts=[8, 6])
    lengths, S = [13, 11], 13
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 2, S, S, generator=g) + torch.full((S, S), float("-inf")).triu(1)
    sequence_mask = torch.arange(S)[None] < torch.tensor(lengths)[:, None]
    columns = (3 + torch.arange(8)).expand(2, 8).contiguous()
    plugin = arrcoc.create("compressor", "aim_prune", start_layer=1, step=0.25)  # 4 layers: 1.0, 0.75, 0.5, 0.25
    llm = LLMContext(layer=2, num_layers=4, input_visual_counts=torch.tensor([8, 6]), attn_logits=logits,
                     visual_columns=columns, sequence_mask=sequence_mask)
    out = plugin(state.replace(llm=llm)).check()
    for b, (n, length) in enumerate(zip([8, 6], lengths)):
        importance = ref_importance(logits[b:b + 1, :, :length, :length])[0, 3:3 + n].tolist()
        k = math.floor(n * 0.75)  # official keep_num: int(original visual count * retain_rate[layer - 1])
        kept = sorted(sorted(range(n), key=lambda i: (-importance[i], i))[:k])
        assert out.counts[b] == k and torch.equal(out.tokens[b, :k], state.tokens[b, kept])
    outside = r"aim_prune: runs inside an LLM \(arrcoc.hf.apply\).*state.llm is None"
    with pytest.raises(MissingInputError, match=outside):
        plugin(state)
    with pytest.raises(MissingInputError, match=r"aim_prune: state.llm.attn_logits is missing.*'attn_logits'"):
        plugin(state.replace(llm=LLMContext(layer=2, num_layers=4, input_visual_counts=torch.tensor([8, 6]))))


@pytest.mark.parametrize("layer", [0, 1, 4, 5])
def test_aim_prune_refuses_a_layer_it_does_not_act_at(layer):
    # 4 layers, start 1, step 0.25: it acts at layers 2 and 3.  Layer 0 used to read retain_rate[-1] (the last
    # layer's 0.25) and keep 2 of 8 tokens without a word; layer 4 failed with a bare IndexError.
    state = make_state(H=2, W=4, counts=[8, 6])
    S = 13
    logits = torch.randn(2, 2, S, S, generator=torch.Generator().manual_seed(9))
    plugin = arrcoc.create("compressor", "aim_prune", start_layer=1, step=0.25)
    assert plugin.llm_layers(4) == (2, 3)
    llm = LLMContext(layer=layer, num_layers=4, input_visual_counts=torch.tensor([8, 6]), attn_logits=logits,
                     visual_columns=(3 + torch.arange(8)).expand(2, 8).contiguous(),
                     sequence_mask=torch.ones(2, S, dtype=torch.bool))
    with pytest.raises(StateError, match=rf"aim_prune: acts at decoder layers \[2, 3\] of a 4-layer LLM, "
                                         rf"got state.llm.layer {layer}"):
        plugin(state.replace(llm=llm))


def test_layer_adaptive_importance():
    t, v = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(A.aim_layer_adaptive_importance(t, v, 7, 28), torch.tensor([[0.25, 0.75]]))
    assert torch.allclose(A.aim_layer_adaptive_importance(t, v, 28, 28), t)
    with pytest.raises(arrcoc.StateError, match="0 <= layer <= num_layers"):
        A.aim_layer_adaptive_importance(t, v, 30, 28)


def test_a_round_with_nothing_to_merge_keeps_the_order():
    # official bipartite_soft_matching returns do_nothing for r <= 0: no reordering either
    state = make_state()
    out = arrcoc.create("compressor", "aim_merge", keep=1.0)(state)
    assert torch.equal(out.tokens, state.tokens) and torch.equal(out.origin, state.origin)
