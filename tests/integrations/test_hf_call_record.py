"""One ``Call`` per forward / generate (issue 17): what ends a call, what the report then says, and the order in
which the Run reads a forward's inputs."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc.errors import ModelError  # noqa: E402
from tiny_models import PAD, llava_batch, tiny_llava  # noqa: E402

NEW = 3
FASTV = {"name": "fastv_t", "encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}
KEEP_ALL = {"name": "fastv_all", "encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]}

pytestmark = pytest.mark.filterwarnings("ignore::arrcoc.ArrcocWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch():
    return llava_batch([(3, 5), (2, 9)])


def _greedy(model, batch, **options):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, do_sample=False, **options)


def _pad_in_front(module, args, kwargs):
    """A user's pre-hook registered before ``apply`` that left-pads every prompt by one column."""
    kwargs = dict(kwargs)
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    kwargs["input_ids"] = torch.cat([torch.full_like(ids[:, :1], PAD), ids], 1)
    kwargs["attention_mask"] = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)
    return args, kwargs


def test_the_engine_reads_the_inputs_after_the_models_other_pre_hooks(model, batch):
    """A forward pre-hook of the model that changes the prompt (padding it here) runs before the LLM: the
    in-LLM stages must see the prompt as the LLM gets it, or their segments miss the hidden states by a column
    (a keep-everything stage then changed the logits by 0.37)."""
    handle = model.register_forward_pre_hook(_pad_in_front, with_kwargs=True)
    try:
        with torch.no_grad():
            own = model(**batch).logits
        with torch.no_grad(), arrcoc.hf.apply(model, KEEP_ALL) as run:
            inside = model(**batch).logits
    finally:
        handle.remove()
    assert inside.shape == own.shape
    torch.testing.assert_close(inside, own, rtol=0, atol=0)
    assert run.report.layer_tokens[0] == [(batch["attention_mask"][b] == 1).sum().item() for b in range(2)]


