"""SCOPE: equivalence with the official greedy loop, ragged batches, ties, errors, budget rule, pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError, ParamsError
from arrcoc.plugin import BudgetContext
from arrcoc.state import TokenState
from arrcoc_plugins.compressors.scope import Scope, cosine_matrix, coverage_gains, saliency_power, scope_select

H = W = 8
N0 = H * W


def make_state(B=3, D=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_patches(
        torch.randn(B, N0, D, generator=g).to(dtype), (H, W), cls_token=torch.randn(B, D, generator=g).to(dtype),
        per_token={"cls_attn": torch.rand(B, N0, generator=g).softmax(-1)},
    )


def reference(features, cls_attn, k, alpha=1.0, combined="multi"):
    """Official ``SCOPE`` (kinredon/SCOPE scope/clip_encoder.py) for one image, plain torch.

    Returns the picks in pick order."""
    x = features[None]
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = torch.bmm(unit, unit.transpose(1, 2))
    n = x.shape[1]
    selected = torch.zeros(1, n, dtype=torch.bool)
    cur_max = torch.zeros(1, n, dtype=x.dtype)
    powered = cls_attn[None].to(x.dtype) ** alpha
    picks = []
    for _ in range(k):
        gains = torch.maximum(torch.zeros(1, dtype=x.dtype),
                              sim.masked_fill(selected.unsqueeze(1), 0) - cur_max.unsqueeze(2)).sum(dim=1)
        gains = gains * powered if combined == "multi" else gains + powered
        gains = gains.masked_fill(selected, float("-inf"))
        best = int(gains.argmax(dim=1))
        selected[0, best] = True
        picks.append(best)
        cur_max = torch.maximum(cur_max, sim[0, best][None])
    return picks


@pytest.mark.parametrize("keep, alpha, combine", [(10, 1.0, "multi"), (1, 1.0, "multi"), (32, 0.5, "multi"),
                                                  (16, 2.0, "add"), (N0, 1.0, "multi")])
def test_matches_official_loop(keep, alpha, combine):
    state = make_state()
    heads = 4
    out = Scope(keep=keep, alpha=alpha, combine=combine, heads=heads)(state).check()
    assert out.counts.tolist() == [keep] * state.B
    saliency = state.per_token["cls_attn"] * (heads if combine == "add" else 1)
    picked, valid = scope_select(state.tokens, saliency, state.mask, torch.full((state.B,), keep),
                                 alpha=alpha, combine=combine)
    assert valid.all()
    for b in range(state.B):
        picks = reference(state.tokens[b], saliency[b], keep, alpha, combine)
        assert picked[b].tolist() == picks  # same picks, same pick order
        kept = sorted(picks)  # the output keeps the original order (official masked_select)
        assert out.origin[b][out.origin[b] >= 0].tolist() == list(range(keep))
        assert torch.equal(out.tokens[b], state.tokens[b, kept])
        assert [j for j in range(N0) if out.origin[b, j] >= 0] == kept
        assert torch.equal(out.cls[b], state.cls[b])  # the class token stays apart


def test_score_null_is_the_official_uniform_saliency():
    state = make_state().replace(per_token={})
    out = Scope(keep=12, score=None)(state).check()
    assert Scope(score=None).requirements() == frozenset() and Scope().requirements() == {"cls_attention"}
    assert Scope(score="attn_received").requirements() == {"attention_received"}
    for b in range(state.B):
        picks = reference(state.tokens[b], torch.ones(N0), 12)
        assert [j for j in range(N0) if out.origin[b, j] >= 0] == sorted(picks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_score_null_with_add_is_the_official_ones_not_scaled_by_heads(dtype):
    # Official cls_attn=None: gain + 1 exactly; the head factor belongs to the CLS attention only (gain + 16
    # would round the small late gains away and break their ties differently).
    state = make_state(dtype=dtype).replace(per_token={}).with_meta(num_heads=16)
    out = Scope(keep=24, score=None, combine="add")(state).check()
    for b in range(state.B):
        picks = reference(state.tokens[b], torch.ones(N0), 24, combined="add")
        assert [j for j in range(N0) if out.origin[b, j] >= 0] == sorted(picks)


def test_multi_is_invariant_to_the_head_scale_and_add_is_not():
    state = make_state()
    mean, summed = Scope(keep=12)(state), Scope(keep=12)(state.with_per_token(cls_attn=state.per_token["cls_attn"] * 16))
    assert torch.equal(mean.origin, summed.origin)
    add1, add16 = Scope(keep=12, combine="add", heads=1)(state), Scope(keep=12, combine="add", heads=16)(state)
    assert not torch.equal(add1.origin, add16.origin)
    # heads defaults to meta['num_heads'] (timm_vit sets it)
    assert torch.equal(Scope(keep=12, combine="add")(state.with_meta(num_heads=16)).origin, add16.origin)
    assert torch.equal(Scope(keep=12, combine="add")(state).origin, add1.origin)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_computes_in_the_feature_dtype_like_the_official_code(dtype):
    state = make_state(dtype=dtype)
    out = Scope(keep=20)(state).check()
    assert out.dtype == dtype
    for b in range(state.B):
        picks = reference(state.tokens[b], state.per_token["cls_attn"][b], 20)
        assert [j for j in range(N0) if out.origin[b, j] >= 0] == sorted(picks)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gains_are_summed_as_the_official_sum(device, dtype):
    # Official: the fp16 ``max(0, S - cur_max).sum(dim=1)``, accumulated in float32 and rounded once. An fp16
    # running sum on CUDA rounds each of the 576 partial sums instead (several ulps off at these magnitudes).
    g = torch.Generator().manual_seed(7)
    B, N = 2, 576
    similarity = torch.rand(B, N, N, generator=g).to(dtype).to(device)
    cur_max = (0.5 * torch.rand(B, N, generator=g)).to(dtype).to(device)
    gains = coverage_gains(similarity, cur_max)
    assert gains.dtype == dtype
    expected = (similarity - cur_max[:, :, None]).clamp_min(0).sum(dim=1)  # the official line, as it runs
    exact = (similarity - cur_max[:, :, None]).clamp_min(0).double().sum(dim=1)
    assert (expected.double() - exact).abs().max() <= exact.max() * torch.finfo(dtype).eps  # half an ulp + slack
    torch.testing.assert_close(gains, expected, rtol=torch.finfo(dtype).eps, atol=0)


def gains_case(dtype, counts, seed=0, steps=3, device="cpu"):
    """A padded batch of cosine matrices (images of ``counts`` tokens; padding rows and columns 0, as
    ``cosine_matrix`` gives) and a ``cur_max`` after ``steps`` picks."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(counts), max(counts)
    mask = torch.arange(N)[None, :] < torch.tensor(counts)[:, None]
    features = (torch.randn(B, N, 16, generator=g) + torch.randn(B, 1, 16, generator=g)).to(dtype)
    similarity = cosine_matrix(features, mask)
    cur_max = torch.zeros(B, N, dtype=dtype)
    for _ in range(steps):
        best = torch.randint(0, N, (B,), generator=g) % torch.tensor(counts)
        cur_max = torch.maximum(cur_max, similarity[torch.arange(B), best])
    return similarity.to(device), cur_max.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("counts", [(1, 1), (2, 1), (31, 5), (32, 33, 1), (33, 32), (100, 64, 7, 96),
                                    (577, 300, 33, 512, 513)])
