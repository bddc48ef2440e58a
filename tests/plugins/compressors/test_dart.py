"""DART: pivots by key L1 norm, duplication by cosine, the official set order; `dart` (in the LLM) and `dart_pre`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, MissingInputError, ParamsError
from arrcoc.plugin import BudgetContext
from arrcoc.state import LLMContext, TokenState
from arrcoc_plugins.compressors import dart as D


# ------------------------------------------------------------ the official code, single sample
def official_reference(last_layer_state, any_states, image_start, image_length, max_num_trunction,
                       pivot_image_token=4, pivot_text_token=4, visit="set"):
    """``get_retained_image_token`` of ZichenWen1/DART (modeling_llama_self.py l.397-449), batch 1, rewritten in
    plain torch / Python from the official code: ``last_layer_state`` ``[L, D]`` (layer K-1's output through the
    final norm), ``any_states`` ``[1, H, L, d]`` (layer K-1's post-RoPE keys).  ``visit="set"`` iterates a real
    Python set as the official loop; ``"list"`` the insertion order (image pivots by score, then text pivots).
    Returns the kept absolute sequence indices, sorted (official ``keep_indexs.sort()``)."""
    token_topk = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    keys = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    image_norm = torch.norm(keys[0][image_start:image_start + image_length, :], p=1, dim=-1)
    query_norm = torch.norm(keys[0][image_start + image_length:, :], p=1, dim=-1)
    image_indices = (image_norm.topk(pivot_image_token).indices + image_start).tolist()
    query_indices = (query_norm.topk(pivot_text_token).indices + image_start + image_length).tolist()
    indices_set = set(image_indices + query_indices)
    pivots = list(indices_set) if visit == "set" else image_indices + query_indices
    valid_indices = set(range(image_start, image_start + image_length)) - set(image_indices)
    valid_list = list(valid_indices)
    for item in pivots:
        vectors = last_layer_state[valid_list, :]
        cos = -F.cosine_similarity(last_layer_state[item, :], vectors, dim=-1)
        taken = [valid_list[i] for i in cos.topk(token_topk).indices]
        indices_set.update(taken)
        valid_indices.difference_update(taken)
        valid_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def sequence(seed, start, n, t, dim=16, heads=2, head_dim=4, dtype=torch.float32):
    """One prompt: ``start`` tokens, an image of ``n``, ``t`` text tokens after it: ``(hidden [L, D], keys
    [1, H, L, d])``."""
    g = torch.Generator().manual_seed(seed)
    L = start + n + t
    return (torch.randn(L, dim, generator=g).to(dtype), torch.randn(1, heads, L, head_dim, generator=g).to(dtype))


def key_norms(keys):
    """``[L]`` float32 L1 norms of the heads-concatenated keys (what the model integration hands the stage)."""
    return keys[0].permute(1, 0, 2).reshape(keys.shape[2], -1).float().abs().sum(-1)


def llm_state(prompts, layer=2, num_layers=4):
    """A ragged batch for the `dart` stage from ``(hidden, keys, start, n)`` prompts, as the HF integration builds
    it: visual tokens and signals padded at the end, the text after the image in ``state.llm``."""
    B = len(prompts)
    N = max(p[3] for p in prompts)
    T = max(p[0].shape[0] - p[2] - p[3] for p in prompts)
    dim = prompts[0][0].shape[1]
    dtype = prompts[0][0].dtype
    tokens = torch.zeros(B, N, dim, dtype=dtype)
    norms, vpos = torch.zeros(B, N), torch.zeros(B, N, dtype=torch.int64)
    text, tnorms = torch.zeros(B, T, dim, dtype=dtype), torch.zeros(B, T)
    tmask, tpos = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.int64)
    for b, (hidden, keys, start, n) in enumerate(prompts):
        t = hidden.shape[0] - start - n
        kn = key_norms(keys)
        tokens[b, :n], norms[b, :n], vpos[b, :n] = hidden[start:start + n], kn[start:start + n], torch.arange(n) + start
        text[b, :t], tnorms[b, :t] = hidden[start + n:], kn[start + n:]
        tmask[b, :t], tpos[b, :t] = True, torch.arange(t) + start + n
    counts = torch.tensor([p[3] for p in prompts])
    state = TokenState.from_patches(tokens, (1, N))
    state = ops.keep(state, torch.arange(N).expand(B, N), torch.arange(N)[None] < counts[:, None])
    # (the test's hidden states stand for the final-normed ones and the tokens alike)
    state = state.with_per_token(key_norms=norms, normed_hidden=tokens)
    llm = LLMContext(layer=layer, num_layers=num_layers, input_visual_counts=counts, visual_positions=vpos,
                     text_positions=tpos, text_mask=tmask, text_key_norms=tnorms, text_normed_hidden=text)
    return state.replace(llm=llm)


def kept_positions(state, out):
    """The sequence indices of the tokens a stage kept, per prompt."""
    rows = []
    for b in range(out.B):
        index = (out.origin[b] >= 0).nonzero().flatten()  # 1 x N grid: the input tokens still present
        assert len(index) == int(out.counts[b])
        rows.append(state.llm.visual_positions[b, index].tolist())
    return rows


def run_dart(state, **params):
    return arrcoc.create("compressor", "dart", **params)(state).check()


# (start, n, t): image starts chosen so that the pivots' indices collide modulo the set's table (32 slots for 8
# ints): the set order is then neither the index order nor the score order.
CASES = [(35, 64, 12, 16), (5, 40, 9, 8), (3, 96, 30, 24), (35, 576, 20, 128), (61, 33, 7, 24)]


@pytest.mark.parametrize("start,n,t,budget", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_official_code(start, n, t, budget, seed):
    hidden, keys = sequence(seed, start, n, t)
    state = llm_state([(hidden, keys, start, n)])
    out = run_dart(state, keep=budget)
    ref = official_reference(hidden, keys, start, n, budget)
    assert kept_positions(state, out) == [ref]
    assert int(out.counts[0]) == 4 + 8 * (budget // 8)  # 4 more than the nominal budget M, officially
    index = (out.origin[0] >= 0).nonzero().flatten()
    assert torch.equal(out.tokens[0], state.tokens[0, index])  # the kept tokens, in sequence order


def test_the_set_order_differs_from_the_score_order_and_decides_the_tokens():
    """The reference iterates a real Python set; the plugin reproduces it where the set order is not the score
    order (checked here), and there the score order keeps other tokens."""
    differs = 0
    for seed in range(12):
        hidden, keys = sequence(seed, 5, 40, 9)
        kn = key_norms(keys)
        image = (kn[5:45].topk(4).indices + 5).tolist()
        text = (kn[45:].topk(4).indices + 45).tolist()
        inserted = image + text
        state = llm_state([(hidden, keys, 5, 40)])
        official = kept_positions(state, run_dart(state, keep=24))
        assert official == [official_reference(hidden, keys, 5, 40, 24)]
        by_score = kept_positions(state, run_dart(state, keep=24, pivot_order="score"))
        assert by_score == [official_reference(hidden, keys, 5, 40, 24, visit="list")]
        if list(set(inserted)) != inserted and official != by_score:
            differs += 1
    assert differs >= 3  # the order is not a detail on these prompts


def test_pivot_visit_order_is_the_set_order():
    positions = torch.tensor([[40, 8, 72, 9, 45, 77, 50, 46], [1, 2, 3, 4, 5, 6, 7, 8]])
    order = D.pivot_visit_order(positions)
    for b in range(2):
        row = positions[b].tolist()
        assert [row[i] for i in order[b].tolist()] == list(set(row))
    assert order[0].tolist() != list(range(8))  # 40, 8, 72 collide modulo 32
    with pytest.raises(arrcoc.StateError, match="share sequence indices"):
        D.pivot_visit_order(torch.tensor([[3, 3, 4]]))


@pytest.mark.parametrize("order", ["official", "score"])
def test_ragged_batch_equals_each_prompt_alone(order):
    prompts = []
    for b, (start, n, t) in enumerate([(35, 64, 12), (7, 41, 5), (20, 57, 30)]):
        hidden, keys = sequence(10 + b, start, n, t)
        prompts.append((hidden, keys, start, n))
    state = llm_state(prompts)
    out = run_dart(state, keep=32, pivot_order=order)
    assert out.counts.tolist() == [36, 36, 36]
    together = kept_positions(state, out)
    for b, prompt in enumerate(prompts):
        alone = llm_state([prompt])
        assert [together[b]] == kept_positions(alone, run_dart(alone, keep=32, pivot_order=order))
        if order == "official":
            assert together[b] == official_reference(prompt[0], prompt[1], prompt[2], prompt[3], 32)


@pytest.mark.parametrize("checks", [False, True])
@pytest.mark.parametrize("order", ["official", "score"])
@pytest.mark.parametrize("count", ["official", "exact"])
@pytest.mark.parametrize("keep", [0.5, 24])
def test_a_prompt_without_visual_tokens_keeps_none_and_changes_nothing_else(keep, order, count, checks):
    """A batch may hold a text-only prompt (the model integration hands the stage one row per prompt, as
    FastV's): it has no image to prune, so no budget, no image pivots and no text pivots are asked of it (here 2
    text tokens, fewer than the 4 text pivots; a count M above its 0 tokens), it keeps none, and the other prompts
    keep what they keep alone."""
    with_image = [(*sequence(20 + b, start, n, t), start, n) for b, (start, n, t) in enumerate([(35, 64, 12),
                                                                                              (7, 41, 5)])]
    text_only = (*sequence(30, 6, 0, 2), 6, 0)
    state = llm_state([with_image[0], text_only, with_image[1]])
    with ops.checking(checks):
        out = run_dart(state, keep=keep, count=count, pivot_order=order)
        alone = [kept_positions(s, run_dart(s, keep=keep, count=count, pivot_order=order))[0]
                 for s in (llm_state([p]) for p in with_image)]
    assert out.counts.tolist() == [len(alone[0]), 0, len(alone[1])]
    assert kept_positions(state, out) == [alone[0], [], alone[1]]
    # dart_select itself: a prompt without visual tokens takes nothing, whatever the takes say.
    index, valid = D.dart_select(state.per_token["normed_hidden"], state.per_token["key_norms"], state.mask,
                                 state.llm.text_normed_hidden, state.llm.text_key_norms, state.llm.text_mask, 3)
    assert valid.sum(1).tolist() == [4 + 8 * 3, 0, 4 + 8 * 3]
    if count == "official" and order == "official":
        budgets = [keep if isinstance(keep, int) else int(n * keep) for *_, n in with_image]
        assert alone == [official_reference(h, k, s, n, m) for (h, k, s, n), m in zip(with_image, budgets)]


def test_ratio_budget_per_prompt():
    """A ratio is the official N (1 - reduction_ratio) fallback: floor(n keep) // 8 per pivot, per prompt."""
    prompts = [(*sequence(3, 35, 64, 12), 35, 64), (*sequence(4, 9, 40, 6), 9, 40)]
    state = llm_state(prompts)
    out = run_dart(state, keep=0.5)
    assert out.counts.tolist() == [4 + 8 * (32 // 8), 4 + 8 * (20 // 8)]
    for b, (hidden, keys, start, n) in enumerate(prompts):
        assert kept_positions(state, out)[b] == official_reference(hidden, keys, start, n, int(n * 0.5))


def test_ties_are_broken_by_index():
    """Equal key norms: the first tokens are the pivots; equal cosines: the lowest indices are taken first."""
    N, T, dim = 24, 6, 8
    tokens = torch.ones(1, N, dim)
    state = llm_state([(torch.ones(N + T, dim), torch.ones(1, 1, N + T, 2), 0, N)])
    out = run_dart(state, keep=8)  # 4 pivots + 8 x 1: every cosine is 1, every norm 2
    assert kept_positions(state, out) == [list(range(12))]
    assert torch.equal(out.tokens, tokens[:, :12])


def test_count_exact_keeps_the_budget():
    hidden, keys = sequence(7, 35, 576, 20)
    state = llm_state([(hidden, keys, 35, 576)])
    assert int(run_dart(state, keep=128).counts[0]) == 132  # official: 4 + 8 x 16
    exact = run_dart(state, keep=128, count="exact")
    assert int(exact.counts[0]) == 128
    takes = D.dart_takes(128, torch.tensor([576]), count="exact")
    assert takes.tolist() == [[16, 16, 16, 16, 15, 15, 15, 15]]  # 124 = 4 x 16 + 4 x 15, first pivots first
    assert D.dart_takes(64, torch.tensor([576])).tolist() == [[8] * 8]
    # The exact variant keeps the official pivots' first picks: every pivot takes its lowest cosines first.
    assert set(kept_positions(state, exact)[0]) <= set(official_reference(hidden, keys, 35, 576, 136))


def test_image_and_text_pivots_can_be_changed():
    hidden, keys = sequence(8, 10, 50, 8)
    state = llm_state([(hidden, keys, 10, 50)])
    out = run_dart(state, keep=18, image_pivots=2, text_pivots=1)
    assert kept_positions(state, out) == [official_reference(hidden, keys, 10, 50, 18, 2, 1)]
    assert int(out.counts[0]) == 2 + 3 * 6
    no_text = run_dart(state.replace(llm=LLMContext(layer=2, num_layers=4, input_visual_counts=torch.tensor([50]),
                                                    visual_positions=state.llm.visual_positions)),
                       keep=16, text_pivots=0)
    assert int(no_text.counts[0]) == 4 + 4 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_the_reference_in_float32(dtype):
    hidden, keys = sequence(5, 35, 64, 12, dtype=dtype)
    state = llm_state([(hidden, keys, 35, 64)])
    out = run_dart(state, keep=16)
    assert out.dtype == dtype
    # arrcoc's cosines are float32 of the half inputs, as the reference's here
    assert kept_positions(state, out) == [official_reference(hidden.float(), keys.float(), 35, 64, 16)]


def test_errors():
    hidden, keys = sequence(0, 5, 34, 9)
    state = llm_state([(hidden, keys, 5, 34)])
    with pytest.raises(BudgetError, match="asked to keep 35 tokens, but an image has only 34"):
        run_dart(state, keep=35)
    with pytest.raises(BudgetError, match=r"image 0 has 34 visual tokens.*need 36.*official topk raises"):
        run_dart(state, keep=32)  # 4 + 8 x 4 = 36 > 34
    with pytest.raises(BudgetError, match="count: exact keeps 3 tokens per image, fewer than its 4 image pivots"):
        run_dart(state, keep=3, count="exact")
    with pytest.raises(MissingInputError, match=r"per_token\['key_norms'\]"):
        run_dart(state.replace(per_token={"normed_hidden": state.tokens}))
    with pytest.raises(MissingInputError, match=r"per_token\['normed_hidden'\]"):
        run_dart(state.replace(per_token={"key_norms": state.per_token["key_norms"]}))
    with pytest.raises(MissingInputError, match="runs inside an LLM"):
        run_dart(state.replace(llm=None))
    bare = LLMContext(layer=2, num_layers=4, input_visual_counts=torch.tensor([34]),
                      visual_positions=state.llm.visual_positions)
    with pytest.raises(MissingInputError, match=r"state.llm.text_normed_hidden is missing.*'normed_hidden'"):
        run_dart(state.replace(llm=bare), keep=8)
    short = llm_state([(hidden[:42], keys[:, :, :42], 5, 34)])  # 3 text tokens after the image
    with pytest.raises(MissingInputError, match=r"text pivots come from the text after the image.*\[0\] have only 3"):
        run_dart(short, keep=8)
    assert int(run_dart(short, keep=8, text_pivots=3).counts[0]) == 4 + 7
    with pytest.raises(ParamsError, match="at least one pivot"):
        arrcoc.create("compressor", "dart", image_pivots=0, text_pivots=0)
    with pytest.raises(ParamsError, match="layer"):
        arrcoc.create("compressor", "dart", layer=0)


# ------------------------------------------------------------ budget rule
def context(tokens, layers):
    return BudgetContext(tokens=tokens, original=tokens, grid=(1, tokens), layers=layers)


def test_budget_rule_reaches_the_layer_mean():
    ctx = context(576, 32)
    # The official setting: layers 0, 1 see 576, layers 2 .. 31 see 132.
    mean = (2 * 576 + 30 * 132) / 32
    assert D.DART.budget_params({}, mean, ctx) == {"layer": 2, "keep": 128}
    assert D.DART.budget_params({"count": "exact"}, (2 * 576 + 30 * 100) / 32, ctx) == {
        "count": "exact", "layer": 2, "keep": 100}
    lo, hi = D.DART.budget_bounds({}, ctx)
    assert lo == (576 + 31 * 4) / 32  # K = 1, the 4 image pivots alone
    assert hi == (2 * 576 + 30 * (4 + 8 * 71)) / 32  # K = 2, every pivot taking floor(572 / 8)
    # Every target in range is met within half a step of the kept count (8 tokens over 30 of 32 layers).
    for target in torch.linspace(lo, hi, 23).tolist():
        params = D.DART.budget_params({}, target, ctx)
        kept = D.dart_kept(params["keep"], 576)
        got = (params["layer"] * 576 + (32 - params["layer"]) * kept) / 32
        assert abs(got - target) <= 8 * 31 / 32 / 2 + 1e-6 or params["layer"] == 1
    # Below what K = 2 reaches (its 4 image pivots alone: 39.75), the rule moves to K = 1.
    assert D.DART.budget_params({}, (2 * 576 + 30 * 4) / 32, ctx) == {"layer": 2, "keep": 1}
    assert D.DART.budget_params({}, (576 + 31 * 12) / 32, ctx) == {"layer": 1, "keep": 8}


def test_budget_rule_refuses_what_it_cannot_reach():
    with pytest.raises(BudgetError, match="no layer K >= 1"):
        D.DART.budget_bounds({}, context(576, 1))
    with pytest.raises(BudgetError, match="fewer than its 4 image pivots"):
        D.DART.budget_bounds({}, context(3, 8))
    spec = {"name": "t", "encoder": {"use": "timm_vit", "model": "vit_tiny_patch16_224"}, "llm": [{"use": "dart"}]}
    with pytest.raises(BudgetError, match="dart"):
        arrcoc.budget.plan_budget(arrcoc.resolve_spec(spec), 0.01, original=576, grid=(24, 24), layers=32)


# ------------------------------------------------------------ before the LLM (arrcoc's variant)
def test_dart_pre_is_dart_on_the_projected_features_and_the_query():
    """arrcoc's pre-LLM variant: the reference with the features as both hidden states and keys (their L1 norm),
    the query rows as the text after the image, pivots visited in score order."""
    g = torch.Generator().manual_seed(3)
    counts = [48, 40]
    tokens = torch.randn(2, 48, 16, generator=g)
    query = torch.randn(2, 7, 16, generator=g)
    query_mask = torch.arange(7)[None] < torch.tensor([[7], [5]])
    state = TokenState.from_patches(tokens, (6, 8))
    state = ops.keep(state, torch.arange(48).expand(2, 48), torch.arange(48)[None] < torch.tensor(counts)[:, None])
    state = state.replace(query=query, query_mask=query_mask)
    out = arrcoc.create("compressor", "dart_pre", keep=24)(state).check()
    assert out.counts.tolist() == [28, 28]
    for b, (n, t) in enumerate(zip(counts, [7, 5])):
        seq = torch.cat([tokens[b, :n], query[b, :t]])
        ref = official_reference(seq, seq[None, None], 0, n, 24, visit="list")
        assert (out.origin[b] >= 0).nonzero().flatten().tolist() == ref
    with pytest.raises(MissingInputError, match="dart_pre: needs a query"):
        arrcoc.create("compressor", "dart_pre")(state.replace(query=None, query_mask=None))
    assert D.DARTPre.stage == "projector" and D.DARTPre.needs == frozenset({"query"})
    ctx = context(576, 32)
    assert D.DARTPre.budget_bounds({}, ctx) == (4.0, 4.0 + 8 * 71)
    assert D.DARTPre.budget_params({}, 132.0, ctx) == {"keep": 128}
    assert D.DARTPre.budget_params({"count": "exact"}, 64.0, ctx) == {"count": "exact", "keep": 64}


def test_pipeline_is_the_official_setting():
    spec = arrcoc.resolve_spec("dart")
    assert [(s.use, s.params) for s in spec.llm] == [("dart", {"layer": 2, "keep": 128})]
    plugin = arrcoc.create("compressor", "dart", **spec.llm[0].params)
    assert plugin.params.count == "official" and plugin.params.pivot_order == "official"
    assert plugin.llm_layers(32) == (2,) and D.DART.stage == "llm"
    assert D.DART.needs == frozenset({"key_norms", "normed_hidden"})
