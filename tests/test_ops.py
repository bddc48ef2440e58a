"""arrcoc.ops: the only code that moves tokens.

Each op is compared with a plain per-image reference written here (Python
loops over tokens: slow and obviously right), and checked for the
invariants every stage relies on: sizes conserved, origin consistent
(``state.check()``), ragged batches equal per-image runs, dtype kept.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from arrcoc import ops
from arrcoc.errors import BudgetError, StateError
from arrcoc.state import TokenState

H, W, D = 3, 5, 6
N = H * W


@pytest.fixture
def value_checks():
    """Turn on the ops' checks of argument values (issue 17: each is a device sync, so they run only under
    ``ops.checking()``; the pipeline checks each stage's output instead).  Tests of the errors those checks
    raise use it; what they assert is unchanged."""
    with ops.checking():
        yield


def make_state(B: int = 2, seed: int = 0, cls: bool = True, dtype=torch.float32) -> TokenState:
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_patches(
        torch.randn(B, N, D, generator=g).to(dtype), (H, W),
        cls_token=torch.randn(B, D, generator=g).to(dtype) if cls else None,
        per_token={
            "feat": torch.randn(B, N, 3, 2, generator=g).to(dtype),     # trailing dims
            "ids": torch.arange(N).mul(10).expand(B, N).contiguous(),  # integer field
            "score": torch.rand(B, N, generator=g).to(dtype),
        },
    )


def ragged(state: TokenState, counts: list[int]) -> TokenState:
    """The first ``counts[b]`` tokens of each row (a packed ragged state)."""
    K = max(counts)
    index = torch.arange(K).expand(state.B, K).contiguous()
    valid = index < torch.tensor(counts)[:, None]
    return ops.keep(state, index.masked_fill(~valid, 0), valid)


# --------------------------------------------------------------- references
def ref_keep(state: TokenState, rows: list[list[int]]) -> dict[str, list]:
    """Per image: the kept rows in the given order, and the new origin."""
    out = {"tokens": [], "size": [], "positions": [], "feat": [], "ids": [], "origin": []}
    for b, idx in enumerate(rows):
        out["tokens"].append(torch.stack([state.tokens[b, i] for i in idx]))
        out["size"].append(torch.stack([state.size[b, i] for i in idx]))
        out["positions"].append(torch.stack([state.positions[b, i] for i in idx]))
        out["feat"].append(torch.stack([state.per_token["feat"][b, i] for i in idx]))
        out["ids"].append(torch.stack([state.per_token["ids"][b, i] for i in idx]))
        slot = {old: new for new, old in enumerate(idx)}
        out["origin"].append(torch.tensor([slot.get(int(o), -1) if o >= 0 else -1 for o in state.origin[b]]))
    return out


def ref_merge(state: TokenState, pairs: list[list[tuple[int, int]]], weights=None) -> dict[str, list]:
    """Per image: each destination's group = itself + its sources; weighted means, summed sizes."""
    w_all = state.size if weights is None else weights
    out = {"tokens": [], "size": [], "positions": [], "score": [], "origin": []}
    for b, row in enumerate(pairs):
        n = int(state.counts[b])
        into = {s: d for s, d in row}
        survivors = [i for i in range(n) if i not in into]
        slot = {i: k for k, i in enumerate(survivors)}
        tok, size, pos, score = [], [], [], []
        for d in survivors:
            group = [d] + [s for s, t in row if t == d]
            w = torch.stack([w_all[b, i].double() for i in group])
            s = torch.stack([state.size[b, i].double() for i in group])
            tok.append(sum(w[j] * state.tokens[b, i].double() for j, i in enumerate(group)) / w.sum())
            score.append(sum(w[j] * state.per_token["score"][b, i].double() for j, i in enumerate(group)) / w.sum())
            pos.append(sum(s[j] * state.positions[b, i].double() for j, i in enumerate(group)) / s.sum())
            size.append(s.sum())
        out["tokens"].append(torch.stack(tok))
        out["score"].append(torch.stack(score))
        out["positions"].append(torch.stack(pos))
        out["size"].append(torch.stack(size))
        origin = []
        for o in state.origin[b].tolist():
            origin.append(-1 if o < 0 else slot[into.get(o, o)])
        out["origin"].append(torch.tensor(origin))
    return out


