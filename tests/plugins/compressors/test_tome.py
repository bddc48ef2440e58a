"""ToMe against a reference written here from the official facebookresearch/ToMe.

The reference follows ``tome/merge.py`` (``bipartite_soft_matching``,
``merge_wavg``, ``merge_source``), ``tome/utils.py`` (``parse_r``) and
``tome/patch/timm.py`` (``ToMeBlock`` / ``ToMeAttention``: merge between
attention and MLP, metric = head-mean keys, proportional attention) as they
are described in their docstrings and in docs/METHODS.md; it works on the
full sequence ``[cls?, patches]`` exactly like the official code, and
arrcoc's output is compared with it token for token.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import ArrcocWarning, BudgetError, MissingInputError, ParamsError, collect_warnings
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.tome import parse_r, tome_merge


# ---------------------------------------------------------------- reference
def ref_bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool):
    """``tome.merge.bipartite_soft_matching`` on a full sequence ``[B, t, C]``.

    Returns ``merge(x, mode)`` -> ``cat([unmerged A, all B])`` (identity when
    nothing merges) and the clamped ``r``.
    """
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)  # at most 50% of the unprotected tokens
    if r <= 0:
        return (lambda x, mode="sum": x), r
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf  # the class token never merges
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]  # keeps the class token first

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, ta, c = src.shape
        unm = src.gather(-2, unm_idx.expand(n, ta - r, c))
        src = src.gather(-2, src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)  # include_self=True
        return torch.cat([unm, dst], dim=1)

    return merge, r


def ref_parse_r(num_layers: int, r, inflect: float = 0.0) -> list[int]:
    """``tome.utils.parse_r``: int, ``(r, inflection)`` or a list padded with zeros."""
    if isinstance(r, list):
        return r + [0] * (num_layers - len(r))
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


def groups(source: torch.Tensor) -> set[frozenset[int]]:
    """Merged groups (more than one patch) of a source matrix ``[T, N0]``."""
    return {frozenset(torch.nonzero(row).flatten().tolist()) for row in source if row.sum() > 1}


def groups_from_origin(origin: torch.Tensor) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for p, o in enumerate(origin.tolist()):
        if o >= 0:
            out.setdefault(o, set()).add(p)
    return {frozenset(g) for g in out.values() if len(g) > 1}


# ---------------------------------------------------------------- fixtures
def make(grid, class_token: bool, seed: int = 0, B: int = 2):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    tokens = torch.randn(B, n, 16, generator=g)
    keys = torch.randn(B, n, 8, generator=g)
    cls = torch.randn(B, 16, generator=g) if class_token else None
    state = TokenState.from_patches(tokens, grid, cls_token=cls, per_token={"keys": keys})
    return state, tokens, keys, cls


def run_reference(state, tokens, keys, cls, rounds, metric="keys", size_weighted=True):
    """Successive ToMe rounds in the official layout ``[cls, patches]`` (or just patches).

    Returns the merged sequence, sizes ``[B, T]``, the source matrix over the
    patches ``[B, T, N0]`` and the size-weighted positions.  A ``keys`` metric
    is merged like the tokens (arrcoc averages per_token fields the same way).
    """
    B, n, _ = tokens.shape
    P = 1 if cls is not None else 0
    x = torch.cat([cls[:, None], tokens], 1) if P else tokens
    m = keys
    if P:  # the class token's metric row is never compared (its scores are -inf, it is in A)
        m = torch.cat([torch.randn(B, 1, m.shape[-1], generator=torch.Generator().manual_seed(9)), m], 1)
    size = torch.ones(B, n + P, 1)
    source = torch.eye(n + P)[None].expand(B, n + P, n + P)
    pos = torch.cat([torch.zeros(B, P, 2), state.positions], 1)

    def average(merge, v):
        return merge(v * size, "sum") / merge(size, "sum") if size_weighted else merge(v, "mean")

    for r in rounds:
        merge, _ = ref_bipartite_soft_matching(x if metric == "tokens" else m, r, bool(P))
        x, m = average(merge, x), average(merge, m)
        pos = merge(pos * size, "sum") / merge(size, "sum")  # always size-weighted centroids
        size, source = merge(size, "sum"), merge(source, "amax")  # merge_wavg sizes, merge_source
    return x, size[..., 0], source[:, :, P:], pos


def tome(**params):
    return arrcoc.create("compressor", "tome", **params)


# ------------------------------------------------------ one or more rounds
@pytest.mark.parametrize("grid", [(5, 5), (4, 4), (3, 5)])
@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("metric", ["keys", "tokens"])
def test_tome_equals_official_merge(grid, class_token, metric):
    state, tokens, keys, cls = make(grid, class_token, seed=grid[1] + 3 * class_token)
    rounds = [5, 3]  # two successive rounds: sizes differ from 1 in the second, order matters
    out = tome(r=rounds, metric=metric)(state).check()
    x, size, source, pos = run_reference(state, tokens, keys, cls, rounds, metric=metric)
    P = 1 if class_token else 0
    n = grid[0] * grid[1]
    assert out.counts.tolist() == [n - sum(rounds)] * 2
    # same layout as the official output, token for token: [unmerged A, all B]
    torch.testing.assert_close(out.tokens, x[:, P:])
    torch.testing.assert_close(out.size, size[:, P:])
    torch.testing.assert_close(out.positions, pos[:, P:])
    if class_token:
        torch.testing.assert_close(out.cls, x[:, 0])
        assert torch.equal(size[:, 0], torch.ones(2))  # the class token never merged
    for b in range(2):
        assert groups_from_origin(out.origin[b]) == groups(source[b, P:])
        # origin: each patch lives in the token whose source row contains it
        assert torch.equal(out.origin[b], source[b, P:].argmax(0))


@pytest.mark.parametrize("class_token", [True, False])
def test_tome_spatial_order_is_the_same_tokens_in_original_order(class_token):
    state, tokens, keys, cls = make((5, 5), class_token, seed=4)
    out = tome(r=6, order="spatial")(state).check()
    x, size, source, pos = run_reference(state, tokens, keys, cls, [6])
    P = 1 if class_token else 0
    for b in range(2):
        # each surviving token is the group's B token (its one patch of B parity): sort by that patch
        b_parity = (torch.arange(25) % 2) == (0 if class_token else 1)
        kept_patch = torch.where(source[b, P:].sum(1) > 1, (source[b, P:] * b_parity).argmax(1), source[b, P:].argmax(1))
        order = torch.sort(kept_patch).indices
        torch.testing.assert_close(out.tokens[b], x[b, P:][order])
        torch.testing.assert_close(out.size[b], size[b, P:][order])
        torch.testing.assert_close(out.positions[b], pos[b, P:][order])
        assert groups_from_origin(out.origin[b]) == groups(source[b, P:])
    # one step: the same tokens as the official layout, permuted
    official = tome(r=6)(state)
    assert not torch.equal(out.tokens, official.tokens)
    torch.testing.assert_close(out.tokens.sort(1).values, official.tokens.sort(1).values)


def test_tome_size_weighted_false_is_a_plain_mean():
    state, tokens, keys, cls = make((4, 5), True, seed=5)
    rounds = [6, 4]
    out = tome(r=rounds, metric="tokens", size_weighted=False)(state).check()
    x, size, source, _ = run_reference(state, tokens, keys, cls, rounds, metric="tokens", size_weighted=False)
    torch.testing.assert_close(out.tokens, x[:, 1:])
    torch.testing.assert_close(out.size, size[:, 1:])  # sizes still add up
    weighted = tome(r=rounds, metric="tokens")(state)
    assert not torch.allclose(weighted.tokens, out.tokens)  # the second round's weights differ


def test_tome_r_is_clamped_to_half_and_warns():
    state, tokens, keys, cls = make((3, 5), True, seed=6)
    with collect_warnings() as notes, pytest.warns(ArrcocWarning, match=r"tome: r=20 clamped to \[7\]"):
        out = tome(r=20)(state).check()
    assert len(notes) == 1 and "clamped" in notes[0]
    assert out.counts.tolist() == [15 - 7] * 2
    x, size, _, _ = run_reference(state, tokens, keys, cls, [20])
    torch.testing.assert_close(out.tokens, x[:, 1:])
    # no warning when nothing is clamped
    with collect_warnings() as notes:
        tome(r=7)(state)
    assert notes == []


def test_tome_ragged_batch_equals_per_image_runs():
    state, *_ = make((5, 5), True, seed=7, B=3)
    counts = [25, 16, 7]
    K = 25
    index = torch.arange(K).expand(3, K).contiguous()
    valid = index < torch.tensor(counts)[:, None]
    rag = ops.keep(state, index.masked_fill(~valid, 0), valid)
    with collect_warnings():
        with pytest.warns(ArrcocWarning):
            out = tome(r=[5, 4])(rag).check()
    assert out.counts.tolist() == [25 - 9, 16 - 9, 7 - 3 - 2]
    for b, n in enumerate(counts):
        one = ops.keep(state, torch.arange(n).expand(3, n).contiguous())
        one = TokenState(tokens=one.tokens[b:b + 1], mask=one.mask[b:b + 1], size=one.size[b:b + 1],
                         positions=one.positions[b:b + 1], origin=one.origin[b:b + 1], grid=one.grid,
                         cls=one.cls[b:b + 1], per_token={"keys": one.per_token["keys"][b:b + 1]})
        with collect_warnings() as notes, warnings.catch_warnings():
            warnings.simplefilter("ignore", ArrcocWarning)
            single = tome(r=[5, 4])(one)
        assert bool(notes) == (n == 7)  # only the 7-token image is clamped (r=4 > 4 // 2)
        c = single.N
        torch.testing.assert_close(out.tokens[b, :c], single.tokens[0])
        assert torch.equal(out.size[b, :c], single.size[0]) and torch.equal(out.origin[b], single.origin[0])


def test_tome_merge_function_returns_r_used_and_keeps_order_of_untouched_images():
    state, *_ = make((4, 4), False, seed=8)
    out, r_used = tome_merge(state, 3, metric=state.tokens, class_token=False)
    assert r_used.tolist() == [3, 3] and out.counts.tolist() == [13, 13]
    with pytest.raises(BudgetError, match=r"tome_merge: r must be >= 0, got \[-1, -1\]"):
        tome_merge(state, -1, metric=state.tokens, class_token=False)
    with pytest.raises(ParamsError, match=r"tome_merge: order must be 'official' or 'spatial', got 'raster'"):
        tome_merge(state, 1, metric=state.tokens, class_token=False, order="raster")
    same, r0 = tome_merge(state, 0, metric=state.tokens, class_token=False)
    assert r0.tolist() == [0, 0] and same is state  # official do_nothing: order unchanged
    # in a ragged batch an image with nothing to merge keeps its tokens and order
    small = ops.keep(state, torch.tensor([[0, 1, 2, 3, 4, 5], [9, 4, 0, 0, 0, 0]]),
                     torch.tensor([[True] * 6, [True, True, False, False, False, False]]))
    out, r_used = tome_merge(small, 2, metric=small.tokens, class_token=True)
    assert r_used.tolist() == [2, 1] and out.counts.tolist() == [4, 1]
    small = ops.keep(state, torch.tensor([[0, 1, 2, 3, 4, 5], [9, 0, 0, 0, 0, 0]]),
                     torch.tensor([[True] * 6, [True, False, False, False, False, False]]))
    out, r_used = tome_merge(small, 2, metric=small.tokens, class_token=False)
    assert r_used.tolist() == [2, 0] and out.counts.tolist() == [4, 1]
    assert torch.equal(out.tokens[1, 0], state.tokens[1, 9]) and out.origin[1, 9] == 0


def test_tome_metric_keys_vs_tokens_and_missing_keys():
    state, tokens, keys, cls = make((5, 5), True, seed=10)
    by_keys, by_tokens = tome(r=8)(state), tome(r=8, metric="tokens")(state)
    assert groups_from_origin(by_keys.origin[0]) != groups_from_origin(by_tokens.origin[0])
    assert tome(r=8).requirements() == frozenset({"keys"}) and tome(r=8, metric="tokens").requirements() == frozenset()
    bare = TokenState.from_patches(tokens, (5, 5), cls_token=cls)
    with pytest.raises(MissingInputError, match=r"tome: metric 'keys' needs per_token\['keys'\].*metric: tokens"):
        tome(r=8)(bare)
    # inside an encoder block the block's own keys win over the exposed ones
    inside = state.with_per_token(block_keys=tokens)
    assert torch.equal(tome(r=8).in_block(inside, 0, 1).tokens, tome(r=8, metric="tokens")(state).tokens)


# ------------------------------------------------------------------ parse_r
def test_parse_r_schedules_by_hand():
    assert parse_r(12, 8) == [8] * 12
    assert parse_r(5, [3, 2]) == [3, 2, 0, 0, 0]
    # decreasing (paper): min = int(8 * 2) = 16, max = 0, step -16/11
    assert parse_r(12, 8, -1.0) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    # increasing: min 0, max 16
    assert parse_r(12, 8, 1.0) == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]
    # r = 13, inflection 0.5: min = int(6.5) = 6, max = 20, step 14/11
    assert parse_r(12, 13, 0.5) == [6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 20]
    for args in [(12, 8, 0.0), (12, 8, -1.0), (24, 7, -0.3), (4, [5]), (4, [1, 2, 3, 4])]:
        assert parse_r(*args) == ref_parse_r(*args)


def test_tome_params_are_validated():
    with pytest.raises(ParamsError, match=r"r must be >= 0"):
        tome(r=-1)
    with pytest.raises(ParamsError, match=r"r must be >= 0"):
        tome(r=[2, -3])
    with pytest.raises(ParamsError, match=r"inflection applies to an int r, not a per-layer list"):
        tome(r=[2, 3], inflection=-1.0)
    with pytest.raises(ParamsError, match=r"metric"):
        tome(metric="values")
    with pytest.raises(ParamsError, match=r"order"):
        tome(order="random")


# ------------------------------------------------------------- inside a ViT
def ref_tome_vit(model, pixels: torch.Tensor, r, inflect: float = 0.0, prop_attn: bool = True):
    """A timm ViT with ToMe patched in as ``tome.patch.timm`` does, using the model's own modules."""
    class_token = model.cls_token is not None
    rs = ref_parse_r(len(model.blocks), r, inflect)
    x = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    size = None
    for blk in model.blocks:
        attn, h = blk.attn, blk.norm1(x)
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]  # proportional attention
        out = attn.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))
        x = x + out
        r_layer = rs.pop(0)
        if r_layer > 0:
            merge, _ = ref_bipartite_soft_matching(k.mean(1), r_layer, class_token)
            if size is None:
                size = torch.ones_like(x[..., 0, None])
            x = merge(x * size, "sum") / merge(size, "sum")
            size = merge(size, "sum")
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x), size[..., 0]


