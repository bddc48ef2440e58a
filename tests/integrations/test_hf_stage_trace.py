"""In-LLM stages run through the same stage runner as pre-LLM stages (issue 17).

Inside ``arrcoc.hf.apply`` every stage of a pipeline, before or inside the
LLM, makes one :class:`~arrcoc.state.StageRecord` (tokens in / out per
sample, ms) and fires ``arrcoc_stage_started`` / ``arrcoc_stage_finished``;
``run.trace`` (and ``run.state.trace``) lists them in pipeline order; the
report's per-stage times are those records'.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import arrcoc  # noqa: E402
from arrcoc.hookspecs import hookimpl  # noqa: E402
from arrcoc.registry import get_registry  # noqa: E402
from arrcoc.state import LLMContext, TokenState  # noqa: E402
from tiny_models import ROWS, llava_batch, tiny_llava  # noqa: E402

ENC = {"use": "timm_vit"}
FASTV = {"name": "fastv_t", "encoder": ENC, "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}
SPARSEVLM = {"name": "sparsevlm_t", "encoder": ENC,
             "llm": [{"use": "sparsevlm_llm", "layers": [1, 2], "budget": 64}]}
COMPOSED = {"name": "composed_t", "encoder": ENC,
            "compress": [{"use": "random_keep", "keep": 32}, {"use": "random_keep", "keep": 24}],
            "llm": [{"use": "fastv", "layer": 1, "keep": 0.5}, {"use": "fastv", "layer": 3, "keep": 0.5}]}

pytestmark = pytest.mark.filterwarnings("ignore::arrcoc.ArrcocWarning")


class Observer:
    """Records every hook call: ``(event, stage, plugin name, state)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, TokenState | None]] = []
        self.records = []

    @hookimpl
    def arrcoc_stage_started(self, stage, plugin, state):
        self.events.append(("started", stage, plugin.name, state))

    @hookimpl
    def arrcoc_stage_finished(self, stage, plugin, state, record):
        self.events.append(("finished", stage, plugin.name, state))
        self.records.append(record)


@pytest.fixture
def observer():
    registry = get_registry()
    seen = Observer()
    registry.register(seen, name="test_hf_stage_trace_observer")
    try:
        yield seen
    finally:
        registry.unregister("test_hf_stage_trace_observer")


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _run(model, spec, observer, *, generate: bool):
    batch = llava_batch(ROWS)
    with torch.no_grad(), arrcoc.hf.apply(model, spec) as run:
        if generate:
            model.generate(**batch, max_new_tokens=3, do_sample=False)
        else:
            model(**batch)
    return run


@pytest.mark.parametrize("generate", [False, True], ids=["forward", "generate"])
@pytest.mark.parametrize("spec, expected", [
    (FASTV, [("llm[0]@2", "fastv")]),
    (SPARSEVLM, [("llm[0]@2", "sparsevlm_llm"), ("llm[0]@3", "sparsevlm_llm")]),
    (COMPOSED, [("compress[0]", "random_keep"), ("compress[1]", "random_keep"), ("llm[0]@1", "fastv"),
                ("llm[1]@3", "fastv")]),
], ids=["fastv", "sparsevlm_llm", "pre_and_llm"])
def test_observer_sees_every_stage_in_order(model, observer, spec, expected, generate):
    run = _run(model, spec, observer, generate=generate)
    # Each stage: started, then finished, in pipeline order; nothing else (the tower inside a model is no stage).
    assert [(e, s, p) for e, s, p, _ in observer.events] == [
        (event, stage, plugin) for stage, plugin in expected for event in ("started", "finished")]
    assert [(r.stage, r.plugin) for r in observer.records] == expected
    # run.trace lists every stage that ran, in order; so does the trace of run.state (the pre-LLM output).
    assert list(run.trace) == observer.records
    if spec is COMPOSED:
        assert list(run.state.trace) == observer.records
        assert run.state.counts.tolist() == [24] * len(ROWS)  # the pre-LLM stages' tokens
    else:
        assert run.state is None  # no pre-LLM stage
    # The state handed to the finished hook is the stage's output, with its record last.
    for (event, stage, _, state), record in zip(observer.events[1::2], observer.records):
        assert state.trace[-1] is record and record.stage == stage


@pytest.mark.parametrize("spec", [FASTV, SPARSEVLM, COMPOSED], ids=["fastv", "sparsevlm_llm", "pre_and_llm"])
def test_llm_records_count_tokens_per_sample(model, observer, spec):
    run = _run(model, spec, observer, generate=False)
    report = run.report
    llm_records = [r for r in observer.records if "@" in r.stage]
    assert llm_records, "no in-LLM stage recorded"
    for record in llm_records:
        layer = int(record.stage.split("@")[1])
        # tokens_in: the visual tokens the stage got (what layer - 1 saw); tokens_out: what its layer sees.
        assert list(record.tokens_in) == report.layer_visual[layer - 1]
        assert list(record.tokens_out) == report.layer_visual[layer]
        assert record.ms > 0
        assert len(record.tokens_in) == len(ROWS)
    # The report's per-stage times are the records' own (one clock).
    assert report.llm_stage_ms == {r.stage: r.ms for r in llm_records}
    assert [r.stage for r in report.pre_llm] == [r.stage for r in observer.records if "@" not in r.stage]


def test_llm_stage_gets_a_typed_context(model, observer):
    """An in-LLM stage reads where it runs from ``state.llm`` (an :class:`LLMContext`), not from meta strings."""
    run = _run(model, FASTV, observer, generate=False)
    started = [state for event, stage, _, state in observer.events if event == "started" and stage == "llm[0]@2"]
    (state,) = started
    assert isinstance(state.llm, LLMContext)
    assert (state.llm.layer, state.llm.num_layers) == (2, 4)
    assert state.llm.input_visual_counts.tolist() == run.report.layer_visual[0]
    assert not {"layer", "num_layers", "input_visual_counts"} & set(state.meta)
    # What goes on (and run.llm_states) drops the signals and the context.
    (after,) = run.llm_states.values()
    assert after.llm is None and "attn_from_last" not in after.per_token


def test_a_failing_observer_names_the_llm_stage(model):
    """An observer's error inside the LLM surfaces as it would in a standalone pipeline (hooks are not
    swallowed), and the model is left as it was."""

    class Broken:
        @hookimpl
        def arrcoc_stage_started(self, stage, plugin, state):
            if stage.startswith("llm["):
                raise RuntimeError(f"observer refuses {stage}")

    registry = get_registry()
    registry.register(Broken(), name="test_hf_stage_trace_broken")
    try:
        with pytest.raises(RuntimeError, match=r"observer refuses llm\[0\]@2"):
            _run(model, FASTV, None, generate=False)
    finally:
        registry.unregister("test_hf_stage_trace_broken")
    assert not any(m._forward_pre_hooks for m in model.modules())