def ref_bipartite(metric: torch.Tensor, r: int, class_token: bool) -> list[tuple[int, int]]:
    """ToMe's matching for one image, by hand (paper Sec. 3 / tome.merge.bipartite_soft_matching).

    In the sequence ``[cls?, t_0, t_1, ...]`` the even positions form set A and
    the odd ones set B; with a class token, ``t_j`` sits at position ``j + 1``
    and the class token (first of A) never merges.  Each A token's edge goes to
    its most similar B token (cosine); the ``r`` best edges merge, ties to the
    lower index.
    """
    n = metric.shape[0]
    shift = 1 if class_token else 0
    A = [j for j in range(n) if (j + shift) % 2 == 0]
    Bset = [j for j in range(n) if (j + shift) % 2 == 1]
    r = min(r, n // 2)
    unit = [metric[j].double() / metric[j].double().norm() for j in range(n)]
    edges = []
    for a in A:
        sims = [float(unit[a] @ unit[b]) for b in Bset]
        best = max(range(len(Bset)), key=lambda i: (sims[i], -i))
        edges.append((sims[best], a, Bset[best]))
    edges.sort(key=lambda e: -e[0])  # Python's sort is stable: ties keep A order
    return [(a, b) for _, a, b in edges[:r]]


def rows_of(index: torch.Tensor, valid: torch.Tensor) -> list[list[int]]:
    return [[int(i) for i, v in zip(idx, ok) if v] for idx, ok in zip(index, valid)]


# ----------------------------------------------------------------------- keep
def test_keep_gathers_every_field_in_the_given_order():
    state = make_state()
    rows = [[4, 0, 9, 14], [3, 2, 1, 13]]
    out = ops.keep(state, torch.tensor(rows)).check()
    ref = ref_keep(state, rows)
    for b in range(2):
        assert torch.equal(out.tokens[b], ref["tokens"][b])
        assert torch.equal(out.size[b], ref["size"][b])
        assert torch.equal(out.positions[b], ref["positions"][b])
        assert torch.equal(out.per_token["feat"][b], ref["feat"][b])
        assert torch.equal(out.per_token["ids"][b], ref["ids"][b])
        assert torch.equal(out.origin[b], ref["origin"][b])
    assert torch.equal(out.cls, state.cls) and out.mask.all()
    # dropped patches get -1, kept patches point at their new slot
    assert out.origin[0, 4] == 0 and out.origin[0, 0] == 1 and out.origin[0, 14] == 3 and out.origin[0, 1] == -1
    assert int((out.origin >= 0).sum()) == 8


def test_keep_ragged_packs_real_entries_first_in_caller_order():
    state = make_state()
    index = torch.tensor([[7, 2, 11, 5], [8, 1, 6, 0]])
    valid = torch.tensor([[False, True, False, True], [True, True, True, False]])
    out = ops.keep(state, index, valid).check()
    assert out.N == 3  # trimmed to the longest row
    assert out.mask.tolist() == [[True, True, False], [True, True, True]]
    ref = ref_keep(state, [[2, 5], [8, 1, 6]])
    for b, n in enumerate([2, 3]):
        assert torch.equal(out.tokens[b, :n], ref["tokens"][b])
        assert torch.equal(out.per_token["feat"][b, :n], ref["feat"][b])
        assert torch.equal(out.origin[b], ref["origin"][b])
    assert (out.tokens[0, 2] == 0).all() and out.size[0, 2] == 0  # padding is zero


def test_keep_composes_origin_through_two_steps():
    state = make_state()
    first = ops.keep(state, torch.tensor([[10, 3, 7, 1], [0, 1, 2, 3]]))
    second = ops.keep(first, torch.tensor([[2, 0], [3, 1]])).check()
    # image 0: patch 7 -> slot 2 -> slot 0; patch 10 -> slot 0 -> slot 1; patch 3, 1 dropped
    expected = torch.full((N,), -1)
    expected[7], expected[10] = 0, 1
    assert torch.equal(second.origin[0], expected)
    assert torch.equal(second.tokens[0], state.tokens[0, [7, 10]])


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
@pytest.mark.parametrize(
    "index, valid, match",
    [
        (torch.tensor([[1, 2, 1], [0, 1, 2]]), None, r"keep: an index appears more than once in a row"),
        (torch.tensor([[1, 2, 15], [0, 1, 2]]), None, r"keep: indices must lie in \[0, 15\)"),
        (torch.tensor([[1, 2, -1], [0, 1, 2]]), None, r"keep: indices must lie in \[0, 15\)"),
        (torch.tensor([[1, 2, 3], [0, 1, 2]], dtype=torch.int32), None, r"keep: expected an int64 index \[B=2, K\], got shape \[2, 3\] dtype torch\.int32"),
        (torch.tensor([1, 2, 3]), None, r"keep: expected an int64 index \[B=2, K\], got shape \[3\]"),
        (torch.tensor([[1, 2], [0, 1]]), torch.ones(2, 3, dtype=torch.bool), r"keep: valid must be a bool tensor of shape \[2, 2\]"),
    ],
)
def test_keep_bad_index_is_a_state_error(index, valid, match):
    with pytest.raises(StateError, match=match):
        ops.keep(make_state(), index, valid)


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
def test_keep_index_on_padding_is_an_error_but_invalid_entries_are_ignored():
    state = ragged(make_state(), [15, 6])
    with pytest.raises(StateError, match=r"keep: an index points at a padded \(masked\) token slot"):
        ops.keep(state, torch.tensor([[0, 1], [0, 9]]))
    # the same out-of-row index marked invalid, even out of range or duplicated, is ignored
    out = ops.keep(state, torch.tensor([[0, 1], [0, 99]]), torch.tensor([[True, True], [True, False]])).check()
    assert out.counts.tolist() == [2, 1]
    out = ops.keep(state, torch.tensor([[0, 1], [0, 0]]), torch.tensor([[True, True], [True, False]]))
    assert out.counts.tolist() == [2, 1]


# ---------------------------------------------------------------------- merge
def merged_twice(state: TokenState):
    """A first merge makes sizes differ from 1, so the second one tests the weighting."""
    pairs1 = [[(1, 0), (2, 0), (6, 5)], [(14, 13), (3, 4), (8, 4)]]
    first = ops.merge(state, torch.tensor([[s for s, _ in p] for p in pairs1]),
                      torch.tensor([[d for _, d in p] for p in pairs1]))
    return first


def test_merge_matches_hand_computed_size_weighted_means():
    first = merged_twice(make_state())
    first.check()
    assert sorted(first.size[0].tolist()) == [1.0] * 10 + [2.0, 3.0]
    pairs = [[(0, 1), (4, 1), (7, 11)], [(1, 3), (0, 3), (5, 2)]]  # dst 1 of image 0 absorbs a size-3 token
    src = torch.tensor([[s for s, _ in p] for p in pairs])
    dst = torch.tensor([[d for _, d in p] for p in pairs])
    out = ops.merge(first, src, dst).check()
    ref = ref_merge(first, pairs)
    for b in range(2):
        torch.testing.assert_close(out.tokens[b], ref["tokens"][b].float())
        torch.testing.assert_close(out.per_token["score"][b], ref["score"][b].float())
        torch.testing.assert_close(out.positions[b], ref["positions"][b].float())
        torch.testing.assert_close(out.size[b], ref["size"][b].float())
        assert torch.equal(out.origin[b], ref["origin"][b])
    assert out.counts.tolist() == [9, 9]
    # total size conserved: every patch still stands in exactly one token
    assert out.size.sum(1).tolist() == [float(N), float(N)]
    assert torch.equal(out.cls, first.cls)


def test_merge_of_one_pair_by_hand():
    state = make_state(B=1)
    out = ops.merge(state, torch.tensor([[3]]), torch.tensor([[8]]))
    # survivors keep their original order: token 8 now sits in slot 7
    torch.testing.assert_close(out.tokens[0, 7], (state.tokens[0, 3] + state.tokens[0, 8]) / 2)
    assert out.size[0, 7] == 2.0
    torch.testing.assert_close(out.positions[0, 7], (state.positions[0, 3] + state.positions[0, 8]) / 2)
    assert out.origin[0, 3] == 7 and out.origin[0, 8] == 7 and out.origin[0, 9] == 8 and out.origin[0, 2] == 2
    assert torch.equal(out.tokens[0, :3], state.tokens[0, :3])
    assert torch.equal(out.per_token["ids"][0, 7], state.per_token["ids"][0, 8])  # integers: the destination's


def test_merge_weights_ones_is_a_plain_mean_positions_stay_size_weighted():
    first = merged_twice(make_state())
    pairs = [[(0, 1), (4, 1)], [(1, 3), (0, 3)]]
    src = torch.tensor([[s for s, _ in p] for p in pairs])
    dst = torch.tensor([[d for _, d in p] for p in pairs])
    ones = torch.ones_like(first.size)
    out = ops.merge(first, src, dst, weights=ones)
    ref = ref_merge(first, pairs, weights=ones)
    for b in range(2):
        torch.testing.assert_close(out.tokens[b], ref["tokens"][b].float())
        torch.testing.assert_close(out.positions[b], ref["positions"][b].float())  # still size-weighted
    # image 0, dst 1 (size 3 after the first merge) with sources 0 and 4: plain mean of three tokens
    torch.testing.assert_close(out.tokens[0, 0], (first.tokens[0, 0] + first.tokens[0, 1] + first.tokens[0, 4]) / 3)
    with pytest.raises(StateError, match=r"merge: weights must be \[B=2, N=12\], got \[2, 11\]"):
        ops.merge(first, src, dst, weights=ones[:, :-1])


def test_merge_reduce_sum_and_dst():
    state = make_state(B=1)
    src, dst = torch.tensor([[2, 4]]), torch.tensor([[6, 6]])
    out = ops.merge(state, src, dst, reduce={"score": "sum", "feat": "dst"})
    s = state.per_token["score"][0]
    torch.testing.assert_close(out.per_token["score"][0, 4], s[2] + s[4] + s[6])  # slot of token 6
    assert torch.equal(out.per_token["feat"][0, 4], state.per_token["feat"][0, 6])
    with pytest.raises(StateError, match=r"merge: reduce\['nope'\]='sum'; expected a per_token field"):
        ops.merge(state, src, dst, reduce={"nope": "sum"})
    with pytest.raises(StateError, match=r"merge: reduce\['score'\]='max'"):
        ops.merge(state, src, dst, reduce={"score": "max"})


def test_merge_ragged_equals_per_image_runs():
    state = ragged(make_state(B=3), [15, 9, 4])
    pairs = [[(0, 3), (5, 3), (10, 14)], [(8, 1), (2, 1)], [(3, 0)]]
    R = 3
    src = torch.tensor([[p[i][0] if i < len(p) else 0 for i in range(R)] for p in pairs])
    dst = torch.tensor([[p[i][1] if i < len(p) else 0 for i in range(R)] for p in pairs])
    valid = torch.tensor([[i < len(p) for i in range(R)] for p in pairs])
    out = ops.merge(state, src, dst, valid).check()
    assert out.counts.tolist() == [12, 7, 3]
    for b, n in enumerate([15, 9, 4]):
        alone = ragged(make_state(B=3), [n] * 3)
        one = TokenState(tokens=alone.tokens[b:b + 1, :n], mask=alone.mask[b:b + 1, :n], size=alone.size[b:b + 1, :n],
                         positions=alone.positions[b:b + 1, :n], origin=alone.origin[b:b + 1], grid=alone.grid)
        k = len(pairs[b])
        single = ops.merge(one, src[b:b + 1, :k], dst[b:b + 1, :k])
        c = single.N
        torch.testing.assert_close(out.tokens[b, :c], single.tokens[0])
        assert torch.equal(out.size[b, :c], single.size[0])
        assert torch.equal(out.origin[b], single.origin[0])
        assert (out.size[b, c:] == 0).all()
    assert out.size.sum(1).tolist() == [15.0, 9.0, 4.0]


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
@pytest.mark.parametrize(
    "src, dst, match",
    [
        ([[1, 3]], [[3, 5]], r"merge: a destination token is also a source \(chains are not allowed\)"),
        ([[1, 1]], [[3, 5]], r"merge: a source token appears more than once in a row"),
        ([[1, 2]], [[3, 15]], r"merge\(dst\): indices must lie in \[0, 15\)"),
        ([[-1, 2]], [[3, 4]], r"merge\(src\): indices must lie in \[0, 15\)"),
    ],
)
def test_merge_bad_pairs_are_state_errors(src, dst, match):
    with pytest.raises(StateError, match=match):
        ops.merge(make_state(B=1), torch.tensor(src), torch.tensor(dst))


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
def test_merge_into_padding_is_an_error():
    state = ragged(make_state(B=2), [15, 5])
    with pytest.raises(StateError, match=r"merge\(dst\): an index points at a padded"):
        ops.merge(state, torch.tensor([[0], [1]]), torch.tensor([[2], [7]]))


def test_many_sources_into_one_destination():
    state = make_state(B=1, cls=False)
    src = torch.tensor([[0, 1, 2, 3, 4, 5, 6]])
    dst = torch.full_like(src, 7)
    out = ops.merge(state, src, dst).check()
    torch.testing.assert_close(out.tokens[0, 0], state.tokens[0, :8].mean(0))
    assert out.size[0, 0] == 8.0 and (out.origin[0, :8] == 0).all()


# ------------------------------------------------------------ bipartite_match
@pytest.mark.parametrize("n", [15, 14, 7, 2])
@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("r", [1, 4, 100])
def test_bipartite_match_equals_plain_reference(n, class_token, r):
    g = torch.Generator().manual_seed(n * 7 + r + class_token)
    metric = torch.randn(2, n, 16, generator=g)
    matching, r_used = ops.bipartite_match(metric, r, class_token=class_token)
    assert r_used.tolist() == [min(r, n // 2)] * 2
    for b in range(2):
        ref = ref_bipartite(metric[b], r, class_token)
        got = [(int(s), int(d)) for s, d, v in zip(matching.src[b], matching.dst[b], matching.valid[b]) if v]
        assert got == ref


def test_bipartite_match_class_token_shifts_the_parity():
    metric = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(0))
    plain, _ = ops.bipartite_match(metric, 5)
    shifted, _ = ops.bipartite_match(metric, 5, class_token=True)
    assert set(plain.src[0].tolist()) == {0, 2, 4, 6, 8} and set(plain.dst[0].tolist()) <= {1, 3, 5, 7, 9}
    assert set(shifted.src[0].tolist()) == {1, 3, 5, 7, 9} and set(shifted.dst[0].tolist()) <= {0, 2, 4, 6, 8}


def test_bipartite_match_ragged_equals_per_image_runs():
    g = torch.Generator().manual_seed(3)
    counts = [15, 11, 6, 1]
    metric = torch.randn(4, 15, 8, generator=g)
    mask = torch.arange(15)[None, :] < torch.tensor(counts)[:, None]
    for class_token in (False, True):
        matching, r_used = ops.bipartite_match(metric, 5, mask, class_token=class_token)
        assert r_used.tolist() == [5, 5, 3, 0]
        for b, n in enumerate(counts):
            single, r1 = ops.bipartite_match(metric[b:b + 1, :n], 5, class_token=class_token)
            k = int(r1)
            assert int(r_used[b]) == k
            assert torch.equal(matching.src[b, :k], single.src[0, :k])
            assert torch.equal(matching.dst[b, :k], single.dst[0, :k])
            assert not matching.valid[b, k:].any()
            assert (matching.src[b, :k] < n).all() and (matching.dst[b, :k] < n).all()


def test_bipartite_match_per_image_r_and_errors():
    metric = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(1))
    matching, r_used = ops.bipartite_match(metric, torch.tensor([2, 4]))
    assert r_used.tolist() == [2, 4] and matching.valid.sum(1).tolist() == [2, 4]
    with pytest.raises(BudgetError, match=r"bipartite_match: r must be >= 0, got \[-1, -1\]"):
        ops.bipartite_match(metric, -1)
    with pytest.raises(StateError, match=r"bipartite_match: expected metric \[B, N, C\], got shape \[10, 4\]"):
        ops.bipartite_match(metric[0], 2)


@pytest.mark.parametrize("class_token", [False, True])
def test_bipartite_match_with_nothing_to_merge_is_empty_and_merge_is_identity(class_token):
    state = make_state(B=2)
    one = ops.keep(state, torch.tensor([[4], [2]]))  # a single token: one of the two sets is empty
    matching, r_used = ops.bipartite_match(one.tokens, 3, one.mask, class_token=class_token)
    assert r_used.tolist() == [0, 0] and matching.src.shape == (2, 0) and matching.valid.dtype == torch.bool
    out = ops.merge(one, matching.src, matching.dst, matching.valid).check()
    assert torch.equal(out.tokens, one.tokens) and torch.equal(out.origin, one.origin)
    matching, r_used = ops.bipartite_match(state.tokens, 0)
    assert r_used.tolist() == [0, 0] and matching.src.shape == (2, 0)


def test_bipartite_match_then_merge_keeps_state_consistent():
    state = ragged(make_state(B=2), [15, 8])
    matching, r_used = ops.bipartite_match(state.tokens, 6, state.mask, class_token=True)
    out = ops.merge(state, matching.src, matching.dst, matching.valid).check()
    assert out.counts.tolist() == [15 - 6, 8 - 4]
    assert out.size.sum(1).tolist() == [15.0, 8.0]


# --------------------------------------------------------------- topk_per_row
def test_topk_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    index, valid = ops.topk_per_row(scores, 2)
    assert index.tolist() == [[1, 2]] and valid.all()
    index, _ = ops.topk_per_row(scores, 4)
    assert index.tolist() == [[1, 2, 4, 3]]


def test_topk_masked_entries_are_never_selected():
    scores = torch.tensor([[9.0, 1.0, 8.0, 2.0], [float("-inf"), float("-inf"), 5.0, float("-inf")]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, True]])  # also non-prefix masks
    index, valid = ops.topk_per_row(scores, 3, mask)
    assert index.tolist() == [[2, 3, 1], [2, 1, 3]] and valid.all()