def test_gains_of_an_image_do_not_depend_on_the_padding_or_the_batch(device, dtype, counts):
    # The rows are summed by halving from the largest power of two below N: in a batch the steps above the image's
    # own add exact zeros, then come the image alone's steps on the same values.
    similarity, cur_max = gains_case(dtype, counts, device=device)
    gains = coverage_gains(similarity, cur_max)
    assert gains.dtype == dtype
    for b, n in enumerate(counts):
        alone = coverage_gains(similarity[b : b + 1, :n, :n].contiguous(), cur_max[b : b + 1, :n].contiguous())
        assert torch.equal(gains[b, :n], alone[0])
        assert torch.equal(alone[0], coverage_gains(similarity[b : b + 1], cur_max[b : b + 1])[0, :n])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gains_are_the_exact_sum_rounded(device, dtype):
    # Every term is a multiple of 2^-24 below 2 (fp16 always; bf16 here, from float32 rand): the float64 sums are
    # exact in any order, so a gain is the exact sum rounded to float32 and then to the dtype, on any device.
    g = torch.Generator().manual_seed(7)
    B, N = 2, 576
    similarity = torch.rand(B, N, N, generator=g).to(dtype).to(device)
    cur_max = (0.5 * torch.rand(B, N, generator=g)).to(dtype).to(device)
    exact = (similarity - cur_max[:, :, None]).clamp_min(0).double().sum(dim=1)
    assert torch.equal(coverage_gains(similarity, cur_max), exact.float().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts", [(64, 50, 37), (577, 300, 33)])
def test_gains_equal_the_running_sum_they_replaced(dtype, counts):
    # The gains were a float32 cumsum over the rows read at each image's last real row (on the CPU a scan that
    # accumulates in double, 2-7x the time): the same values (fp16 exactly, for any input; float32 / bf16 as long
    # as the double sums are exact, as they are for these cosines).
    similarity, cur_max = gains_case(dtype, counts, seed=3, steps=5)
    last_row = (torch.tensor(counts) - 1)[:, None, None].expand(len(counts), 1, max(counts))
    running = (similarity - cur_max[:, :, None]).clamp_min(0).cumsum(1, dtype=torch.float32)
    assert torch.equal(coverage_gains(similarity, cur_max), running.gather(1, last_row).squeeze(1).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_gains_of_no_token(device):
    similarity = torch.zeros(2, 0, 0, device=device)
    assert coverage_gains(similarity, torch.zeros(2, 0, device=device)).shape == (2, 0)


def ragged(state: TokenState, counts=(64, 50, 37), seed=1) -> TokenState:
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(N0, generator=g) for _ in counts])
    valid = torch.arange(N0)[None, :] < torch.tensor(counts)[:, None]
    return ops.keep(state, index, valid).check()


