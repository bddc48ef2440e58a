"""PyramidDrop: the counts, the last-token ranking, the `llm`-stage plugin and its budget rule.

The reference (:func:`official_stage`) is written from Cooperx521/PyramidDrop @ 6444f30
``pdrop_rank_drop`` (modeling_llama_pdrop.py l.1291-1465), one unpadded sample in plain torch: the layer's
RMSNorm, q / k projections, rotary embeddings at the (compact) positions, the last prompt token's row plus the
causal mask, ``softmax(dtype=float32).to(dtype)``, the head mean, the image columns, ``topk(int(N0 * r[s]))``,
``+ image_index``, ``.sort()``, and the sequence rebuilt as ``pre + kept + post``, renumbered 0, 1, ...
"""

from __future__ import annotations

import math

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.budget import plan_budget
from arrcoc.errors import BudgetError, MissingInputError, ParamsError, StateError
from arrcoc.plugin import BudgetContext
from arrcoc.state import LLMContext, TokenState
from arrcoc_plugins.compressors import pyramiddrop as P

FIELD = "attn_from_last_here"
D, HEADS, HEAD_DIM = 16, 4, 4


# --------------------------------------------------------------------------- an official-style toy model
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    v = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(v + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotary(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Llama rotary embedding of ``x`` ``[..., heads, S, d]`` at positions ``pos`` ``[S]`` (or ``[B, S]``)."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = pos.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    if pos.ndim == 2:  # [B, S, d] -> [B, 1, S, d]
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def layer_weights(seed: int, kv_heads: int = HEADS) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"norm": 1 + 0.1 * torch.randn(D, generator=g), "q": torch.randn(D, HEADS * HEAD_DIM, generator=g) / 2,
            "k": torch.randn(D, kv_heads * HEAD_DIM, generator=g) / 2}


def official_stage(features, image_index, image_tokens, keep, prompt_len, w, dtype=torch.float32):
    """``pdrop_rank_drop`` for one sample (inference branch): ``(kept sequence indices, new features)``."""
    x = features.to(dtype)
    h = rms_norm(x, w["norm"].to(dtype))
    q_len = x.shape[0]
    q = (h @ w["q"].to(dtype)).view(q_len, HEADS, HEAD_DIM).transpose(0, 1)
    k = (h @ w["k"].to(dtype)).view(q_len, HEADS, HEAD_DIM).transpose(0, 1)  # no repeat_kv, as officially
    position_ids = torch.arange(q_len)  # contiguous (renumbered after each drop)
    q, k = rotary(q, position_ids), rotary(k, position_ids)
    causal = torch.full((q_len, q_len), torch.finfo(dtype).min).triu(1).to(dtype)
    row = prompt_len + image_tokens - 1  # the last instruction token
    attn = (q[:, row:row + 1] @ k.transpose(1, 2)) / math.sqrt(HEAD_DIM) + causal[row][None, None]
    attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(dtype)
    avg = attn.mean(0)[:, image_index:image_index + image_tokens].mean(0)
    top = avg.topk(keep).indices + image_index
    top = top.sort().values
    start = image_index + image_tokens
    return top, torch.cat([features[:image_index], features[top], features[start:]])


def samples(seed: int = 0):
    """Three prompts: (pre text, image tokens, post text), hidden states [S, D]."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 24, 6), (3, 17, 9), (7, 21, 1)]
    return [(pre, n, post, torch.randn(pre + n + post, D, generator=g)) for pre, n, post in shapes]


# --------------------------------------------------------------------------- arrcoc's side
def batched_scores(seqs, w, kv_heads=HEADS):
    """``attn_from_last_here`` of every visual token of a left-padded batch of sequences.

    ``seqs``: per prompt ``(hidden [S, D], visual [S] bool)``.  Returns ``(scores [B, N], mask [B, N])``,
    each prompt's visual tokens packed in sequence order.
    """
    B, S = len(seqs), max(h.shape[0] for h, _ in seqs)
    hidden = torch.zeros(B, S, D)
    real = torch.zeros(B, S, dtype=torch.bool)
    visual = torch.zeros(B, S, dtype=torch.bool)
    for b, (h, v) in enumerate(seqs):
        hidden[b, S - h.shape[0]:], real[b, S - h.shape[0]:], visual[b, S - h.shape[0]:] = h, True, v
    pos = (real.long().cumsum(1) - 1).clamp(min=0)  # compact: 0 at each row's first real token
    x = rms_norm(hidden, w["norm"])
    q = rotary((x @ w["q"]).view(B, S, HEADS, HEAD_DIM).transpose(1, 2), pos)
    k = rotary((x @ w["k"]).view(B, S, kv_heads, HEAD_DIM).transpose(1, 2), pos)
    attn = P.last_query_attention(q[:, :, -1], k, real)  # the last token is every row's last prompt token
    index, valid = ops.pack(visual)
    return ops.gather_rows(attn[:, :, None], index, valid)[..., 0], valid


def visual_state(scores, mask, layer, num_layers, n0, extra=None, tokens=None):
    B, N = scores.shape
    if tokens is None:
        tokens = torch.randn(B, N, 8, generator=torch.Generator().manual_seed(3))
    state = TokenState.from_patches(tokens, (1, N))
    idx = torch.arange(N).expand(B, N).contiguous()
    state = ops.keep(state, idx, mask)
    fields = {FIELD: scores, "slot": idx.clone(), **(extra or {})}
    return state.with_per_token(**fields).replace(
        llm=LLMContext(layer=layer, num_layers=num_layers, input_visual_counts=torch.as_tensor(n0)))


def kept_slots(out: TokenState, b: int) -> list[int]:
    return out.per_token["slot"][b, : int(out.counts[b])].tolist()


# --------------------------------------------------------------------------- counts
def test_keep_counts_are_int_of_the_original_count_times_the_stage_ratio():
    n0 = torch.tensor([576, 7, 0, 1, 2880])
    for ratio in (0.5, 0.3, 0.7, 1.0):
        for s in (1, 2, 3):
            got = P.pdrop_keep_counts(n0, ratio, s).tolist()
            # official: int(cur_image_token * image_token_ratio_list[s]); arrcoc: at least one of a real image
            assert got == [max(int(n * ratio ** s), 1) if n else 0 for n in n0.tolist()], (ratio, s)
    assert [P.pdrop_keep_counts(torch.tensor([576]), 0.5, s).item() for s in (1, 2, 3)] == [288, 144, 72]
    # int(7 * 0.125) = 0: an image keeps at least one token
    assert [P.pdrop_keep_counts(torch.tensor([7]), 0.5, s).item() for s in (1, 2, 3)] == [3, 1, 1]
    # the quirk (at 0.5 both readings agree): of the ORIGINAL count, int(7 * 0.7 ** 2) = int(3.43) = 3; of the
    # previous stage's, int(int(7 * 0.7) * 0.7) = int(4 * 0.7) = 2
    assert P.pdrop_keep_counts(torch.tensor([7]), 0.7, 2).item() == int(7 * 0.7 ** 2) == 3
    assert int(int(7 * 0.7) * 0.7) == 2
    with pytest.raises(StateError, match="1-based"):
        P.pdrop_keep_counts(n0, 0.5, 0)
    with pytest.raises(BudgetError, match=r"ratio must lie in \(0, 1\]"):
        P.pdrop_keep_counts(n0, 1.5, 1)


# --------------------------------------------------------------------------- the official reference
@pytest.mark.parametrize("ratio", [0.5, 0.6])
def test_three_stages_equal_the_official_loop_ragged_batch(ratio):
    """Layers [2, 4, 6] of an 8-layer LLM, one set of q / k weights per stage (the layer's own); three ragged
    prompts in one left-padded batch: each stage keeps the same tokens, in the same order, as the official loop
    on each prompt alone, with the official counts."""
    data = samples()
    layers = [2, 4, 6]
    plugin = arrcoc.create("compressor", "pyramiddrop", layers=layers, ratio=ratio)
    ratios = [1.0] + [ratio ** s for s in (1, 2, 3)]
    n0 = [n for _, n, _, _ in data]
    # official state per prompt: features and the original index of each row
    official = [(h.clone(), torch.arange(h.shape[0])) for *_, h in data]
    ours = [(h.clone(), torch.arange(h.shape[0])) for *_, h in data]
    for s, layer in enumerate(layers, start=1):
        w = layer_weights(100 + layer)
        for b, (pre, n, post, _) in enumerate(data):
            feats, orig = official[b]
            image_tokens, keep = int(n * ratios[s - 1]), int(n * ratios[s])
            top, new = official_stage(feats, pre, image_tokens, keep, pre + post, w)
            # prompt_len = text tokens (the official count is len(input_ids) - 1, the placeholder excluded)
            keep_rows = torch.cat([torch.arange(pre), top, torch.arange(pre + image_tokens, feats.shape[0])])
            official[b] = (new, orig[keep_rows])
        seqs = [(h, torch.isin(o, torch.arange(pre, pre + n))) for (h, o), (pre, n, _, _) in zip(ours, data)]
        scores, mask = batched_scores(seqs, w)
        out = plugin(visual_state(scores, mask, layer, 8, n0)).check()
        assert out.counts.tolist() == [max(int(n * ratio ** s), 1) for n in n0]
        for b, (pre, n, post, _) in enumerate(data):
            h, o = ours[b]
            vis = torch.nonzero(seqs[b][1]).squeeze(1)
            rows = torch.cat([torch.arange(pre), vis[kept_slots(out, b)], torch.arange(pre + len(vis), h.shape[0])])
            ours[b] = (h[rows], o[rows])
            assert torch.equal(ours[b][1], official[b][1]), (s, b)
            assert torch.equal(ours[b][0], official[b][0])


def test_grouped_query_heads_repeat_the_keys():
    """GQA (2 key heads for 4 query heads): the official ranking has no repeat_kv (its matmul cannot pair 4
    query heads with 2 key heads); arrcoc's pairs query head h with key head h // 2, as attention does."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    got = P.last_query_attention(q, k, mask)
    for b in range(2):
        keys = k[b].repeat_interleave(2, dim=0)[:, mask[b]]  # repeat_kv
        probs = torch.softmax(q[b][:, None] @ keys.transpose(1, 2) / math.sqrt(8), -1, dtype=torch.float32)
        torch.testing.assert_close(got[b, mask[b]], probs.mean(0)[0], rtol=0, atol=1e-7)
        assert bool((got[b, ~mask[b]] == 0).all())
    with pytest.raises(StateError, match="4 query heads are not a multiple of 3 key heads"):
        P.last_query_attention(q, torch.randn(2, 3, 11, 8))
    with pytest.raises(StateError, match=r"expected query \[B, H, d\]"):
        P.last_query_attention(q[0], k)


def test_probs_dtype_reproduces_the_official_cast_before_the_head_mean():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 4, 8, generator=g).half(), torch.randn(1, 4, 30, 8, generator=g).half()
    got = P.last_query_attention(q, k, probs_dtype=torch.float16)
    # official: torch.matmul(q, k^T) / math.sqrt(head_dim), both in the model's dtype, then the fp32 softmax
    attn = torch.matmul(q[0][:, None], k[0].transpose(1, 2)) / math.sqrt(8)
    assert attn.dtype == torch.float16
    official = torch.softmax(attn, -1, dtype=torch.float32).to(torch.float16).mean(0)[0]
    assert got.dtype == torch.float32 and torch.equal(got[0], official.float())
    # the division in fp16 matters: after it in float32 (as a float32 kernel would) the probabilities differ
    divided_in_fp32 = torch.matmul(q[0][:, None], k[0].transpose(1, 2)).float() / math.sqrt(8)
    assert not torch.equal(torch.softmax(divided_in_fp32, -1).to(torch.float16).mean(0)[0], official)
    plain = P.last_query_attention(q, k)
    torch.testing.assert_close(plain, got, rtol=0, atol=2e-3)  # float32 mean: differs by fp16 rounding only


# --------------------------------------------------------------------------- the plugin
def test_ragged_batch_equals_each_prompt_alone():
    g = torch.Generator().manual_seed(7)
    counts = [40, 23, 31]
    scores = torch.rand(3, 40, generator=g)
    mask = torch.arange(40)[None] < torch.tensor(counts)[:, None]
    plugin = arrcoc.create("compressor", "pyramiddrop", layers=[1, 2, 3], ratio=0.5)
    tokens = torch.randn(3, 40, 8, generator=g)
    out = plugin(visual_state(scores, mask, 2, 4, counts, tokens=tokens)).check()  # stage 2: int(n / 4)
    assert out.counts.tolist() == [10, 5, 7]
    for b, n in enumerate(counts):
        alone = plugin(visual_state(scores[b:b + 1, :n], mask[b:b + 1, :n], 2, 4, [n], tokens=tokens[b:b + 1, :n]))
        assert kept_slots(out, b) == kept_slots(alone, 0)
        assert kept_slots(out, b) == sorted(sorted(range(n), key=lambda i: (-float(scores[b, i]), i))[:n // 4])
        assert torch.equal(out.tokens[b, : n // 4], alone.tokens[0])


def test_ties_go_to_the_lower_index_and_order_is_the_sequence():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5, 0.5, 0.0, 0.5]])
    plugin = arrcoc.create("compressor", "pyramiddrop", layers=[3], ratio=0.5)
    out = plugin(visual_state(scores, torch.ones(1, 8, dtype=torch.bool), 3, 6, [8]))
    assert kept_slots(out, 0) == [1, 2, 4, 5]
    flat = plugin(visual_state(torch.zeros(2, 8), torch.ones(2, 8, dtype=torch.bool), 3, 6, [8, 8]))
    assert kept_slots(flat, 0) == kept_slots(flat, 1) == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_and_tokens(dtype):
    g = torch.Generator().manual_seed(8)
    scores = torch.rand(2, 12, generator=g)
    state = visual_state(scores, torch.ones(2, 12, dtype=torch.bool), 1, 3, [12, 12])
    out = arrcoc.create("compressor", "pyramiddrop", layers=[1, 2])(state.to(dtype=dtype)).check()
    assert out.dtype == dtype and out.counts.tolist() == [6, 6]
    ref = scores.to(dtype).float()  # ranked as their float32 values
    for b in range(2):
        assert kept_slots(out, b) == sorted(sorted(range(12), key=lambda i: (-float(ref[b, i]), i))[:6])


def test_prompt_without_image_keeps_nothing_and_others_are_unaffected():
    scores = torch.rand(2, 6, generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([[True] * 6, [False] * 6])
    out = arrcoc.create("compressor", "pyramiddrop", layers=[1])(visual_state(scores, mask, 1, 2, [6, 0])).check()
    assert out.counts.tolist() == [3, 0]


def test_errors():
    plugin = arrcoc.create("compressor", "pyramiddrop", layers=[2, 4])
    scores, mask = torch.rand(2, 10), torch.ones(2, 10, dtype=torch.bool)
    with pytest.raises(MissingInputError, match=r"per_token\['attn_from_last_here'\].*layer 2.*integrations.hf"):
        plugin(visual_state(scores, mask, 2, 6, [10, 10]).replace(per_token={}))
    with pytest.raises(MissingInputError, match="runs inside an LLM"):
        plugin(visual_state(scores, mask, 2, 6, [10, 10]).replace(llm=None))
    with pytest.raises(StateError, match=r"acts at decoder layers \[2, 4\] of a 6-layer LLM, got state.llm.layer 3"):
        plugin(visual_state(scores, mask, 3, 6, [10, 10]))
    with pytest.raises(StateError, match=r"must be \[B, N\]=\[2, 10\], got \[2, 10, 4\]"):
        plugin(visual_state(scores, mask, 2, 6, [10, 10]).with_per_token(**{FIELD: torch.rand(2, 10, 4)}))
    # 10 present but N0 = 40 at the LLM input: stage 1 keeps int(40 * 0.5) = 20 > 10
    with pytest.raises(BudgetError, match=r"stage 1 \(before layer 2\) keeps .* = \[20, 5\] .* only \[10, 10\]"):
        plugin(visual_state(scores, mask, 2, 6, [40, 10]))
    for bad, match in [({"layers": []}, "increasing decoder layer indices"),
                       ({"layers": [0, 8]}, "increasing decoder layer indices"),
                       ({"layers": [16, 8]}, "increasing decoder layer indices"),
                       ({"layers": [8, 8]}, "increasing decoder layer indices"),
                       ({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"),
                       ({"positions": "original", "decode_positions": "shifted"}, "decode_positions: unpruned"),
                       ({"mode": "mask"}, "mode")]:
        with pytest.raises(ParamsError, match=match):
            arrcoc.create("compressor", "pyramiddrop", **bad)


def test_params_defaults_and_position_rules():
    p = arrcoc.create("compressor", "pyramiddrop")
    assert (p.params.layers, p.params.ratio, p.params.positions, p.params.decode_positions) == (
        [8, 16, 24], 0.5, "compact", "shifted")
    assert p.llm_layers(32) == (8, 16, 24) and p.needs == frozenset({FIELD}) and P.PyramidDrop.stage == "llm"
    assert (p.removes, p.position_rule, p.decode_position_rule) == (True, "compact", "shifted")
    original = arrcoc.create("compressor", "pyramiddrop", positions="original")
    assert (original.position_rule, original.decode_position_rule) == ("original", "unpruned")
    gap = arrcoc.create("compressor", "pyramiddrop", decode_positions="unpruned")
    assert (gap.position_rule, gap.decode_position_rule) == ("compact", "unpruned")


def test_pipeline_is_the_official_llava_setting():
    spec = arrcoc.resolve_spec("pyramiddrop")
    assert spec.llm[0].use == "pyramiddrop"
    assert spec.llm[0].params == {"layers": [8, 16, 24], "ratio": 0.5, "positions": "compact",
                                  "decode_positions": "shifted"}


# --------------------------------------------------------------------------- budget rule
def context(tokens: int, layers: int) -> BudgetContext:
    return BudgetContext(tokens=tokens, original=tokens, grid=(1, tokens), layers=layers)


def layer_visual(n: int, num_layers: int, params: dict) -> list[int]:
    """Visual tokens each decoder layer sees under ``params`` (counted layer by layer, not by layer_mean)."""
    counts = [n] + [max(int(n * params["ratio"] ** s), 1) for s in range(1, len(params["layers"]) + 1)]
    return [counts[sum(1 for a in params["layers"] if a <= i)] for i in range(num_layers)]


@pytest.mark.parametrize("tokens, layers, target, expect_layers, expect_counts, expect_mean", [
    (576, 32, 270.0, [8, 16, 24], [288, 144, 72], 270.0),  # the official setting: 576/288/144/72
    # The pyramid keeps ratio >= 0.5 while an earlier spacing reaches the target at 0.5 (K = 4: mean 171):
    (576, 32, 192.0, [4, 8, 12], [315, 173, 94], 191.75),
    (576, 32, 128.0, [2, 4, 6], [297, 153, 79], 128.3125),
    (576, 32, 96.75, [1, 2, 3], [288, 144, 72], 96.75),    # K = 1 at the official 0.5
    (576, 32, 64.0, [1, 2, 3], [236, 97, 39], 63.75),      # below it: ratio < 0.5 at K = 1
    (256, 3, 128.0, [1, 2], [94, 34], 128.0),              # the shipped ToyVQA LLM: 3 layers, 256 tokens
    (256, 3, 256.0, [1, 2], [256, 256], 256.0),
    (256, 3, 86.0, [1, 2], [1, 1], 86.0),                  # its fewest
])
def test_budget_rule_figures(tokens, layers, target, expect_layers, expect_counts, expect_mean):
    params = P.PyramidDrop.budget_params({}, target, context(tokens, layers))
    assert params["layers"] == expect_layers
    assert P.pdrop_keep_counts(torch.tensor([tokens]).expand(1), params["ratio"], 1).item() == expect_counts[0]
    assert [max(int(tokens * params["ratio"] ** s), 1) for s in range(1, len(expect_layers) + 1)] == expect_counts
    seen = layer_visual(tokens, layers, params)
    assert sum(seen) / layers == expect_mean
    arrcoc.create("compressor", "pyramiddrop", **params)  # valid params
    # no other ratio with these layers comes nearer the target (the means are whole-token steps)
    grid = [i / 4096 for i in range(1, 4097)]
    best = min(abs(sum(layer_visual(tokens, layers, {"layers": expect_layers, "ratio": r})) / layers - target)
               for r in grid)
    assert abs(expect_mean - target) <= best + 1e-12


def test_budget_rule_is_byte_deterministic():
    params = P.PyramidDrop.budget_params({"positions": "compact"}, 128.0, context(256, 3))
    assert repr(params) == "{'positions': 'compact', 'layers': [1, 2], 'ratio': 0.3671875}"
    assert repr(P.PyramidDrop.budget_params({}, 192.0, context(576, 32))) == (
        "{'layers': [4, 8, 12], 'ratio': 0.5484036971034494}")


def test_budget_rule_keeps_the_pyramid():
    """Every 32-layer budget from the official mean down to 64 keeps a pyramid (ratio >= 0.4: no stage
    collapses to a handful of tokens, as lowering the ratio at the official spacing would do at 128)."""
    for target in range(64, 271, 2):
        params = P.PyramidDrop.budget_params({}, float(target), context(576, 32))
        assert params["ratio"] >= 0.4, (target, params)
        assert params["layers"] == [params["layers"][0] * s for s in (1, 2, 3)]


@pytest.mark.parametrize("tokens, layers, base", [(576, 32, {}), (576, 32, {"ratio": 0.3}), (2880, 40, {})])
def test_budget_rule_is_monotone_and_never_farther_than_a_pyramid_at_the_pipeline_ratio(tokens, layers, base):
    """Just below the mean of spacing K at the pipeline's ratio (m_K) the rule moves to K - 1 and raises the ratio,
    whose whole-token steps can land farther from the target than m_K itself: it then keeps K at the pipeline's
    ratio.  So the mean never decreases as the target grows, and no evenly spaced pyramid at the pipeline's ratio
    comes nearer the target."""
    ctx = context(tokens, layers)
    ratio = P.PyramidDrop.validate_params(base).ratio
    first = max(P.PyramidDrop._spacings(base, ctx))
    pyramid = {K: P.PyramidDrop._mean(tokens, layers, P.PyramidDrop.budget_layers(K, 3, layers), ratio)
               for K in range(1, first + 1)}
    low, _ = P.PyramidDrop.budget_bounds(base, ctx)
    targets = sorted({t for m in pyramid.values() for t in (m + j / 97 for j in range(-60, 8)) if t >= low})
    previous = -math.inf
    for target in targets:
        params = P.PyramidDrop.budget_params(base, target, ctx)
        mean = sum(layer_visual(tokens, layers, params)) / layers
        assert mean >= previous, (target, params)
        assert all(abs(mean - target) <= abs(m - target) + 1e-12 for m in pyramid.values()), (target, params, mean)
        previous = mean
    # 146.2225 on 32 layers: [3, 6, 9] at 0.5 has mean 146.25; [2, 4, 6] raised to the target gave 146.5625
    params = P.PyramidDrop.budget_params({}, 146.2225390625, context(576, 32))
    assert params == {"layers": [3, 6, 9], "ratio": 0.5}


def test_budget_bounds_and_out_of_reach():
    assert P.PyramidDrop.budget_bounds({}, context(256, 3)) == (86.0, 256.0)  # (256 + 1 + 1) / 3
    assert P.PyramidDrop.budget_bounds({}, context(576, 32)) == ((576 + 31 * 1) / 32, 576.0)  # K = 1
    with pytest.raises(BudgetError, match=r"mean of 64.0 .* 3 layers from 256 is out of reach: the fewest is 86.0"):
        P.PyramidDrop.budget_params({}, 64.0, context(256, 3))
    with pytest.raises(BudgetError, match="an LLM of 1 layer"):
        P.PyramidDrop.budget_bounds({}, context(256, 1))


def test_plan_budget_on_the_toyvqa_shape():
    """`arrcoc eval`'s planner on the shipped pipeline at the ToyVQA shape (256 tokens, 3 layers)."""
    spec = arrcoc.resolve_spec("pyramiddrop")
    plan = plan_budget(spec, 0.5, original=256, grid=(16, 16), layers=3)
    assert plan.spec.llm[0].params["layers"] == [1, 2] and plan.spec.llm[0].params["ratio"] == 0.3671875
    with pytest.raises(BudgetError, match=r"budget 0.25 .* out of reach .* fewest it can hand on is about 86.0"):
        plan_budget(spec, 0.25, original=256, grid=(16, 16), layers=3)