def test_topk_ragged_k_and_position_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3], [0.4, 0.2, 0.8, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    index, valid = ops.topk_per_row(scores, torch.tensor([3, 2]), mask)
    assert index[0].tolist() == [1, 3, 2] and index[1, :2].tolist() == [2, 0]
    assert valid.tolist() == [[True] * 3, [True, True, False]]
    index, valid = ops.topk_per_row(scores, torch.tensor([3, 2]), mask, order="position")
    assert index[0].tolist() == [1, 2, 3] and index[1, :2].tolist() == [0, 2]
    assert valid.tolist() == [[True] * 3, [True, True, False]]


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
def test_topk_errors():
    scores = torch.tensor([[0.1, float("nan"), 0.3]])
    with pytest.raises(StateError, match=r"topk_per_row: scores contain NaN"):
        ops.topk_per_row(scores, 1)
    # NaN in a masked slot is not looked at
    index, _ = ops.topk_per_row(scores, 1, torch.tensor([[True, False, True]]))
    assert index.tolist() == [[2]]
    with pytest.raises(BudgetError, match=r"topk_per_row: asked for \[3\] tokens, rows have \[2\]"):
        ops.topk_per_row(torch.zeros(1, 3), 3, torch.tensor([[True, True, False]]))
    with pytest.raises(StateError, match=r"order must be 'score' or 'position', got 'random'"):
        ops.topk_per_row(torch.zeros(1, 3), 1, order="random")
    with pytest.raises(StateError, match=r"expected scores \[B, N\], got shape \[3\]"):
        ops.topk_per_row(torch.zeros(3), 1)


def test_keep_topk_keeps_highest_in_original_order():
    state = ragged(make_state(B=2), [15, 6])
    scores = state.per_token["score"]
    out = ops.keep_topk(state, scores, torch.tensor([4, 3])).check()
    for b, n, k in [(0, 15, 4), (1, 6, 3)]:
        best = sorted(sorted(range(n), key=lambda i: -float(scores[b, i]))[:k])
        assert torch.equal(out.tokens[b, :k], state.tokens[b, best])


# ---------------------------------------------------------------- resolve_keep
def test_resolve_keep_ratio_floor_min_one_and_counts():
    counts = torch.tensor([10, 7, 1, 3])
    assert ops.resolve_keep(0.5, counts).tolist() == [5, 3, 1, 1]
    assert ops.resolve_keep(0.01, counts).tolist() == [1, 1, 1, 1]
    assert ops.resolve_keep(1.0, counts).tolist() == [10, 7, 1, 3]
    assert ops.resolve_keep(0.999, torch.tensor([576])).tolist() == [575]
    assert ops.resolve_keep(1, counts).tolist() == [1, 1, 1, 1]
    assert ops.resolve_keep(3, torch.tensor([3, 5])).tolist() == [3, 3]
    assert ops.resolve_keep(0.5, counts).dtype == torch.int64


def test_resolve_keep_a_row_without_tokens_keeps_none():
    """Inside an LLM a prompt without an image is a row of 0 visual tokens: it asks for nothing under either
    form, and the count is checked against the rows that have tokens only."""
    counts = torch.tensor([10, 0, 7])
    assert ops.resolve_keep(0.5, counts).tolist() == [5, 0, 3]
    assert ops.resolve_keep(6, counts).tolist() == [6, 0, 6]
    with pytest.raises(BudgetError, match="asked to keep 8 tokens, but an image has only 7"):
        ops.resolve_keep(8, counts)
    assert ops.resolve_keep(3, torch.tensor([0, 0])).tolist() == [0, 0]


@pytest.mark.parametrize(
    "keep, match",
    [
        (0.0, r"where: a ratio must lie in \(0, 1\], got 0\.0"),
        (1.5, r"where: a ratio must lie in \(0, 1\], got 1\.5"),
        (-0.2, r"a ratio must lie in \(0, 1\]"),
        (0, r"where: a count must be >= 1, got 0"),
        (-3, r"a count must be >= 1, got -3"),
        (True, r"where: expected a ratio in \(0, 1\] or a count >= 1, got True"),
        ("0.5", r"expected a ratio in \(0, 1\] or a count >= 1, got '0\.5'"),
        (11, r"where: asked to keep 11 tokens, but an image has only 7"),
    ],
)
def test_resolve_keep_invalid_budgets(keep, match):
    with pytest.raises(BudgetError, match=match):
        ops.resolve_keep(keep, torch.tensor([10, 7]), where="where")


# --------------------------------------------------------------------- unmerge
def test_unmerge_broadcasts_tokens_back_to_their_patches():
    state = make_state(B=2)
    merged = ops.merge(state, torch.tensor([[0, 2], [5, 7]]), torch.tensor([[1, 1], [6, 6]]))
    kept = ops.keep(merged, torch.tensor([[0, 4, 5], [3, 4, 5]]))  # image 0: slot 0 holds patches 0, 1, 2
    values, present = ops.unmerge(kept)
    assert values.shape == (2, N, D) and present.dtype == torch.bool
    for b in range(2):
        for p in range(N):
            o = int(kept.origin[b, p])
            if o < 0:
                assert not present[b, p] and (values[b, p] == 0).all()
            else:
                assert present[b, p] and torch.equal(values[b, p], kept.tokens[b, o])
    assert present[0, :3].all() and torch.equal(values[0, 0], values[0, 2])
    # any [B, N, ...] tensor: trailing dims too
    feat, _ = ops.unmerge(kept, kept.per_token["feat"])
    assert feat.shape == (2, N, 3, 2)
    with pytest.raises(StateError, match=r"unmerge: expected values \[B=2, N=3, \.\.\.\], got \[2, 4\]"):
        ops.unmerge(kept, torch.zeros(2, 4))


# ---------------------------------------------------------------------- cosine
def test_cosine_matches_pairwise_f_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    ref = F.cosine_similarity(a[:, :, None, :], b[:, None, :, :], dim=-1)
    torch.testing.assert_close(ops.cosine(a, b), ref)
    zero = ops.cosine(torch.zeros(1, 1, 7), b[:1])
    assert torch.isfinite(zero).all() and (zero == 0).all()


# --------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ops_keep_the_dtype_and_match_float32(dtype):
    low = make_state(B=2, dtype=dtype)
    high = low.to(dtype=torch.float32).with_per_token(
        **{k: (v.float() if v.is_floating_point() else v) for k, v in low.per_token.items()})

    kept = ops.keep(low, torch.tensor([[3, 1, 2], [0, 5, 9]]))
    assert kept.tokens.dtype == dtype and kept.per_token["feat"].dtype == dtype and kept.cls.dtype == dtype
    assert torch.equal(kept.tokens[0], low.tokens[0, [3, 1, 2]])

    src, dst = torch.tensor([[0, 2, 9], [4, 6, 1]]), torch.tensor([[1, 1, 8], [5, 5, 5]])
    m_low, m_high = ops.merge(low, src, dst), ops.merge(high, src, dst)
    assert m_low.tokens.dtype == dtype and m_low.per_token["score"].dtype == dtype
    assert m_low.size.dtype == torch.float32 and m_low.positions.dtype == torch.float32
    # merging accumulates in float32: identical to the float32 merge rounded once
    assert torch.equal(m_low.tokens, m_high.tokens.to(dtype))
    assert torch.equal(m_low.size, m_high.size)

    top = ops.keep_topk(low, low.per_token["score"], 5)
    assert top.tokens.dtype == dtype and top.counts.tolist() == [5, 5]

    # pairs of near-copies: the matching is unambiguous even in low precision
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 16, generator=g).repeat_interleave(2, dim=1)
    metric = (base + 0.01 * torch.randn(2, 12, 16, generator=g)).to(dtype)
    matching, r_used = ops.bipartite_match(metric, 6)
    assert r_used.tolist() == [6, 6]
    assert {(int(s), int(d)) for s, d in zip(matching.src[0], matching.dst[0])} == {(2 * i, 2 * i + 1) for i in range(6)}
    values, _ = ops.unmerge(m_low)
    assert values.dtype == dtype