@pytest.mark.parametrize("keep", [9, 0.3])
def test_ragged_batch_equals_per_image_runs(keep):
    state = ragged(make_state())
    # padding gets the highest saliency and features: must never count nor be picked
    state = state.with_per_token(cls_attn=state.per_token["cls_attn"].masked_fill(~state.mask, 10.0))
    state = dataclasses.replace(state, tokens=state.tokens.masked_fill(~state.mask[..., None], 5.0))
    plugin = Scope(keep=keep)
    out = plugin(state).check()
    expected = [9] * 3 if keep == 9 else [int(n * 0.3) for n in (64, 50, 37)]
    assert out.counts.tolist() == expected
    for b in range(state.B):
        one = plugin(state.image(b)).check()
        n = int(one.counts[0])
        assert torch.equal(out.tokens[b, :n], one.tokens[0])
        assert torch.equal(out.origin[b], one.origin[0])
        assert torch.equal(out.positions[b, :n], one.positions[0])
        assert (out.tokens[b, n:] == 0).all()


def test_a_mask_with_holes_picks_as_the_real_tokens_alone():
    # scope_select is public: a mask that is not a prefix must still sum every real row of the gains.
    g = torch.Generator().manual_seed(4)
    features, saliency = torch.randn(2, N0, 6, generator=g), torch.rand(2, N0, generator=g)
    mask = torch.rand(2, N0, generator=g) > 0.3
    picked, valid = scope_select(features, saliency, mask, torch.tensor([12, 7]))
    for b in range(2):
        real = mask[b].nonzero()[:, 0]
        expected = real[reference(features[b, real], saliency[b, real], int(valid[b].sum()))].tolist()
        assert picked[b, valid[b]].tolist() == expected


def test_ties_broken_by_index():
    # Identical tokens and saliency: every gain ties at each step, so the picks are the first indices.
    state = TokenState.from_patches(torch.ones(2, N0, 6), (H, W), per_token={"cls_attn": torch.full((2, N0), 0.5)})
    picked, _ = scope_select(state.tokens, state.per_token["cls_attn"], state.mask, torch.tensor([5, 5]))
    assert picked.tolist() == [[0, 1, 2, 3, 4]] * 2
    out = Scope(keep=5)(state)
    assert out.origin[0].tolist() == [0, 1, 2, 3, 4] + [-1] * (N0 - 5)
    # two equal best candidates: the lower index first
    tokens = torch.eye(N0)[None, :, :8].clone()  # tokens 0..7 orthogonal, the rest zero vectors
    sal = torch.ones(1, N0)
    picked, _ = scope_select(tokens, sal, torch.ones(1, N0, dtype=torch.bool), torch.tensor([3]))
    assert picked.tolist() == [[0, 1, 2]]


def duplicates_state(dtype=torch.float32) -> TokenState:
    """Two 2 x 9 images, ~30% of each image's tokens (with their attention) exact copies of its token 0, a peaked
    attention (the property test's counterexample: seed 0, dups, attn 'peaked')."""
    g = torch.Generator().manual_seed(0)
    B, N, D = 2, 18, 2
    tokens = torch.randn(B, N, D, generator=g)
    torch.randn(B, N, 1, generator=g)  # (the property test's keys: keeps the generator's stream)
    attn = (2.5 * torch.randn(B, N, generator=g)).softmax(-1)
    torch.rand(B, N, generator=g)  # (its attn_from_last)
    copies = torch.rand(B, N, generator=g) < 0.3
    tokens = torch.where(copies[..., None], tokens[:, :1], tokens)
    attn = torch.where(copies, attn[:, :1], attn)
    return TokenState.from_patches(tokens.to(dtype), (2, 9), per_token={"cls_attn": attn.to(dtype)})


