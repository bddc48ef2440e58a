"""Budgets (arrcoc/budget.py and each plugin's rule): a fraction of the visual tokens -> each stage's params.

The token counts these params produce inside a model are measured in
tests/evaluation/test_eval_budgets.py; here the rules themselves, without a model.
"""

from __future__ import annotations

import math

import pytest

from arrcoc.budget import bisect_increasing, geometric_rounds, layer_mean, nearest, plan_budget
from arrcoc.errors import BudgetError
from arrcoc.plugin import BudgetContext, budget_count
from arrcoc.spec import parse_spec, resolve_spec
from arrcoc_plugins.allocators.homunculus import budget_tiers
from arrcoc_plugins.compressors.aim import AIMPrune
from arrcoc_plugins.compressors.fastv import FastV
from arrcoc_plugins.compressors.prumerge import PruMergePlus
from arrcoc_plugins.compressors.sparsevlm import SparseVLMLLM, recycle_plan, recycled_clusters, recycled_keep

TOY = dict(original=256, grid=(16, 16), layers=3, has_cls=True)   # the ToyVQA model's tower and LLM
ENC = {"use": "timm_vit"}


def plan(stages: dict, fraction: float, **context):
    return plan_budget(parse_spec({"encoder": ENC, **stages}), fraction, **{**TOY, **context})


def ctx(tokens: int = 256, **kw) -> BudgetContext:
    return BudgetContext(**{"tokens": tokens, **TOY, **kw})


# ---------------------------------------------------------------- single stages
@pytest.mark.parametrize("fraction, keep", [(1.0, 256), (0.5, 128), (0.25, 64), (0.125, 32), (0.05, 13)])
def test_keep_becomes_a_count(fraction, keep):
    p = plan({"compress": [{"use": "random_keep", "keep": 0.25, "seed": 3}]}, fraction)
    assert p.params == {"compress[0]": {"keep": keep}}
    assert p.spec.compress[0].params == {"keep": keep, "seed": 3}  # other params kept
    assert p.target == pytest.approx(fraction * 256)


def test_budget_count_rounds_and_stays_in_range():
    assert [budget_count(t, 10) for t in (0.2, 0.5, 1.49, 1.5, 9.7, 30.0)] == [1, 1, 1, 2, 10, 10]


def test_visionzip_counts_the_class_token_that_never_reaches_the_llm():
    p = plan({"compress": [{"use": "visionzip", "dominant": 54, "contextual": 10}]}, 0.25)
    assert p.spec.compress[0].params == {"keep": 65}
    assert plan({"compress": [{"use": "visionzip"}]}, 0.25, has_cls=False).spec.compress[0].params == {"keep": 64}


def test_pool_budget_replaces_the_stride():
    p = plan({"compress": [{"use": "pool", "stride": 2}]}, 0.125)
    assert p.spec.compress[0].params == {"keep": 32}


@pytest.mark.parametrize("fraction, r", [(1.0, [0]), (0.5, [128]), (0.25, [128, 64]), (0.125, [128, 64, 32])])
def test_tome_after_the_tower_merges_in_rounds_of_at_most_half(fraction, r):
    assert plan({"compress": [{"use": "tome", "r": 8}]}, fraction).spec.compress[0].params["r"] == r


def test_tome_merges_once_per_encoder_block_when_it_knows_them():
    p = plan({"compress": [{"use": "tome", "r": 8}]}, 0.5, encoder_layers=4)
    assert p.spec.compress[0].params["r"] == [41, 34, 29, 24]  # 256 -> 215 -> 181 -> 152 -> 128