# ------------------------------------------------------------- bad counts
def test_topk_and_bipartite_reject_non_integer_or_misshapen_counts():
    scores = torch.rand(2, 5)
    for k in (2.5, torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]), torch.tensor([[1, 2]]), True):
        with pytest.raises(StateError, match=r"topk_per_row: k: expected an int or an integer tensor \[B=2\]"):
            ops.topk_per_row(scores, k)
    with pytest.raises(StateError, match=r"bipartite_match: r: expected an int or an integer tensor \[B=2\]"):
        ops.bipartite_match(torch.randn(2, 6, 4), 1.5)
    # ints, numpy ints, scalar and [B] integer tensors are all fine
    import numpy as np

    for k in (2, np.int64(2), torch.tensor(2), torch.tensor([2, 2], dtype=torch.int32)):
        index, valid = ops.topk_per_row(scores, k)
        assert index.shape == (2, 2) and bool(valid.all())


# --------------------------------------------------------- no tokens left
def test_unmerge_and_patches_to_tokens_of_a_state_with_no_tokens():
    state = make_state(B=2)
    empty = ops.keep(state, torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.bool)).check()
    assert empty.N == 0
    values, present = ops.unmerge(empty)
    assert values.shape == (2, N, D) and (values == 0).all() and not present.any()
    feat, _ = ops.unmerge(empty, empty.per_token["feat"])
    assert feat.shape == (2, N, 3, 2) and feat.dtype == state.per_token["feat"].dtype
    assert ops.patches_to_tokens(empty, torch.ones(2, N)).shape == (2, 0)


