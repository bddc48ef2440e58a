import math

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import InputError, MissingInputError
from arrcoc.state import TokenState


def make_state(B=2, H=3, W=4, D=6, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = TokenState.from_patches(torch.randn(B, H * W, D, generator=g), (H, W))
    q = torch.randn(B, T, D, generator=g)
    qm = torch.ones(B, T, dtype=torch.bool)
    qm[1, 1:] = False  # image 1 has one real query word; the rest is padding with garbage values
    return s.replace(query=q, query_mask=qm)


def reference(state, reduce):
    out = torch.full((state.B, state.N), -math.inf)
    for b in range(state.B):
        for n in range(state.N):
            if not state.mask[b, n]:
                continue
            sims = []
            for t in range(state.query.shape[1]):
                if state.query_mask[b, t]:
                    x, q = state.tokens[b, n].double(), state.query[b, t].double()
                    sims.append(float(x @ q / (x.norm() * q.norm())))
            out[b, n] = max(sims) if reduce == "max" else sum(sims) / len(sims)
    return out


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_query_scores_equal_hand_computed_cosines(reduce):
    state = make_state()
    out = arrcoc.create("scorer", "query", reduce=reduce)(state).per_token["scores:query"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(state, reduce), atol=1e-5, rtol=1e-5)


def test_query_scores_ragged_tokens_are_minus_inf_on_padding():
    state = make_state()
    index = torch.tensor([[0, 3, 5, 7], [2, 4, 0, 0]])
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    kept = ops.keep(state, index, valid)
    out = arrcoc.create("scorer", "query")(kept).per_token["scores:query"]
    assert torch.isinf(out[1, 2:]).all() and (out[1, 2:] < 0).all()
    torch.testing.assert_close(out, reference(kept, "max"), atol=1e-5, rtol=1e-5)


def test_query_planted_token_scores_one():
    state = make_state()
    tokens = state.tokens.clone()
    tokens[0, 5] = 3.0 * state.query[0, 2]
    out = arrcoc.create("scorer", "query")(state.replace(tokens=tokens)).per_token["scores:query"]
    assert out[0].argmax() == 5
    assert out[0, 5] == pytest.approx(1.0, abs=1e-5)


def test_query_width_mismatch_names_both_widths():
    state = make_state()
    bad = state.replace(query=torch.randn(2, 3, 5), query_mask=state.query_mask)
    with pytest.raises(InputError, match=r"query width 5 differs from the visual token width 6"):
        arrcoc.create("scorer", "query")(bad)


def test_query_missing_and_empty():
    state = make_state()
    with pytest.raises(MissingInputError, match="no query"):
        arrcoc.create("scorer", "query")(state.replace(query=None, query_mask=None))
    empty = state.query_mask.clone()
    empty[1] = False
    with pytest.raises(InputError, match=r"images \[1\] have no real query token"):
        arrcoc.create("scorer", "query")(state.replace(query_mask=empty))


def test_query_needs_query_and_bad_param():
    scorer = arrcoc.create("scorer", "query")
    assert scorer.requirements() == {"query"}
    with pytest.raises(arrcoc.ParamsError, match="reduce"):
        arrcoc.create("scorer", "query", reduce="median")