def test_exact_duplicates_in_a_batch_pick_as_the_image_alone():
    # Image 1's tokens 0 and 14 are the same vector with the same attention: equal gains and saliency, an exact
    # tie, which the first index must win. torch's CPU pow gave entry 0 (flat position 18 of the batch, inside a
    # vectorised block, exponent rounded to float32) and entry 14 (position 32, the scalar tail, exponent in
    # float64) different powers, so the batch picked 14 and the image alone 0.
    state, alpha = duplicates_state(), 1.8946024880906709
    assert torch.equal(state.tokens[1, 0], state.tokens[1, 14])
    assert torch.equal(state.per_token["cls_attn"][1, 0], state.per_token["cls_attn"][1, 14])
    budget = torch.tensor([9, 9])
    picked, _ = scope_select(state.tokens, state.per_token["cls_attn"], state.mask, budget, alpha=alpha)
    one = state.image(1)
    alone, _ = scope_select(one.tokens, one.per_token["cls_attn"], one.mask, budget[1:], alpha=alpha)
    assert alone[0].tolist() == [6, 9, 7, 3, 2, 5, 0, 11, 15]  # step 7: 0 and 14 tie, the lower index
    assert picked[1].tolist() == alone[0].tolist()
    plugin = Scope(keep=0.5, alpha=alpha)
    out = plugin(state).check()
    assert out.origin[1].tolist() == [0, -1, 1, 2, -1, 3, 4, 5, -1, 6, -1, 7, -1, -1, -1, 8, -1, -1]
    for b in range(state.B):
        assert torch.equal(out.origin[b], plugin(state.image(b)).origin[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("alpha", [0.3, 1.8946024880906709, 2.7])
def test_saliency_power_of_an_entry_is_its_own(dtype, alpha):
    # Rows of 5, 18, 37 and 70 tokens (vector blocks and tails fall anywhere): every entry's power equals that of
    # the entry alone, in its row alone and anywhere in a batch.
    g = torch.Generator().manual_seed(9)
    saliency = (2.5 * torch.randn(4, 70, generator=g)).softmax(-1).to(dtype)
    powered = saliency_power(saliency, alpha, dtype)
    for b, n in enumerate([5, 18, 37, 70]):
        assert torch.equal(saliency_power(saliency[b, :n], alpha, dtype), powered[b, :n])
    single = torch.stack([saliency_power(s, alpha, dtype) for s in saliency.flatten()]).view_as(saliency)
    assert torch.equal(single, powered)
    # the correctly rounded power, the exponent as the official CUDA pow of a model-dtype tensor takes it
    exponent = torch.tensor(alpha, dtype=torch.promote_types(dtype, torch.float32)).item()
    expected = (saliency.double() ** exponent).to(dtype)
    if dtype == torch.float64:
        # exp(alpha log a) in float64 itself: the rounding of alpha * log(a) scales with |alpha log a| (~60 here)
        torch.testing.assert_close(powered, expected, rtol=1e-13, atol=0)
    else:
        assert torch.equal(powered, expected)


def test_saliency_power_0_and_1_are_exact_like_torch_pow():
    saliency = torch.tensor([[0.0, 1e-30, 0.25, 1.0, 3.0]])
    assert torch.equal(saliency_power(saliency, 1.0, torch.float32), saliency)
    assert torch.equal(saliency_power(saliency, 0.0, torch.float32), torch.ones_like(saliency))  # 0^0 = 1
    assert saliency_power(saliency, 0.5, torch.float32)[0, 0] == 0  # 0^alpha = 0, not NaN
    assert torch.equal(saliency_power(saliency.double(), 1.0, torch.float64), saliency.double())
    assert saliency_power(saliency, 2.0, torch.float16).dtype == torch.float16


def test_zero_feature_vector_has_zero_similarity():
    tokens = torch.randn(1, N0, 6, generator=torch.Generator().manual_seed(3))
    tokens[0, 5] = 0
    state = TokenState.from_patches(tokens, (H, W), per_token={"cls_attn": torch.rand(1, N0)})
    out = Scope(keep=N0)(state).check()
    assert torch.isfinite(out.tokens).all() and out.counts.tolist() == [N0]


def test_divide_by_batch_is_the_official_int_T_over_bs():
    state = make_state(B=3)
    out = Scope(keep=10, divide_by_batch=True)(state).check()
    assert out.counts.tolist() == [3, 3, 3]  # int(10 / 3)
    per_image = Scope(keep=3)(state)
    assert torch.equal(out.origin, per_image.origin)
    one = state.image(0)
    assert torch.equal(Scope(keep=10, divide_by_batch=True)(one).origin, Scope(keep=10)(one).origin)  # batch 1
    with pytest.raises(BudgetError, match=r"keep=2 divided by the 3 images of the batch leaves 0 tokens"):
        Scope(keep=2, divide_by_batch=True)(state)


def test_bad_inputs():
    state = make_state()
    with pytest.raises(ParamsError, match=r"ratio must lie in \(0, 1\]"):
        Scope(keep=1.5)
    with pytest.raises(ParamsError, match="combine"):
        Scope(combine="max")
    with pytest.raises(ParamsError, match="subset_ratio"):
        Scope(subset_ratio=64)
    with pytest.raises(BudgetError, match="asked to keep 65 tokens, but an image has only 64"):
        Scope(keep=65)(state)
    with pytest.raises(BudgetError, match="asked to keep 40 tokens, but an image has only 37"):
        Scope(keep=40)(ragged(state))
    with pytest.raises(MissingInputError, match=r"per_token\['cls_attn'\].*timm_vit.*layer: -2.*score: null"):
        Scope()(state.replace(per_token={}))
    with pytest.raises(InputError, match=r"must be \[B, N\] = \[3, 64\] scores, got \[3, 64, 2\]"):
        Scope()(state.with_per_token(cls_attn=torch.rand(3, 64, 2)))


def test_budget_rule_reaches_its_targets():
    context = BudgetContext(tokens=N0, original=N0, grid=(H, W), layers=4, has_cls=True)
    assert Scope.budget_bounds({"keep": 64}, context) == (1.0, float(N0))
    state = make_state()
    for target in (1, 7.4, 16, 63.6, 64):
        params = Scope.budget_params({"keep": 64, "alpha": 1.0}, target, context)
        assert params["alpha"] == 1.0
        out = Scope(**params)(state)
        assert out.counts.tolist() == [int(target + 0.5)] * 3
    with pytest.raises(BudgetError, match="divide_by_batch: true makes each image's budget depend on the batch"):
        Scope.budget_bounds({"keep": 64, "divide_by_batch": True}, context)


TINY = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}, "layer": -2}