# ---------------------------------------------------------- patches_to_tokens
def test_patches_to_tokens_sums_or_averages_the_patches_of_each_token():
    state = make_state(B=2)
    merged = ops.merge(state, torch.tensor([[0, 2], [5, 7]]), torch.tensor([[1, 1], [6, 6]]))
    kept = ops.keep(merged, torch.tensor([[0, 4, 5], [3, 4, 5]]))
    values = torch.arange(2 * N, dtype=torch.float32).view(2, N)
    total = ops.patches_to_tokens(kept, values)
    mean = ops.patches_to_tokens(kept, values, reduce="mean")
    for b in range(2):
        for t in range(kept.N):
            patches = [p for p in range(N) if int(kept.origin[b, p]) == t]
            assert float(total[b, t]) == sum(float(values[b, p]) for p in patches)
            assert float(mean[b, t]) == pytest.approx(sum(float(values[b, p]) for p in patches) / len(patches))
    assert float(total[0, 0]) == float(values[0, :3].sum())  # slot 0 of image 0 holds patches 0, 1, 2
    # the inverse of unmerge for a per-token score: each patch gets its token's value back
    back, present = ops.unmerge(kept, mean)
    torch.testing.assert_close(ops.patches_to_tokens(kept, back.masked_fill(~present, 0.0), "mean"), mean)
    ragged_state = ragged(make_state(B=2), [15, 6])
    out = ops.patches_to_tokens(ragged_state, torch.ones(2, N))
    assert out[1, 6:].eq(float("-inf")).all() and out[1, :6].eq(1.0).all()
    with pytest.raises(StateError, match=r"patches_to_tokens: expected values \[B=2, N0=15\], got \[2, 3\]"):
        ops.patches_to_tokens(kept, torch.zeros(2, 3))
    with pytest.raises(StateError, match=r"reduce must be 'sum' or 'mean', got 'max'"):
        ops.patches_to_tokens(kept, values, reduce="max")


# ------------------------------------------------------------ normalize_scores
def ref_normalize(row: list[float], how: str) -> list[float]:
    n = len(row)
    if how == "minmax":
        lo, hi = min(row), max(row)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in row]
    if how == "rank":
        if n == 1:
            return [0.5]
        return [(sum(u < v for u in row) + sum(u <= v for u in row) - 1) / 2 / (n - 1) for v in row]
    mean = sum(row) / n
    std = (sum((v - mean) ** 2 for v in row) / n) ** 0.5
    return [(v - mean) / std if std > 1e-12 else 0.0 for v in row]


@pytest.mark.parametrize("how", ["minmax", "rank", "zscore"])
def test_normalize_scores_equals_per_image_reference(how):
    scores = torch.tensor([[0.3, 0.1, 0.3, 0.9, 0.5], [2.0, -1.0, 7.0, 0.0, 0.0], [4.0, 4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, False, False, False, False]])
    scores[1, 3:] = 1e9  # padding is never looked at
    out = ops.normalize_scores(scores, mask, how)
    assert out.dtype == torch.float32 and (out[~mask] == 0).all()
    for b, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(out[b, :n], torch.tensor(ref_normalize(scores[b, :n].tolist(), how)))
    torch.testing.assert_close(ops.normalize_scores(scores, mask, "none"), scores.masked_fill(~mask, 0.0))


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
def test_normalize_scores_infinite_and_nan_scores():
    mask = torch.tensor([[True, True, True, False]])
    # rank: infinite real scores rank like any value, even next to padding
    out = ops.normalize_scores(torch.tensor([[1.0, float("inf"), float("-inf"), 0.0]]), mask, "rank")
    assert out.tolist() == [[0.5, 1.0, 0.0, 0.0]]
    for how in ("minmax", "zscore"):
        with pytest.raises(StateError, match=rf"normalize_scores: scores of real tokens contain NaN or inf \(how='{how}'\)"):
            ops.normalize_scores(torch.tensor([[1.0, float("-inf"), 3.0, 0.0]]), mask, how)
    with pytest.raises(StateError, match=r"contain NaN \(how='rank'\)"):
        ops.normalize_scores(torch.tensor([[1.0, float("nan"), 3.0, 0.0]]), mask, "rank")
    # NaN in padding is not looked at
    assert ops.normalize_scores(torch.tensor([[1.0, 2.0, 3.0, float("nan")]]), mask, "minmax").tolist() == [[0.0, 0.5, 1.0, 0.0]]
    with pytest.raises(StateError, match=r"how must be 'minmax', 'rank', 'zscore' or 'none', got 'max'"):
        ops.normalize_scores(torch.zeros(1, 4), mask, "max")


# ------------------------------------------------------------ query_similarity
def test_query_similarity_reduces_over_real_query_tokens_only():
    g = torch.Generator().manual_seed(1)
    tokens, query = torch.randn(2, 4, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    qmask = torch.tensor([[True, True, False], [True, False, False]])
    query[0, 2] = tokens[0, 0] * 5  # a padded query token identical to token 0: must not count
    sim = F.cosine_similarity(tokens[:, :, None], query[:, None], dim=-1)  # [B, N, T]
    best = ops.query_similarity(tokens, query, qmask)
    mean = ops.query_similarity(tokens, query, qmask, reduce="mean")
    torch.testing.assert_close(best[0], sim[0, :, :2].amax(-1))
    torch.testing.assert_close(best[1], sim[1, :, 0])
    torch.testing.assert_close(mean[0], sim[0, :, :2].mean(-1))
    torch.testing.assert_close(mean[1], sim[1, :, 0])
    torch.testing.assert_close(ops.query_similarity(tokens, query), sim.amax(-1))
    assert ops.query_similarity(tokens.half(), query.half(), qmask).dtype == torch.float32
    with pytest.raises(StateError, match=r"reduce must be 'max' or 'mean', got 'sum'"):
        ops.query_similarity(tokens, query, qmask, reduce="sum")


def test_merge_order_key_sorts_the_survivors_and_is_checked():
    state = TokenState.from_patches(torch.arange(12.0).view(1, 4, 3), (2, 2))
    src, dst = torch.tensor([[1]]), torch.tensor([[0]])
    out = ops.merge(state, src, dst, order=torch.tensor([[5, 0, 1, 0]]))  # survivors 0, 2, 3 keyed 5, 1, 0
    assert out.tokens[:, :, 0].tolist() == [[9.0, 6.0, 1.5]]
    assert out.origin.tolist() == [[2, 2, 1, 0]]
    with pytest.raises(StateError, match=r"merge: order must be a sort key \[B=1, N=4\], got \[1, 3\]"):
        ops.merge(state, src, dst, order=torch.zeros(1, 3, dtype=torch.int64))


# ------------------------------------------------------------------ hardening
# Issue 12: bad arguments to a public op are a StateError naming the field,
# checked once at the op's entry, never an IndexError or a silent zero.
@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_merge_non_positive_or_non_finite_weights_are_an_error(bad):
    state = make_state(B=1)
    weights = torch.ones(1, N)
    weights[0, 1] = bad  # a source's weight; with 0 both weights of the group [0, 1] are 0 -> zero vector
    weights[0, 0] = bad if bad == 0.0 else 1.0
    with pytest.raises(StateError, match=r"merge: weights must be finite and > 0 on real tokens"):
        ops.merge(state, torch.tensor([[1]]), torch.tensor([[0]]), weights=weights)
    # the default weights are the sizes: a real token of size 0 is the same error
    zero_size = dataclasses.replace(state, size=state.size.clone().index_fill_(1, torch.tensor([0, 1]), 0.0))
    with pytest.raises(StateError, match=r"merge: weights \(the sizes\) must be finite and > 0 on real tokens that merge"):
        ops.merge(zero_size, torch.tensor([[1]]), torch.tensor([[0]]))
    # padding is not looked at
    rag = ragged(make_state(B=2), [15, 6])
    w = torch.ones(2, 15)
    w[1, 6:] = 0.0
    ops.merge(rag, torch.tensor([[1], [1]]), torch.tensor([[0], [0]]), weights=w).check()


def test_keep_topk_and_topk_per_row_reject_misshapen_scores_and_mask():
    state = make_state(B=2)
    with pytest.raises(StateError, match=r"keep_topk: scores must be \[B, N\]=\[2, 15\] \(one per token slot\), got \[2, 14\]"):
        ops.keep_topk(state, torch.rand(2, 14), 3)
    with pytest.raises(StateError, match=r"keep_topk: scores must be \[B, N\]=\[2, 15\] \(one per token slot\), got \[2, 15, 1\]"):
        ops.keep_topk(state, torch.rand(2, 15, 1), 3)
    with pytest.raises(StateError, match=r"topk_per_row: mask must be a bool tensor \[B, N\]=\[2, 15\], got shape \[2, 14\]"):
        ops.topk_per_row(torch.rand(2, 15), 3, torch.ones(2, 14, dtype=torch.bool))


def corrupt_origin(state: TokenState, value: int) -> TokenState:
    origin = state.origin.clone()
    origin[0, 3] = value
    return dataclasses.replace(state, origin=origin)  # state.replace() would refuse it before the op sees it


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
@pytest.mark.parametrize("value", [15, 16, 99, -2])
@pytest.mark.parametrize(
    "op",
    [
        lambda s: ops.unmerge(s),
        lambda s: ops.patches_to_tokens(s, torch.ones(s.origin.shape)),
        lambda s: ops.keep(s, torch.tensor([[0, 1], [0, 1]])),
        lambda s: ops.merge(s, torch.tensor([[1], [1]]), torch.tensor([[0], [0]])),
        lambda s: ops.keep_topk(s, s.per_token["score"], 2),
    ],
    ids=["unmerge", "patches_to_tokens", "keep", "merge", "keep_topk"],
)
def test_an_origin_pointing_past_the_tokens_is_a_state_error(op, value):
    state = corrupt_origin(make_state(B=2), value)
    with pytest.raises(StateError, match=rf"TokenState\.origin: values must lie in \[-1, 15\) .*, got {value} for patch 3 of image 0"):
        op(state)


@pytest.mark.usefixtures("value_checks")  # its errors come from value checks (see the fixture)
def test_other_ops_reject_misshapen_arguments_with_state_errors():
    state = make_state(B=2)
    mask = torch.ones(2, 15, dtype=torch.bool)
    cases = [
        (lambda: ops.cosine(torch.rand(2, 3, 4), torch.rand(2, 5, 6)), r"cosine: expected \[\.\.\., N, C\] and \[\.\.\., M, C\] with one C, got \[2, 3, 4\] and \[2, 5, 6\]"),
        (lambda: ops.query_similarity(torch.rand(2, 3, 4), torch.rand(2, 5, 6)), r"query_similarity: expected tokens \[B, N, D\] and query \[B, T, D\]"),
        (lambda: ops.query_similarity(torch.rand(2, 3, 4), torch.rand(2, 5, 4), torch.ones(2, 4, dtype=torch.bool)), r"query_similarity: query_mask must be a bool tensor \[B, T\]=\[2, 5\], got shape \[2, 4\]"),
        (lambda: ops.normalize_scores(torch.rand(2, 14), mask), r"normalize_scores: scores must be \[B, N\]=\[2, 15\] like the mask, got shape \[2, 14\]"),
        (lambda: ops.bipartite_match(torch.rand(2, 15, 3), 2, torch.ones(2, 14, dtype=torch.bool)), r"bipartite_match: mask must be a bool tensor \[B, N\]=\[2, 15\], got shape \[2, 14\]"),
        (lambda: ops.bipartite_merges(torch.rand(15, 3), 2), r"bipartite_merges: expected metric \[B, N, C\], got shape \[15, 3\]"),
        (lambda: ops.pack(torch.ones(2, 3)), r"pack: expected a bool tensor \[B, N\], got shape \[2, 3\] dtype torch\.float32"),
        (lambda: ops.gather_rows(state.tokens, torch.tensor([[0, 15], [0, 1]]), torch.ones(2, 2, dtype=torch.bool)), r"gather_rows: indices must lie in \[0, 15\)"),
        (lambda: ops.gather_rows(state.tokens, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)), r"gather_rows: expected an int64 index \[B=2, K\], got shape \[1, 2\]"),
        (lambda: ops.keep(state, [[0, 1], [0, 1]]), r"keep: expected an int64 index \[B=2, K\], got list"),
        (lambda: ops.merge(state, torch.tensor([[1]] * 2), torch.tensor([[0]] * 2), order=torch.zeros(2, 15)), r"merge: order must be an integer sort key \[B=2, N=15\], got dtype torch\.float32"),
    ]
    for call, match in cases:
        with pytest.raises(StateError, match=match):
            call()


