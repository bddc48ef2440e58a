"""DivPrune: the official greedy loop, the picked-twice quirk, ragged batches, ties, errors, budgets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError, ParamsError
from arrcoc.plugin import BudgetContext
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.divprune import DivPrune, divprune_budget, divprune_distances, divprune_select

H = W = 8
N0 = H * W


def make_state(B=3, D=16, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_patches(
        torch.randn(B, N0, D, generator=g), (H, W), per_token={"keys": torch.randn(B, N0, C, generator=g)},
    )


def official_divprune(features: torch.Tensor, threshold_terms: int) -> list[int]:
    """vbdi/divprune ``DivPrune`` (llava_arch.py l.147-171) for one image, as written there: the whole
    min over the chosen rows each step, chosen tokens not masked. Returns the pick sequence."""
    norm = features / features.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm, norm.t())
    s: list[int] = []
    for i in range(threshold_terms):
        if i == 0:
            scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(cosine_matrix[torch.tensor(s)], dim=0).values
        s.append(int(torch.argmax(scores)))
    return s


def picks(state: TokenState, k: int, **kwargs) -> list[list[int]]:
    counts = torch.full((state.B,), k)
    index, valid = divprune_select(divprune_distances(state.tokens), state.mask, counts, **kwargs)
    assert valid.all()
    return index.tolist()


@pytest.mark.parametrize("k", [1, 7, 20, N0])
def test_matches_official_loop(k):
    state = make_state()
    sequences = picks(state, k)
    out = DivPrune(keep=k)(state).check()
    assert out.counts.tolist() == [k] * state.B
    for b in range(state.B):
        expected = official_divprune(state.tokens[b], k)
        assert len(set(expected)) == k  # distinct random tokens: the quirk does not arise
        assert sequences[b] == expected  # same picks, same order
        kept = sorted(expected)  # official keep_indexs.sort(): original order
        assert out.origin[b].tolist() == [kept.index(j) if j in kept else -1 for j in range(N0)]
        assert torch.equal(out.tokens[b], state.tokens[b, kept])  # selection: the very values
        assert torch.equal(out.positions[b], state.positions[b, kept])


def test_metric_field_matches_official_loop():
    state = make_state()
    out = DivPrune(keep=9, metric="keys")(state).check()
    for b in range(state.B):
        kept = sorted(official_divprune(state.per_token["keys"][b], 9))
        assert torch.equal(out.tokens[b], state.tokens[b, kept])
        assert torch.equal(out.per_token["keys"][b], state.per_token["keys"][b, kept])


def duplicated_state() -> TokenState:
    """Tokens e0, e1, e0, e2, e1, e2: every token has a duplicate; the cosines are exact (0 or 1)."""
    eye = torch.eye(3)
    tokens = eye[[0, 1, 0, 2, 1, 2]] * torch.tensor([1.0, 2.0, 3.0, 1.0, 0.5, 4.0])[:, None]
    return TokenState.from_patches(tokens[None], (2, 3))


def test_official_picks_a_token_twice_and_arrcoc_masks_it():
    state = duplicated_state()
    # Official: every first-step score is 0 (each token's duplicate) -> token 0; then 1, 3; then every score is 0
    # again and argmax takes token 0 a second time, so the LLM is fed token 0 twice.
    assert official_divprune(state.tokens[0], 4) == [0, 1, 3, 0]
    assert picks(state, 4, mask_chosen=False) == [[0, 1, 3, 0]]
    # arrcoc's default masks chosen tokens: the first unchosen token among the zero scores, 2.
    assert picks(state, 4) == [[0, 1, 3, 2]]
    out = DivPrune(keep=4)(state).check()
    assert out.origin[0].tolist() == [0, 1, 2, 3, -1, -1]
    # The official sequence: the repeated token is kept once, so the image hands on 3 tokens, not 4.
    official = DivPrune(keep=4, mask_chosen=False)(state).check()
    assert official.counts.tolist() == [3]
    assert official.origin[0].tolist() == [0, 1, -1, 2, -1, -1]
    assert torch.equal(official.tokens[0], state.tokens[0, [0, 1, 3]])


def test_ties_broken_by_index_and_scale_free():
    # Four copies of two directions, scaled differently: cosines tie exactly, the lower index wins.
    tokens = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    state = TokenState.from_patches(tokens[None], (1, 5))
    assert picks(state, 2) == [[0, 1]]
    assert picks(state, 5) == [[0, 1, 2, 3, 4]]


def ragged(state: TokenState, counts=(64, 50, 37), seed=1) -> TokenState:
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(state.N, generator=g) for _ in counts])
    valid = torch.arange(state.N)[None, :] < torch.tensor(counts)[:, None]
    return ops.keep(state, index, valid).check()


def with_duplicates(state: TokenState) -> TokenState:
    """Every other token a scaled copy of its neighbour: exact ties everywhere."""
    tokens = state.tokens.clone()
    tokens[:, 1::2] = 2.5 * tokens[:, 0::2]
    return dataclasses.replace(state, tokens=tokens)


@pytest.mark.parametrize("params", [{"keep": 12}, {"keep": 0.3}, {"keep": 0.3, "mask_chosen": False}])
@pytest.mark.parametrize("dups", [False, True], ids=["random", "duplicates"])
def test_ragged_batch_equals_per_image_runs(params, dups):
    state = ragged(with_duplicates(make_state()) if dups else make_state())
    plugin = DivPrune(**params)
    out = plugin(state).check()
    if "mask_chosen" not in params:
        expected = [12] * 3 if params["keep"] == 12 else [round(0.3 * n) for n in (64, 50, 37)]  # 19, 15, 11
        assert out.counts.tolist() == expected
    for b in range(state.B):
        one = plugin(state.image(b)).check()
        n = int(one.counts[0])
        assert int(out.counts[b]) == n
        assert torch.equal(out.tokens[b, :n], one.tokens[0])
        assert torch.equal(out.origin[b], one.origin[0])
        assert torch.equal(out.positions[b, :n], one.positions[0])
        assert (out.tokens[b, n:] == 0).all()


def test_duplicates_never_both_kept_before_every_direction_is():
    # 32 directions, each twice: the 32 picks are one of each pair (a duplicate is at distance 0 from its twin).
    out = DivPrune(keep=32)(with_duplicates(make_state())).check()
    kept = (out.origin >= 0).view(3, 32, 2)  # [image, pair (patches 2i, 2i + 1), twin]
    assert kept.sum(-1).eq(1).all()


def test_padding_never_chosen():
    state = ragged(make_state())
    g = torch.Generator().manual_seed(3)
    # Padding opposite to the image's mean token, each slot different: farther from every real token (and from
    # each other) than real tokens are, so an unmasked score would pick it first.
    mean = (state.tokens * state.mask[..., None]).sum(1, keepdim=True)
    far = -10 * mean + torch.randn(state.tokens.shape, generator=g)
    features = torch.where(state.mask[..., None], state.tokens, far)
    unmasked, _ = divprune_select(divprune_distances(features), torch.ones_like(state.mask), torch.tensor([20] * 3))
    assert not state.mask.gather(1, unmasked).all()  # the padding would be chosen without the mask
    index, valid = divprune_select(divprune_distances(features), state.mask, torch.tensor([20, 20, 20]))
    assert valid.all() and state.mask.gather(1, index).all()
    for b in range(state.B):
        real = features[b, state.mask[b]]
        order = torch.nonzero(state.mask[b]).squeeze(1)
        assert index[b].tolist() == order[official_divprune(real, 20)].tolist()


def test_one_token_image_keeps_it():
    state = TokenState.from_patches(torch.randn(1, 1, 4), (1, 1))
    assert DivPrune(keep=1)(state).check().origin.tolist() == [[0]]
    assert DivPrune(keep=0.098)(state).check().counts.tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_dtype_ranks_as_float32(dtype):
    state = make_state()
    low = dataclasses.replace(state, tokens=state.tokens.to(dtype))
    out = DivPrune(keep=10)(low).check()
    ref = DivPrune(keep=10)(dataclasses.replace(state, tokens=low.tokens.float())).check()
    assert out.dtype == dtype
    assert torch.equal(out.origin, ref.origin)


def test_budget_counts_like_official_round():
    counts = torch.tensor([576, 576, 10, 14, 2340])
    assert divprune_budget(0.098, counts).tolist() == [56, 56, 1, 1, 229]  # run_Divprune.sh SUBSET_RATIO
    for k in (64, 128, 192):
        assert divprune_budget(k / 576, counts[:1]).tolist() == [k]
    # LightCompress's 1 - reduction_ratio (0.8889 / 0.7778 / 0.6667): 63.99 / 127.99 / 191.98 tokens, which
    # int(round(...)) makes 64 / 128 / 192 where a floor would give 63 / 127 / 191.
    for reduction, k in ((0.8889, 64), (0.7778, 128), (0.6667, 192)):
        assert divprune_budget(1 - reduction, counts[:1]).tolist() == [k]
    assert divprune_budget(0.25, counts[2:4]).tolist() == [2, 4]  # 2.5 -> 2, 3.5 -> 4: half to even
    assert divprune_budget(64, counts[:2]).tolist() == [64, 64]


def test_budget_rule_reaches_its_targets():
    context = BudgetContext(tokens=N0, original=N0, grid=(H, W), layers=4)
    assert DivPrune.budget_bounds({}, context) == (1.0, float(N0))
    state = make_state()
    for target in (1.0, 7.4, 16.0, 63.6):
        params = DivPrune.budget_params({"mask_chosen": True}, target, context)
        assert params == {"mask_chosen": True, "keep": round(target)}
        assert DivPrune(**params)(state).counts.tolist() == [round(target)] * 3


def test_bad_inputs():
    state = make_state()
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        DivPrune(keep=1.5)
    with pytest.raises(ParamsError, match="threshold_ratio"):
        DivPrune(threshold_ratio=0.1)
    with pytest.raises(BudgetError, match="divprune.keep: asked to keep 65 tokens, but an image has only 64"):
        DivPrune(keep=65)(state)
    with pytest.raises(BudgetError, match="divprune.keep: asked to keep 40 tokens, but an image has only 37"):
        DivPrune(keep=40)(ragged(state))
    with pytest.raises(MissingInputError, match=r"divprune.metric: needs per_token\['values'\].*\['keys'\]"):
        DivPrune(metric="values")(state)
    scores = state.with_per_token(score=torch.rand(3, N0))
    with pytest.raises(InputError, match=r"per_token\['score'\] as floating \[B, N, C\].*\[3, 64\]"):
        DivPrune(metric="score")(scores)


TINY = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}}


def test_pipeline_with_tiny_vit():
    spec = {"name": "dp", "encoder": TINY, "compress": [{"use": "divprune", "keep": 5}]}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = arrcoc.run_pipeline(spec, images, device="cpu").check()
    # The trace counts the class token, which stays apart (state.cls) and is never a candidate.
    assert state.trace[-1].tokens_in == (17, 17) and state.trace[-1].tokens_out == (6, 6)
    assert state.counts.tolist() == [5, 5] and state.cls is not None


def test_builtin_pipeline_file_loads():
    spec = arrcoc.resolve_spec("divprune")
    assert [s.as_yaml_dict() for s in spec.compress] == [{"use": "divprune", "keep": 64}]
    assert spec.encoder.params["model"] == "vit_large_patch14_clip_336.openai"


def test_selection_over_the_whole_image_is_the_default_and_asks_for_packed_images():
    # Official: one selection over each image's whole sequence at the LLM input (LLaVA-NeXT: base view, unpadded
    # crops and newline tokens); the flag tells a model integration to hand the image packed. One row per image is
    # that sequence already: 'image' and 'view' pick the same.
    assert DivPrune().params.selection == "image" and DivPrune().packed_images is True
    assert DivPrune(selection="view").packed_images is False
    state = make_state()
    whole, apart = DivPrune(keep=10)(state).check(), DivPrune(keep=10, selection="view")(state).check()
    assert torch.equal(whole.origin, apart.origin) and torch.equal(whole.tokens, apart.tokens)
    for b in range(3):
        assert [j for j in range(N0) if whole.origin[b, j] >= 0] == sorted(official_divprune(state.tokens[b], 10))
    with pytest.raises(ParamsError, match="selection"):
        DivPrune(selection="crop")
