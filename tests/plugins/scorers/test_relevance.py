import math

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import InputError, ParamsError
from arrcoc.state import TokenState
from arrcoc.ops import normalize_scores


def rank_normalize(scores, mask):
    return normalize_scores(scores, mask, "rank")


def zscore_normalize(scores, mask):
    return normalize_scores(scores, mask, "zscore")


def ref_rank(values):
    """Average ranks (ties share them) mapped to [0, 1]."""
    n = len(values)
    out = []
    for v in values:
        below = sum(1 for u in values if u < v)
        equal = sum(1 for u in values if u == v)
        out.append((below + (equal - 1) / 2) / (n - 1) if n > 1 else 0.5)
    return out


def ref_z(values):
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / n)
    return [(v - m) / sd if sd > 0 else 0.0 for v in values]


SCORES = torch.tensor([[0.3, 0.1, 0.3, 0.9, -2.0], [5.0, 4.0, 99.0, 7.0, 7.0]])
MASK = torch.tensor([[True] * 5, [True, True, False, False, False]])


@pytest.mark.parametrize("fn,ref", [(rank_normalize, ref_rank), (zscore_normalize, ref_z)])
def test_normalisation_against_reference(fn, ref):
    out = fn(SCORES, MASK)
    for b in range(2):
        n = int(MASK[b].sum())
        expect = ref(SCORES[b, :n].tolist())
        torch.testing.assert_close(out[b, :n], torch.tensor(expect), atol=1e-6, rtol=1e-6)
        assert (out[b, n:] == 0).all()  # padding never leaks into the statistics


def test_rank_single_token_and_constant_zscore():
    assert rank_normalize(torch.tensor([[4.0]]), torch.tensor([[True]])).item() == 0.5
    assert (zscore_normalize(torch.full((1, 3), 2.0), torch.ones(1, 3, dtype=torch.bool)) == 0).all()


def make_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = TokenState.from_patches(
        torch.randn(2, 16, 8, generator=g), (4, 4), cls_token=torch.randn(2, 8, generator=g),
        per_token={"cls_attn": torch.rand(2, 16, generator=g)},
    )
    return s.replace(query=torch.randn(2, 2, 8, generator=g), query_mask=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("normalize", ["rank", "zscore"])
def test_relevance_is_weighted_normalised_sum(normalize):
    state = make_state()
    kept = ops.keep(state, torch.tensor([[0, 2, 4, 6, 8, 9], [1, 3, 5, 0, 0, 0]]),
                    torch.tensor([[True] * 6, [True] * 3 + [False] * 3]))
    out = arrcoc.create("scorer", "relevance", weights={"query": 3, "saliency": 1, "information": 1},
                        normalize=normalize)(kept)
    ref = {"rank": ref_rank, "zscore": ref_z}[normalize]
    for b in range(2):
        n = int(kept.counts[b])
        parts = {k: ref(out.per_token[f"scores:{k}"][b, :n].tolist()) for k in ("query", "saliency", "information")}
        expect = [(3 * parts["query"][i] + parts["saliency"][i] + parts["information"][i]) / 5 for i in range(n)]
        torch.testing.assert_close(out.per_token["relevance"][b, :n], torch.tensor(expect), atol=1e-5, rtol=1e-5)
        assert torch.isinf(out.per_token["relevance"][b, n:]).all()
    # The component scores are the plain scorers' outputs.
    alone = arrcoc.create("scorer", "query")(kept).per_token["scores:query"]
    torch.testing.assert_close(out.per_token["scores:query"], alone)


def test_relevance_reuses_existing_scores_and_passes_params():
    state = make_state().with_per_token(**{"scores:query": torch.arange(16.0).expand(2, 16).contiguous()})
    out = arrcoc.create("scorer", "relevance", weights={"query": 1.0})(state)
    torch.testing.assert_close(out.per_token["relevance"][0], torch.arange(16.0) / 15)
    fresh = arrcoc.create("scorer", "relevance", weights={"query": 1.0}, reuse=False)(state)
    assert not torch.equal(fresh.per_token["scores:query"], state.per_token["scores:query"])
    r = arrcoc.create("scorer", "relevance", weights={"saliency": 1.0}, scorers={"saliency": {"method": "rollout"}})
    assert r.requirements() == {"attention_maps"}
    assert arrcoc.create("scorer", "relevance").requirements() == {"query", "cls_attention"}


def test_relevance_bad_params():
    with pytest.raises(ParamsError, match=r"unknown scorer 'qeury' \(did you mean 'query'\?\)"):
        arrcoc.create("scorer", "relevance", weights={"qeury": 1.0})
    with pytest.raises(ParamsError, match="must sum to a positive number"):
        arrcoc.create("scorer", "relevance", weights={"query": 0.5, "saliency": -0.5})
    with pytest.raises(ParamsError, match="at least one"):
        arrcoc.create("scorer", "relevance", weights={})
    with pytest.raises(ParamsError, match="cannot combine itself"):
        arrcoc.create("scorer", "relevance", weights={"relevance": 1.0})
    with pytest.raises(ParamsError, match=r"params given for \['information'\]"):
        arrcoc.create("scorer", "relevance", weights={"query": 1.0}, scorers={"information": {}})
    with pytest.raises(ParamsError, match="method"):
        arrcoc.create("scorer", "relevance", weights={"saliency": 1.0}, scorers={"saliency": {"method": "gradcam"}})


def test_relevance_nan_scores_are_an_error():
    scores = torch.rand(2, 16)
    scores[1, 3] = float("nan")
    state = make_state().with_per_token(**{"scores:query": scores})
    with pytest.raises(InputError, match=r"per_token\['scores:query'\] has 1 NaN"):
        arrcoc.create("scorer", "relevance", weights={"query": 1.0})(state)


def test_masked_tokens_never_win():
    state = make_state()
    kept = ops.keep(state, torch.tensor([[0, 1], [2, 0]]), torch.tensor([[True, True], [True, False]]))
    rel = arrcoc.create("scorer", "relevance")(kept).per_token["relevance"]
    assert rel[1].argmax() == 0 and rel[1, 1] == -math.inf