def test_normalize_scores_near_constant_rows_are_zero_and_the_test_is_relative():
    mask = torch.ones(3, 4, dtype=torch.bool)
    scores = torch.tensor([
        [0.5, 0.5 + 3e-8, 0.5, 0.5 - 3e-8],  # a few float32 ulps: constant
        [1e-9, 2e-9, 3e-9, 4e-9],  # tiny but spread out: a real ranking
        [-7.0, -7.0, -7.0, -7.0],
    ])
    for how in ("minmax", "zscore"):
        out = ops.normalize_scores(scores, mask, how)
        assert (out[0] == 0).all() and (out[2] == 0).all()
        assert out[1].argsort().tolist() == [0, 1, 2, 3] and out[1].abs().max() > 0.5
        torch.testing.assert_close(ops.normalize_scores(scores * 1e6, mask, how), out)
    assert ops.normalize_scores(scores, mask, "minmax", rtol=0.0)[0].tolist() != [0.0] * 4


def test_topk_breaks_ties_by_index_at_any_length():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0]])
    assert ops.topk(x, 4).indices.tolist() == [[1, 2, 4, 0]]
    assert ops.topk(x, 3, largest=False).indices.tolist() == [[3, 0, 5]]
    # a row padded with -inf picks the same tied entries as the row alone
    row = torch.zeros(1, 1, 40)
    padded = torch.cat([row, torch.full((1, 1, 300), float("-inf"))], -1)
    assert torch.equal(ops.topk(padded, 32).indices, ops.topk(row, 32).indices)
    assert ops.topk(row, 32).indices.tolist() == [[list(range(32))]]
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 9, generator=g)  # distinct values: torch.topk's answer
    for dim in (0, 1, -1):
        got, want = ops.topk(y, 2, dim=dim), torch.topk(y, 2, dim=dim)
        assert torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)
    with pytest.raises(StateError, match=r"topk: k must be an int in \[0, 6\], got 7"):
        ops.topk(x, 7)


def test_similarity_key_gives_equal_cosines_equal_keys_in_any_batch():
    g = torch.Generator().manual_seed(0)
    palette = torch.randn(3, 7, generator=g)
    rows = palette[torch.randint(0, 3, (2, 41), generator=g)]  # duplicates of 3 vectors
    rows[1, 5] = 0.0  # a zero vector: cosine 0 with everything
    key = ops.similarity_key(rows, rows)
    assert key.dtype == torch.float32  # issue 17: float32 keys (was float64: a float64 product is ~2x the time)
    assert ops.similarity_key(rows.double(), rows.double()).dtype == torch.float64  # a wider input stays wide
    torch.testing.assert_close(key.double(), ops.cosine(rows.double(), rows.double(), eps=1e-12), atol=1e-7, rtol=0)
    # self-cosines of different vectors are all exactly 1, and an image alone gets the keys of its batch row
    diag = key.diagonal(dim1=-2, dim2=-1)
    assert (diag[0] == 1).all() and (diag[1][torch.arange(41) != 5] == 1).all() and diag[1, 5] == 0
    for n in (41, 17, 3):
        assert torch.equal(ops.similarity_key(rows[1:, :n], rows[1:, :n])[0], key[1, :n, :n])
    with pytest.raises(StateError, match=r"similarity_key: expected \[\.\.\., N, C\] and \[\.\.\., M, C\] with one C"):
        ops.similarity_key(torch.rand(2, 3, 4), torch.rand(2, 5, 6))