@pytest.mark.parametrize(
    "model_kwargs, tome_params",
    [
        ({"depth": 4}, {"r": 10}),
        ({"depth": 4, "class_token": False, "global_pool": "avg"}, {"r": 10}),
        ({"depth": 4}, {"r": 13, "inflection": -1.0}),
    ],
)
def test_tome_in_blocks_equals_official_patched_vit(model_kwargs, tome_params):
    encoder = arrcoc.create("encoder", "timm_vit", model="vit_tiny_patch16_224", model_kwargs=model_kwargs,
                            layer=-1, norm=True, in_blocks={"use": "tome", **tome_params})
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = encoder.encode(pixels).check()
        ref, size = ref_tome_vit(encoder.model, pixels, tome_params["r"], tome_params.get("inflection", 0.0))
    P = encoder.prefix
    schedule = ref_parse_r(4, tome_params["r"], tome_params.get("inflection", 0.0))
    assert state.counts.tolist() == [196 - sum(schedule)] * 2
    assert state.tokens.shape[1] + P == ref.shape[1]
    torch.testing.assert_close(state.tokens, ref[:, P:], atol=1e-4, rtol=1e-4)
    assert torch.equal(state.size, size[:, P:])
    assert state.size.sum(1).tolist() == [196.0, 196.0]
    if P:
        torch.testing.assert_close(state.cls, ref[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tome_in_blocks_low_precision(dtype):
    encoder = arrcoc.create("encoder", "timm_vit", model="vit_tiny_patch16_224", layer=-1, dtype=dtype,
                            model_kwargs={"depth": 3, "img_size": 64}, in_blocks={"use": "tome", "r": 3})
    with torch.no_grad():
        state = encoder.encode(encoder.preprocess(torch.rand(2, 3, 64, 64))).check()
    assert state.tokens.dtype == getattr(torch, dtype) and state.counts.tolist() == [16 - 9] * 2
    assert state.size.dtype == torch.float32 and state.size.sum(1).tolist() == [16.0, 16.0]


def test_tome_pipeline_trace_197_to_101():
    spec = {
        "name": "tome_small",
        "encoder": {"use": "timm_vit", "model": "vit_tiny_patch16_224", "layer": -1, "norm": True,
                    "model_kwargs": {"depth": 12, "embed_dim": 64, "num_heads": 2},
                    "in_blocks": {"use": "tome", "r": 8}},
    }
    state = arrcoc.run_pipeline(spec, torch.rand(1, 3, 224, 224), device="cpu")
    (record,) = state.trace
    assert record.stage == "encoder" and record.tokens_in == (197,) and record.tokens_out == (197 - 8 * 12,)
    assert state.token_counts() == (101,)
    assert state.size.sum().item() == 196.0
    state.check()