def test_a_sequence_changed_between_the_inputs_and_the_llm_is_named(model, batch):
    """Hidden states of another length than the inputs the Run read (a wrapper that edits them inside the
    forward) cannot be cut by the in-LLM stages: a ModelError says so, instead of a silently wrong cut."""
    lm = model.model.language_model

    def drop_first_column(module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, 1:]
        kwargs["attention_mask"] = None
        return args, kwargs

    handle = lm.register_forward_pre_hook(drop_first_column, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad(), arrcoc.hf.apply(model, FASTV):
            with pytest.raises(ModelError, match=r"hidden states of \(2, \d+\).*inputs described \(2, \d+\)"):
                model(**batch)
    finally:
        handle.remove()


class _Stop(Exception):
    pass


def _stop_at(step: int):
    """A logits processor that raises at the ``step``-th new token."""
    seen = []

    def processor(ids, scores):
        seen.append(1)
        if len(seen) == step:
            raise _Stop(f"stopped at new token {step}")
        return scores

    return processor


def test_a_generate_that_raises_still_reports_how_far_it_got(model, batch):
    from transformers import LogitsProcessorList

    with arrcoc.hf.apply(model, FASTV) as run:
        _greedy(model, batch)
        before = run.report
        with pytest.raises(_Stop):
            _greedy(model, batch, logits_processor=LogitsProcessorList([_stop_at(2)]))
    report = run.report
    assert report is not before
    assert report.batch == 2 and report.layer_visual == before.layer_visual  # the stopped call's prefill
    assert report.new_tokens == 2  # its forwards: the processor raised on the second one's logits
    assert [r.stage for r in run.trace] == ["llm[0]@2"]


def test_a_generate_going_on_from_a_filled_cache_counts_its_own_tokens(model, batch):
    from transformers import DynamicCache

    with arrcoc.hf.apply(model, FASTV) as run:
        cache = DynamicCache()
        first = _greedy(model, batch, past_key_values=cache)
        assert run.report.new_tokens == NEW and run.report.batch == 2
        mask = torch.cat([batch["attention_mask"], torch.ones_like(first[:, batch["input_ids"].shape[1]:])], 1)
        with torch.no_grad():
            model.generate(input_ids=first, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                           past_key_values=cache)
        report = run.report
    assert report.new_tokens == NEW  # its forwards, no prefill among them (was NEW + 1)
    assert report.layer_visual == [] and report.kv_cache_bytes > 0


def test_a_generate_after_a_forward_stopped_by_ctrl_c_is_a_call_of_its_own(model, batch):
    """Ctrl-C (a BaseException) inside a forward skips the hook that ends the forward's call: the next generate
    of the thread must not run as a call nested in that dead forward (its report was thrown away and the Run
    stayed held)."""
    layer = model.model.language_model.layers[1]
    fired = []

    def interrupt(module, args, kwargs):
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt

    handle = layer.register_forward_pre_hook(interrupt, with_kwargs=True)
    try:
        with arrcoc.hf.apply(model, FASTV) as run:
            with pytest.raises(KeyboardInterrupt), torch.no_grad():
                model(**batch)
            _greedy(model, batch)
            report = run.report
            assert run._call_depth.n == 0  # nothing of the dead forward is held any more
    finally:
        handle.remove()
    assert report.new_tokens == NEW and report.batch == 2
    assert report.layer_visual[-1] == [32, 32]


def test_a_forward_made_from_a_pre_hook_is_nested_and_the_outer_one_goes_on(model, batch):
    """A user's pre-hook (registered before ``apply``) that calls the model itself: that forward runs between the
    Run's two pre-hooks, in the middle of the outer one.  Both must compute as on their own (the outer one ran on
    the inner one's segments: a ModelError, or a shape error inside the rotary embedding)."""
    other = llava_batch([(4, 4)])
    with torch.no_grad(), arrcoc.hf.apply(model, FASTV) as run:
        want_outer, want_report = model(**batch).logits, run.report
        want_inner = model(**other).logits
    inner = {}

    def calls_model(module, args, kwargs):
        if kwargs["input_ids"].shape[0] == 2 and not inner:
            inner["logits"] = model(**other).logits
        return None

    handle = model.register_forward_pre_hook(calls_model, with_kwargs=True)
    try:
        with torch.no_grad(), arrcoc.hf.apply(model, FASTV) as run:
            outer = model(**batch).logits
            report = run.report
            assert run._call_depth.n == 0 and not run._nested
    finally:
        handle.remove()
    assert torch.equal(outer, want_outer) and torch.equal(inner["logits"], want_inner)
    assert report.layer_visual == want_report.layer_visual  # the outer call's report


def test_a_forward_that_raises_ends_its_call(model, batch):
    """A forward that raises (here in a decoder layer) still ends its call: run.report describes it, as
    run.trace does (it kept the previous call's report)."""
    layer = model.model.language_model.layers[3]

    def fail(module, args, kwargs):
        raise _Stop("layer 3 refuses")

    one = llava_batch([(4, 4)])
    with torch.no_grad(), arrcoc.hf.apply(model, FASTV) as run:
        model(**batch)
        before = run.report
        handle = layer.register_forward_pre_hook(fail, with_kwargs=True)
        try:
            with pytest.raises(_Stop, match="layer 3 refuses"):
                model(**one)
        finally:
            handle.remove()
        report = run.report
        assert run._call_depth.n == 0
    assert report is not before and report.batch == 1
    # The layers it reached: layer 3's count is taken by arrcoc's pre-hook, before the one that raised.
    assert report.layer_visual == [[64], [64], [32], [32]]
    assert [list(r.tokens_in) for r in run.trace] == [[64]]


def test_a_report_that_cannot_be_built_does_not_keep_the_run(model, batch, monkeypatch):
    """An error while the report of a generate is built (e.g. a sticky CUDA error read back by .tolist()) is
    raised, and the thread gives the Run back: another thread's call does not wait forever."""
    import threading

    from arrcoc.integrations.hf import report as report_module

    def broken(cls, call, config):
        raise RuntimeError("CUDA error: device-side assert triggered (simulated)")

    with torch.no_grad(), arrcoc.hf.apply(model, FASTV) as run:
        monkeypatch.setattr(report_module.Report, "from_call", classmethod(broken))
        with pytest.raises(RuntimeError, match="simulated"):
            _greedy(model, batch)
        monkeypatch.undo()
        assert run._call_depth.n == 0
        done = []
        worker = threading.Thread(target=lambda: (model(**batch), done.append(1)), daemon=True)
        worker.start()
        worker.join(60)
        assert done, "another thread's forward still waits for the Run"