@pytest.mark.parametrize("seed, D, counts", [(0, 5, [43, 19]), (2, 3, [53, 17]), (7, 6, [18, 45]), (11, 5, [23, 10])])
def test_bipartite_match_of_duplicate_tokens_equals_per_image_runs(seed, D, counts):
    # Counterexample class of the property tests (aim_merge, tome with ties): tokens copied from 3 vectors,
    # so many best cosines are exactly equal; float32 products computed them as 1 +- 1 ulp depending on the
    # batch, and the edge order followed that noise instead of the index.
    g = torch.Generator().manual_seed(seed)
    torch.randint(1, 8, (1,), generator=g), torch.randint(2, 60, (2,), generator=g)  # (the search's draws)
    N = max(counts)
    metric = torch.randn(2, 3, D, generator=g).gather(1, torch.randint(0, 3, (2, N, 1), generator=g).expand(2, N, D))
    mask = torch.arange(N)[None] < torch.tensor(counts)[:, None]
    batch, _ = ops.bipartite_match(metric, N // 4, mask)
    for b in range(2):
        alone, _ = ops.bipartite_match(metric[b:b + 1, :counts[b]], N // 4)
        assert batch.src[b][batch.valid[b]].tolist() == alone.src[0][alone.valid[0]].tolist()
        assert batch.dst[b][batch.valid[b]].tolist() == alone.dst[0][alone.valid[0]].tolist()


def test_ops_on_a_state_without_token_slots():
    # Counterexample of the property tests (chain aim_prune -> aim_merge): an in-LLM stage may keep no
    # token; merging nothing in a state with N = 0 used to index past an empty tensor.
    state = ops.keep(make_state(B=2), torch.zeros(2, 0, dtype=torch.int64))
    assert state.N == 0 and bool((state.origin == -1).all())
    empty = torch.zeros(2, 0, dtype=torch.int64)
    out = ops.merge(state, empty, empty).check()
    assert out.N == 0 and torch.equal(out.origin, state.origin)
    assert ops.keep_topk(state, torch.zeros(2, 0), 0).check().N == 0
    matching, r_used = ops.bipartite_match(state.tokens, 3, state.mask)
    assert matching.src.shape == (2, 0) and r_used.tolist() == [0, 0]


# ------------------------------------------------------------------ pack (issue 17)
def ref_pack_end(select: torch.Tensor, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``arrcoc.integrations.hf.prompt.pack_end`` as it was before ``ops.pack`` took its place (left padding)."""
    if key is None:
        key = torch.arange(select.shape[1]).expand_as(select)
    order = torch.sort(torch.where(select, key, torch.full_like(key, -1)), dim=1, stable=True).indices
    S = int(select.sum(1).max()) if select.numel() else 0
    index = order[:, order.shape[1] - S:]
    return index, select.gather(1, index)


def test_pack_front_and_end_with_and_without_a_key():
    g = torch.Generator().manual_seed(3)
    for B, M in [(3, 9), (4, 1), (2, 17), (1, 5)]:
        select = torch.rand(B, M, generator=g) < 0.6
        select[0] = False  # an empty row
        key = torch.randint(0, 4, (B, M), generator=g)  # many equal keys: ties by index
        # the prompt's left-padded form, exactly (padding indices included)
        for k in (None, key):
            got, want = ops.pack(select, k, end=True), ref_pack_end(select, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # packed to the front: index order by default, key order given a key; padding 0
        index, valid = ops.pack(select)
        index_k, valid_k = ops.pack(select, key)
        assert torch.equal(valid, valid_k)
        for b in range(B):
            chosen = [i for i in range(M) if select[b, i]]
            n = len(chosen)
            assert index[b, :n].tolist() == chosen and valid[b].tolist() == [True] * n + [False] * (index.shape[1] - n)
            assert index_k[b, :n].tolist() == sorted(chosen, key=lambda i: (int(key[b, i]), i))
            assert (index[b, n:] == 0).all() and (index_k[b, n:] == 0).all()
        # the end form holds the same entries, right-aligned
        end_index, end_valid = ops.pack(select, key, end=True)
        assert torch.equal(end_valid, valid_k.flip(1))
        for b in range(B):
            n = int(select[b].sum())
            assert end_index[b, end_index.shape[1] - n:].tolist() == index_k[b, :n].tolist()
    with pytest.raises(StateError, match=r"pack: key must be a real tensor of the shape of select \[2, 3\], got shape \[2, 2\]"):
        ops.pack(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 2))


def test_pack_of_a_float_key_and_of_no_rows():
    select = torch.tensor([[True, False, True, True]])
    index, valid = ops.pack(select, torch.tensor([[0.5, -3.0, -1.0, float("inf")]]), end=True)
    assert index.tolist() == [[2, 0, 3]] and valid.all()
    for end in (False, True):
        index, valid = ops.pack(torch.zeros(0, 4, dtype=torch.bool), end=end)
        assert index.shape == (0, 0) and valid.shape == (0, 0)


# ------------------------------------------------------- the value-check switch (issue 17)
def test_value_checks_run_only_under_the_switch():
    state = make_state()
    duplicate = torch.tensor([[1, 2, 1], [0, 1, 2]])
    assert not ops.checks_enabled()  # the default: the pipeline checks each stage's output instead
    out = ops.keep(state, duplicate)  # not looked at: no device sync
    assert out.counts.tolist() == [3, 3]
    with ops.checking():
        assert ops.checks_enabled()
        with pytest.raises(StateError, match=r"keep: an index appears more than once in a row"):
            ops.keep(state, duplicate)
        with ops.checking(False):
            assert not ops.checks_enabled()
            ops.keep(state, duplicate)
        assert ops.checks_enabled()
    assert not ops.checks_enabled()
    # what the switch leaves out is caught at the stage boundary: a kept padded slot has size 0
    rag = ragged(make_state(), [15, 6])
    with pytest.raises(StateError, match=r"TokenState.size: every real token must stand for > 0 patches"):
        ops.keep(rag, torch.tensor([[0, 1], [0, 9]])).check()
    # budget errors (what a user asks for) are not behind the switch
    with pytest.raises(BudgetError, match=r"asked to keep 7 tokens, but an image has only 6"):
        ops.resolve_keep(7, rag.counts)
    with pytest.raises(BudgetError, match=r"bipartite_match: r must be >= 0, got \[-1, -1\]"):
        ops.bipartite_match(state.tokens, -1)


def test_the_switch_can_be_turned_on_for_a_process_by_the_environment():
    import os
    import subprocess
    import sys

    code = "from arrcoc import ops; print(ops.checks_enabled())"
    for value, expected in [("1", "True"), ("0", "False")]:
        env = {**os.environ, "ARRCOC_CHECK_OPS": value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.stdout.strip() == expected, done.stderr


# --------------------------------------------------- similarity_key in float32 (issue 17)
@pytest.mark.parametrize("D", [7, 64, 1024])
def test_similarity_key_of_distinct_vectors_rounds_alike_in_any_batch(D):
    # float32 products round with the matrix's shape; padded to whole tiles they do not (bit-equal keys).
    g = torch.Generator().manual_seed(D)
    x = torch.randn(3, 301, D, generator=g)
    key = ops.similarity_key(x[:, ::2], x[:, 1::2])
    assert key.dtype == torch.float32
    torch.testing.assert_close(key, ops.cosine(x[:, ::2].double(), x[:, 1::2].double(), eps=1e-12).float(),
                               atol=2e-6, rtol=0)
    for n in (3, 17, 64, 65, 100, 299):
        alone = ops.similarity_key(x[1:2, :n:2], x[1:2, 1:n:2])
        assert torch.equal(alone[0], key[1, :alone.shape[1], :alone.shape[2]])
    assert torch.equal(ops.similarity_key(x[:, ::2].repeat(3, 1, 1), x[:, 1::2].repeat(3, 1, 1))[4], key[1])


def test_merge_of_fields_of_different_dtypes():
    # A float64 state with float32 and float16 per_token fields: each field averages in its own (or float32) precision.
    base = make_state(B=2)
    state = dataclasses.replace(
        base, tokens=base.tokens.double(), cls=base.cls.double(),
        per_token={**base.per_token, "half": base.per_token["score"].half()},
    )
    pairs = [[(1, 0), (2, 0), (6, 5)], [(14, 13), (3, 4), (8, 4)]]
    src = torch.tensor([[s for s, _ in p] for p in pairs])
    dst = torch.tensor([[d for _, d in p] for p in pairs])
    out = ops.merge(state, src, dst).check()
    ref = ref_merge(state, pairs)
    assert out.tokens.dtype == torch.float64 and out.per_token["half"].dtype == torch.float16
    for b in range(2):
        torch.testing.assert_close(out.tokens[b], ref["tokens"][b])
        torch.testing.assert_close(out.per_token["score"][b], ref["score"][b].float())
        torch.testing.assert_close(out.per_token["half"][b], ref["score"][b].half(), atol=1e-3, rtol=1e-3)


def test_keep_and_merge_pass_gradients_to_the_tokens():
    # Under autograd (a model's features), the survivors' buffers are filled differentiably.
    x = torch.randn(2, N, D, requires_grad=True)
    state = TokenState.from_patches(x, (H, W))
    out = ops.merge(state, torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 0], [5, 6]]))
    out.tokens.sum().backward()
    assert torch.allclose(x.grad[0, :3], torch.full((3, D), 1 / 3)) and torch.equal(x.grad[0, 3:], torch.ones(N - 3, D))
    assert torch.allclose(x.grad[1, 3:7], torch.full((4, D), 0.5)) and torch.equal(x.grad[1, 7:], torch.ones(N - 7, D))
    x.grad = None
    (ops.keep(state, torch.tensor([[1, 2], [3, 4]])).tokens * 2).sum().backward()
    assert x.grad.sum() == 2 * 2 * 2 * D and x.grad[0, 1].eq(2).all() and x.grad[0, 0].eq(0).all()


# ------------------------- with the value checks off, a bad index still fails (review of issue 17)
def _fails_or_is_refused(make) -> None:
    """What ``make()`` returns must not be a state that passes the stage boundary's check."""
    try:
        out = make()
    except (IndexError, RuntimeError):  # torch's index error in the gather / scatter that used the index
        return
    if isinstance(out, TokenState):
        with pytest.raises(StateError):
            out.check()
    else:
        pytest.fail(f"a bad index was silently used: {out!r}")


@pytest.mark.parametrize("index", [
    [[0, N], [0, 1]],       # one past image 0's row: image 1's first token in the flattened batch
    [[0, 1], [0, -1]],      # one before image 1's row: image 0's last token
    [[0, 1], [0, N + 3]],   # past the last image's row
])
def test_an_index_outside_its_row_never_reads_another_image_with_the_checks_off(index):
    # Unchecked (the default), the ops gather rows of the flattened [B * N] batch: an index outside [0, N)
    # must fail there, not silently read a token of a neighbouring image (a state the boundary cannot tell).
    state = make_state(cls=False)
    index = torch.tensor(index)
    valid = torch.ones_like(index, dtype=torch.bool)
    assert not ops.checks_enabled()
    _fails_or_is_refused(lambda: ops.keep(state, index))
    _fails_or_is_refused(lambda: ops.gather_rows(state.tokens, index, valid))
    _fails_or_is_refused(lambda: ops.merge(state, index[:, 1:], torch.tensor([[0], [0]])))
    _fails_or_is_refused(lambda: ops.merge(state, torch.tensor([[2], [2]]), index[:, 1:]))
    # invalid entries are still ignored, whatever they hold
    out = ops.keep(state, index, torch.tensor([[True, False], [True, False]]))
    assert out.counts.tolist() == [1, 1] and torch.equal(out.tokens[:, 0], state.tokens[:, 0])


def test_a_merge_into_a_token_that_does_not_survive_fails_with_the_checks_off():
    # A destination that is itself a source (a chain) or a padded slot has no output row: the write must fail,
    # not land in the previous image's last token.
    state = ragged(make_state(cls=False), [N, 6])
    chain = (torch.tensor([[1, 2], [1, 2]]), torch.tensor([[0, 0], [2, 3]]))  # image 1: 1 -> 2 -> 3
    padded = (torch.tensor([[1], [1]]), torch.tensor([[0], [9]]))            # image 1: into padded slot 9
    for src, dst in (chain, padded):
        assert not ops.checks_enabled()
        _fails_or_is_refused(lambda: ops.merge(state, src, dst))
        with ops.checking(), pytest.raises(StateError, match=r"merge"):
            ops.merge(state, src, dst)


def ref_merge_tokens(x: torch.Tensor, w: torch.Tensor, src: list[list[int]], dst: list[list[int]]) -> torch.Tensor:
    """Survivors in index order, each destination the w-weighted mean of its group (float32, differentiable)."""
    rows = []
    for b in range(x.shape[0]):
        groups: dict[int, list[int]] = {}
        for s, d in zip(src[b], dst[b]):
            groups.setdefault(d, [d]).append(s)
        kept = [n for n in range(x.shape[1]) if n not in set(src[b])]
        rows.append(torch.stack([
            (x[b, groups.get(n, [n])].float() * w[b, groups.get(n, [n]), None]).sum(0) / w[b, groups.get(n, [n])].sum()
            for n in kept
        ]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("many", [False, True])  # several sources per destination (K <= 3R) or a few (K > 3R)
def test_merge_gradients_equal_the_reference_weighted_means_for_tokens_and_weights(dtype, many):
    # The gradient of each token and weight is that of the plain group means, also when a destination gathers
    # several sources (each written once: the destination and the weight totals are not counted per pair).
    g = torch.Generator().manual_seed(0)
    src = [list(range(1, N, 2)), [3, 5, 8]] if many else [[1, 3], [5, 7]]
    dst = [[0] * len(src[0]), [4, 4, 2]] if many else [[0, 0], [4, 4]]
    R = max(map(len, src))
    src_t = torch.tensor([s + [0] * (R - len(s)) for s in src])
    dst_t = torch.tensor([d + [0] * (R - len(d)) for d in dst])
    valid = torch.tensor([[i < len(s) for i in range(R)] for s in src])
    x0, w0 = torch.randn(2, N, D, generator=g).to(dtype), torch.rand(2, N, generator=g) + 0.5
    probe = torch.randn(2, N - min(map(len, src)), D, generator=g)
    grads = {}
    for name in ("ops", "reference"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if name == "ops":
            out = ops.merge(TokenState.from_patches(x, (H, W)), src_t, dst_t, valid, weights=w)
            tokens, mask = out.tokens.float(), out.mask
        else:
            tokens = torch.cat([ref_merge_tokens(x[b:b + 1], w[b:b + 1], [src[b]], [dst[b]])[0].flatten()
                                for b in range(2)])
            mask = None
        if mask is not None:
            tokens = tokens[mask].flatten()
        (tokens * probe[:, :, :].flatten()[: tokens.numel()]).sum().backward()
        grads[name] = (x.grad.float(), w.grad)
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    for got, want in zip(grads["ops"], grads["reference"]):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()


@pytest.mark.parametrize("order", ["position", "score"])
def test_keep_topk_of_a_ragged_batch_equals_one_row_runs_field_by_field(order):
    # A one-row state takes its own gathering path (a select per field along the tokens axis); every field of
    # every dtype and shape must come out as the batched path's row does.
    g = torch.Generator().manual_seed(7)
    B, H, W = 3, 4, 5
    N = H * W
    per_token = {"score": torch.randn(B, N, generator=g), "half": torch.randn(B, N, generator=g).half(),
                 "flag": torch.rand(B, N, generator=g) < 0.5, "keys": torch.randn(B, N, 3, generator=g)}
    state = TokenState.from_patches(torch.randn(B, N, 6, generator=g), (H, W), per_token=per_token)
    state = ops.keep_topk(state, torch.randn(B, N, generator=g), torch.tensor([N, 13, 7]))  # ragged: 20, 13, 7
    scores = torch.randn(B, state.N, generator=g)
    k = torch.tensor([9, 4, 7])
    out = ops.keep_topk(state, scores, k, order=order)
    for b in range(B):
        n = int(state.counts[b])
        one = ops.keep_topk(state.image(b), scores[b : b + 1, :n], int(k[b]), order=order)
        kb = int(k[b])
        assert one.N == kb and bool(one.mask.all())
        for name in ("tokens", "size", "positions", "origin"):
            want = getattr(out, name)[b : b + 1] if name == "origin" else getattr(out, name)[b : b + 1, :kb]
            assert torch.equal(getattr(one, name), want), (b, name)
        for name, value in one.per_token.items():
            assert value.dtype == out.per_token[name].dtype
            assert torch.equal(value, out.per_token[name][b : b + 1, :kb]), (b, name)
        # and the one-row result is the reference gather of the chosen tokens
        chosen = torch.topk(scores[b, :n].double(), kb).indices  # distinct random scores: no ties
        if order == "position":
            chosen = chosen.sort().values
        assert torch.equal(one.tokens[0], state.tokens[b, chosen])
        assert torch.equal(one.per_token["half"][0], state.per_token["half"][b, chosen])