def test_pipeline_with_tiny_vit():
    spec = {"name": "sc", "encoder": TINY, "compress": [{"use": "scope", "keep": 6}]}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = arrcoc.run_pipeline(spec, images, device="cpu").check()
    assert state.trace[-1].tokens_in == (17, 17) and state.trace[-1].tokens_out == (7, 7)  # 6 patches + CLS


def test_pipeline_missing_cls_attention_is_caught_before_running():
    enc = {**TINY, "model_kwargs": {"depth": 2, "img_size": 64, "class_token": False, "global_pool": "avg"}}
    with pytest.raises(MissingInputError, match="needs 'cls_attention'.*no class token"):
        arrcoc.load_pipeline({"encoder": enc, "compress": [{"use": "scope"}]}, device="cpu")
    # score: null (uniform saliency) needs no class token
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = arrcoc.run_pipeline({"encoder": enc, "compress": [{"use": "scope", "keep": 5, "score": None}]}, images,
                                device="cpu").check()
    assert state.trace[-1].tokens_out == (5, 5)


def test_builtin_pipeline_file_loads():
    spec = arrcoc.resolve_spec("scope")
    assert [s.use for s in spec.compress] == ["scope"] and spec.compress[0].as_yaml_dict()["keep"] == 64


def test_attention_received_saliency_is_a_field_like_cls_attn():
    # score: attn_received (towers without a class token: the attention each token receives) is read like the CLS
    # attention: the official loop with that saliency; combine: add scales it by the head count the same way.
    g = torch.Generator().manual_seed(3)
    received = torch.rand(3, N0, generator=g)
    state = make_state().replace(cls=None, per_token={"attn_received": received}).with_meta(num_heads=4)
    for combine, factor in (("multi", 1), ("add", 4)):
        out = Scope(keep=10, score="attn_received", combine=combine)(state).check()
        for b in range(3):
            picks = reference(state.tokens[b], received[b] * factor, 10, combined=combine)
            assert [j for j in range(N0) if out.origin[b, j] >= 0] == sorted(picks)
    with pytest.raises(MissingInputError, match="or `score: attn_received` for the attention each token receives"):
        Scope(keep=10)(state)
