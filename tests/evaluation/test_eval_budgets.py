"""Budgets map to the stated visual-token counts, measured from ``run.report`` inside the shipped ToyVQA model.

For every shipped pipeline and every default budget: the params the rules derive, run through
``arrcoc.hf.apply`` on a batch of four ToyVQA questions, give ``budget * 256`` visual tokens per image
(mean over the 3 decoder layers) within the tolerance documented in docs/eval.md: half a token (the
count is rounded to whole tokens), except pool (the nearest cell grid with the patch grid's aspect:
2 % of the tokens) and PruMerge+ (its uniform samples come in strides: 6 %).  In-LLM methods alone
cannot go below about a third on a 3-layer LLM: those budgets are declared unreachable.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import arrcoc  # noqa: E402
from arrcoc.budget import plan_budget  # noqa: E402
from arrcoc.errors import BudgetError  # noqa: E402
from arrcoc.evaluation import DEFAULT_BUDGETS, post_tower  # noqa: E402
from arrcoc.evaluation.runner import prompt_for  # noqa: E402
from arrcoc.spec import available_pipelines, resolve_spec  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::arrcoc.errors.ArrcocWarning")  # recorded in the trace
N0 = 256
# tokens; every other pipeline but prumerge_plus: 0.5.  DART (official count) keeps 4 + 8j tokens: from layer 1
# of 3 that is a step of 16 / 3 in the mean, so the nearest reachable mean is within half of it.
TOLERANCE = {"pool": 0.02 * N0, "dart": 8 / 3 + 1e-9}


def prumerge_plus_range(keep: int) -> tuple[int, int]:
    """PruMerge+'s exact output range for ``keep`` outliers of N0: the outliers plus the extra token, up to
    every uniform sample ``arange(0, N0 - 1, stride)`` besides (how many coincide with outliers depends on
    the model's attention, so its budget rule can only aim at the expected count)."""
    import math

    stride = max(math.floor(math.floor(1.0 / (keep / N0)) / 3.0), 1)
    samples = -(-(N0 - 1) // stride)
    return keep + 1, min(keep + samples + 1, N0)
# In-LLM stages on the 3-layer ToyVQA LLM: layer 0 always sees all 256 tokens, so a mean below about a third is out
# of reach; DART (official count) also never keeps all: 4 + 8 floor(252 / 8) = 252 at most, a mean of 254.7.
UNREACHABLE = ({(name, b) for name in ("fastv", "sparsevlm_llm", "dart", "pyramiddrop") for b in (0.25, 0.125, 0.05)}
               | {("dart", 1.0)})


@pytest.fixture(scope="module")
def batch(toy):
    import arrcoc.toyvqa as toyvqa

    _, processor = toy
    samples = [toyvqa.sample("test", i) for i in range(4)]
    return processor(images=[s.image for s in samples], text=[prompt_for(processor, s.question.text) for s in samples],
                     padding=True, return_tensors="pt")


@pytest.mark.parametrize("name", sorted(available_pipelines()))
def test_budgets_give_the_stated_token_counts(toy, batch, name):
    model, _ = toy
    spec, _ = post_tower(resolve_spec(name))
    for budget in DEFAULT_BUDGETS:
        try:
            plan = plan_budget(spec, budget, original=N0, grid=(16, 16), layers=3, has_cls=True)
        except BudgetError as exc:
            assert (name, budget) in UNREACHABLE, f"{name} @ {budget}: {exc}"
            assert "out of reach" in str(exc)
            continue
        assert (name, budget) not in UNREACHABLE
        with torch.inference_mode(), arrcoc.hf.apply(model, plan.spec) as run:
            model.generate(**batch, max_new_tokens=1, do_sample=False)
        measured = run.report.visual_tokens_mean
        if name == "prumerge_plus" and budget < 1.0:
            low, high = prumerge_plus_range(plan.params["compress[0]"]["keep"])
            assert low <= budget * N0 <= high and low <= measured <= high, (budget, plan.params, measured)
            continue
        assert measured == pytest.approx(budget * N0, abs=TOLERANCE.get(name, 0.5)), (name, budget, plan.params)
        if budget == 1.0:
            assert run.report.layer_visual == [[N0] * 4] * 3, name