def test_geometric_rounds():
    half = lambda c: -(-c // 2)  # noqa: E731
    assert geometric_rounds(256, 64, 2, half) == [128, 64]
    assert geometric_rounds(256, 13, 2, half) == [141, 78, 43, 24, 13]  # 2 rounds cannot: 5 do
    counts = geometric_rounds(1000, 7, 1, half)
    before = [1000, *counts[:-1]]
    assert counts[-1] == 7 and all(c >= half(b) for b, c in zip(before, counts))
    assert geometric_rounds(50, 50, 2, half) == [50, 50]
    with pytest.raises(BudgetError, match="target"):
        geometric_rounds(10, 11, 1, half)


def test_bisect_increasing_brackets_the_first_step_that_reaches_the_target():
    steps = lambda x: math.floor(10 * x)  # noqa: E731  a step function, like a rule's whole-token output
    low, high = bisect_increasing(steps, 3, 0.0, 1.0)
    assert steps(low) == 2 and steps(high) == 3
    assert math.nextafter(low, 1.0) == high == pytest.approx(0.3, abs=1e-15)  # 60 halvings: neighbouring floats
    assert nearest(steps, 3, (low, high)) == high
    assert nearest(lambda x: x, 1.0, (0.5, 1.5)) == 0.5  # a tie: the first candidate
    # A non-increasing function: bisect its negation (AIM's mean falls as the step grows).
    falling = lambda x: 10 - steps(x)  # noqa: E731
    low, high = bisect_increasing(lambda x: -falling(x), -7, 0.0, 1.0)
    assert falling(low) == 8 and falling(high) == 7
    # A target out of range: the bracket closes on the end that comes nearest.
    assert bisect_increasing(steps, 99, 0.0, 1.0, steps=10) == (1.0 - 2.0 ** -10, 1.0)
    assert bisect_increasing(steps, -1, 0.0, 1.0, steps=10) == (0.0, 2.0 ** -10)


def test_layer_mean_is_the_mean_over_decoder_layers_of_the_visual_tokens_seen():
    assert layer_mean(256, 3, []) == 256
    assert layer_mean(256, 3, [(1, 64)]) == (256 + 64 + 64) / 3 == fastv_mean(256, 3, 1, 64)
    assert layer_mean(576, 32, [(3, 300), (7, 200), (16, 110)]) == (3 * 576 + 4 * 300 + 9 * 200 + 16 * 110) / 32
    per_layer = [10, 10, 7, 7, 7, 4, 0, 0]
    changes = [(l, c) for l, c in enumerate(per_layer) if l and c != per_layer[l - 1]]
    assert layer_mean(10, 8, changes) == sum(per_layer) / 8
    assert layer_mean(10, 8, [(8, 0)]) == 10  # a change at the output of the last layer is never seen
    with pytest.raises(BudgetError, match=r"layer_mean: expected non-decreasing layers in \[0, 8\], got 2 after 5"):
        layer_mean(10, 8, [(5, 4), (2, 1)])
    with pytest.raises(BudgetError, match="got 9"):
        layer_mean(10, 8, [(9, 4)])


def test_aim_merge_keeps_the_official_two_rounds_when_they_suffice():
    assert plan({"compress": [{"use": "aim_merge"}]}, 0.25).spec.compress[0].params["keep"] == [128, 64]
    assert plan({"compress": [{"use": "aim_merge"}]}, 1.0).spec.compress[0].params["keep"] == [256, 256]


def test_sparsevlm_recycling_is_counted():
    # recycle_plan's counts: d deleted -> m = min(int(0.3 d) + 1, d) recycled -> min(m // 10 + 1, m) clusters.
    import torch

    for d in (0, 1, 2, 9, 33, 255):
        n = 256
        mask = torch.ones(1, n, dtype=torch.bool)
        keep_index = torch.arange(n - d)[None]
        _, _, clusters = recycle_plan(torch.rand(1, n), keep_index, torch.ones_like(keep_index, dtype=torch.bool),
                                      mask)
        assert int(clusters) == recycled_clusters(d)
    k = recycled_keep(256, 64)
    assert k + recycled_clusters(256 - k) == 64 and k < 64
    assert recycled_keep(256, 256) == 256  # nothing deleted, nothing recycled
    p = plan({"compress": [{"use": "sparsevlm", "recycle": True}]}, 0.25)
    keep = p.spec.compress[0].params["keep"]
    assert keep + recycled_clusters(256 - keep) == 64


def test_prumerge_counts_its_extra_token():
    assert plan({"compress": [{"use": "prumerge"}]}, 0.25).spec.compress[0].params == {"keep": 63}
    assert plan({"compress": [{"use": "prumerge"}]}, 1.0).spec.compress[0].params == {"keep": 256}


def test_prumerge_plus_picks_the_nearest_expected_count():
    n = 256
    k = plan({"compress": [{"use": "prumerge_plus"}]}, 0.25).spec.compress[0].params["keep"]
    best = min(abs(PruMergePlus.expected_tokens(n, j) - 64) for j in range(1, n + 1))
    assert abs(PruMergePlus.expected_tokens(n, k) - 64) == best < 1.0
    # Its stride moves in jumps: at 50 % the nearest expected count is about 143, not 128.
    k = plan({"compress": [{"use": "prumerge_plus"}]}, 0.5).spec.compress[0].params["keep"]
    assert 140 < PruMergePlus.expected_tokens(n, k) < 146


# ------------------------------------------------------------------ in the LLM
def fastv_mean(n, L, K, keep):
    return (K * n + (L - K) * keep) / L


def test_fastv_keeps_its_layer_when_the_budget_allows_and_moves_earlier_when_not():
    p = plan({"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}, 0.8, layers=8)
    (params,) = p.params.values()
    assert params == {"keep": 188} and fastv_mean(256, 8, 2, 188) == pytest.approx(0.8 * 256, abs=1)
    p = plan({"llm": [{"use": "fastv"}]}, 0.5)  # 3 layers: K = 2 would need a negative keep
    assert p.spec.llm[0].params == {"layer": 1, "keep": 64}
    assert fastv_mean(256, 3, 1, 64) == 128


def test_in_llm_budget_below_the_first_layers_is_unreachable_and_says_why():
    with pytest.raises(BudgetError, match=r"out of reach.*fewest it can hand on is about 86\.0.*fastv"):
        plan({"llm": [{"use": "fastv"}]}, 0.25)
    with pytest.raises(BudgetError, match="out of reach"):
        plan({"llm": [{"use": "sparsevlm_llm"}]}, 0.25)


def test_sparsevlm_llm_layers_scale_to_the_depth_and_the_mean_meets_the_budget():
    assert SparseVLMLLM.budget_layers({}, 32) == [2, 6, 15]  # the official model: unchanged
    assert SparseVLMLLM.budget_layers({}, 3) == [0, 1]
    p = plan({"llm": [{"use": "sparsevlm_llm"}]}, 0.5)
    params = p.spec.llm[0].params
    assert params["layers"] == [0, 1] and len(params["keep"]) == 2
    # Recompute the layer mean from the chosen counts, recycling included.
    outs, present = [], 256
    for k in params["keep"]:
        present = k + recycled_clusters(present - k)
        outs.append(present)
    assert (256 + outs[0] + outs[1]) / 3 == pytest.approx(128, abs=1)


def test_aim_prune_start_and_step():
    params = plan({"llm": [{"use": "aim_prune"}]}, 0.5).spec.llm[0].params
    mean = AIMPrune._mean(256, 3, params["start_layer"], params["step"])
    assert mean == pytest.approx(128, abs=1)
    # Every token: a step so small that int(n * (1 - step)) is still n, at the last layer it may act at.
    params = plan({"llm": [{"use": "aim_prune"}]}, 1.0).spec.llm[0].params
    assert params["start_layer"] == 1 and math.floor(256 * (1 - params["step"]) + 1e-9) == 256
    # The official start (14 of 28) scales to the middle of a 28-layer LLM and stays there when it can.
    params = plan({"llm": [{"use": "aim_prune"}]}, 0.75, layers=28).spec.llm[0].params
    assert params["start_layer"] == 14


# ----------------------------------------------------------------- multi-stage
def test_stages_share_the_budget_and_the_last_meets_it_exactly():
    p = plan({"compress": [{"use": "random_keep", "keep": 0.5}, {"use": "hired", "keep": 0.5}]}, 0.25)
    a, b = p.spec.compress[0].params["keep"], p.spec.compress[1].params["keep"]
    assert (a, b) == (128, 64)  # sqrt(0.25) each, then exactly 64


def test_a_stage_with_a_floor_gets_its_floor_and_the_others_give_more():
    # fastv on 3 layers cannot hand on less than about a third: hired gives up the rest.
    p = plan({"compress": [{"use": "hired", "keep": 0.5}], "llm": [{"use": "fastv"}]}, 0.05)
    hired = p.spec.compress[0].params["keep"]
    layer, keep = p.spec.llm[0].params["layer"], p.spec.llm[0].params["keep"]
    assert fastv_mean(hired, 3, layer, keep) == pytest.approx(12.8, abs=0.5)
    assert (layer, keep) == (1, 1)  # fastv at its floor ...
    assert hired < 256 * math.sqrt(0.05) / 1.5  # ... hired well below its geometric share (57)


def test_arr_coc_budget_sets_selection_and_tiers():
    p = plan_budget(resolve_spec("arr_coc"), 0.25, **TOY)
    keep = p.spec.compress[0].params["keep"]
    tiers = p.spec.allocate.params["tiers"]
    assert keep == 128 and sum(c * k for c, k in tiers) == 64
    assert sum(c for c, _ in tiers) <= math.ceil(keep / 4)  # never more regions than the selection fills


@pytest.mark.parametrize("target", [1, 13, 32, 64, 94, 128, 256])
def test_budget_tiers_hit_the_count_and_keep_the_template_order(target):
    tiers = budget_tiers([(6, 8), (10, 3), (16, 1)], target, 64, 4)
    assert sum(c * k for c, k in tiers) == target
    assert sum(c for c, _ in tiers) <= 64 and all(1 <= k <= 64 for _, k in tiers)
    ks = [k for c, k in tiers for _ in range(c)]
    assert ks == sorted(ks, reverse=True)  # the most relevant regions still get the most tokens


def test_every_shipped_pipeline_plans_at_full_budget_with_its_own_params():
    from arrcoc.evaluation import post_tower
    from arrcoc.spec import available_pipelines

    # DART's official count keeps 4 + 8 floor(M / 8) of at most N - 4 candidates: never every token.
    never_all = {"dart": "out of reach for 'dart': the most it can hand on"}
    for name in available_pipelines():
        spec, _ = post_tower(resolve_spec(name))
        if name in never_all:
            with pytest.raises(BudgetError, match=never_all[name]):
                plan_budget(spec, 1.0, **TOY)
            continue
        p = plan_budget(spec, 1.0, **TOY)
        assert p.params, name


# ----------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(BudgetError, match=r"in \(0, 1\]"):
        plan({"compress": [{"use": "random_keep"}]}, 1.5)
    with pytest.raises(BudgetError, match="no stage that sets a token count"):
        plan({"score": [{"use": "saliency"}]}, 0.5)
    with pytest.raises(BudgetError, match="at most one llm: stage"):
        plan({"llm": [{"use": "fastv"}, {"use": "fastv", "layer": 3}]}, 0.9, layers=8)
    with pytest.raises(BudgetError, match="in_blocks"):
        plan_budget(resolve_spec("tome"), 0.5, **TOY)


def test_a_compressor_without_a_rule_is_refused_by_name():
    from arrcoc.hookspecs import hookimpl
    from arrcoc.plugin import Compressor, Params as BaseParams
    from arrcoc.registry import get_registry

    class NoRule(Compressor):
        name = "no_rule_for_budget_test"
        Params = type("NoRuleParams", (BaseParams,), {})

        def __call__(self, state):
            return state

    class Provider:
        @hookimpl
        def arrcoc_register_plugins(self, register):
            register(NoRule)

    registry = get_registry()
    registry.register(Provider(), name="no_rule_module")
    try:
        with pytest.raises(BudgetError, match="no_rule_for_budget_test.*no `keep` param"):
            plan({"compress": [{"use": "no_rule_for_budget_test"}]}, 0.5)
    finally:
        registry.unregister("no_rule_module")
