"""``arrcoc.hf.apply``'s lifecycle: nesting, threads, non-LIFO exits, failures while entering, inside and leaving.

The rule under test: one active Run per model.  A second ``apply`` on the
same model (nested, or from another thread) is an ``ActiveRunError`` naming
the first; calls made from several threads inside one Run are serialised;
whatever happens, leaving the block puts back exactly the model's own
``generate``, ``get_image_features``, attention implementation and hooks.

Model-level corners too: ``vision_feature_layer`` as a list (features
concatenated as the model does; signals from the layer producing the
deepest one), a per-call ``vision_feature_layer`` under pre-LLM stages, and
arrcoc's errors for bad image inputs being also the exception type the model
itself raises for them.
"""

import threading

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from arrcoc.errors import ActiveRunError, ArrcocError, ModelError
from arrcoc.integrations.hf import attention
from arrcoc.integrations.hf.engine import LLMEngine
from tiny_models import IMAGE, hook_counts, llava_batch, tiny_llava

NEW = 4
# Pre-LLM and in-LLM stages at once: every kind of patch apply makes (hooks on the model, the language model
# and each decoder layer, generate, get_image_features, the text attention implementation).
BOTH = {"name": "both_stages", "encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 32}],
        "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}
FASTV = {"name": "fastv_only", "encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2, "keep": 0.25}]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch():
    return llava_batch([(1, 4), (3, 2)], seed=5)


def greedy(model, inputs, **options):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **options)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


@pytest.fixture(scope="module")
def reference(model, batch):
    """The unmodified model's outputs, and each pipeline's outputs from a plain, single ``with`` block."""
    out = {"plain": greedy(model, batch), "plain_logits": logits(model, batch), "hooks": hook_counts(model)}
    for name, spec in (("both", BOTH), ("fastv", FASTV)):
        with arrcoc.hf.apply(model, spec):
            out[name] = greedy(model, batch)
    assert not torch.equal(out["both"][:, -NEW:], out["plain"][:, -NEW:])  # the pipelines do act
    return out


def assert_restored(model, batch, reference):
    """Nothing of arrcoc is left on the model, and it computes exactly as before."""
    assert "generate" not in vars(model)
    assert model.generate.__func__ is type(model).generate
    assert "get_image_features" not in vars(model.model)
    assert model.config.text_config._attn_implementation == "sdpa"
    for layer in model.model.language_model.layers:
        assert layer.self_attn.config._attn_implementation == "sdpa"
        assert layer.self_attn not in attention._RECORDERS
    for module in [model, model.model, model.model.language_model, *model.model.language_model.layers]:
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert torch.equal(greedy(model, batch), reference["plain"])
    torch.testing.assert_close(logits(model, batch), reference["plain_logits"], rtol=0, atol=0)
    # transformers' own hooks (it captures the tower's outputs with hooks it installs on first use) remain.
    assert hook_counts(model) == reference["hooks"]


# --------------------------------------------------------------------------- nesting
def test_nested_apply_on_one_model_is_refused_naming_the_active_run(model, batch, reference):
    with arrcoc.hf.apply(model, BOTH) as outer:
        with pytest.raises(ActiveRunError) as err:
            with arrcoc.hf.apply(model, FASTV):
                pass  # pragma: no cover - never entered
        # The refused apply touched nothing: the outer Run computes as it does alone.
        assert torch.equal(greedy(model, batch), reference["both"])
        assert outer.report.layer_visual[-1] == [16, 16]
    msg = str(err.value)
    assert isinstance(err.value, ModelError)
    assert "LlavaForConditionalGeneration" in msg and "'both_stages'" in msg and "already" in msg, msg
    assert threading.current_thread().name in msg and "copy.deepcopy" in msg, msg
    assert_restored(model, batch, reference)
    with arrcoc.hf.apply(model, FASTV):  # the model is free again
        assert torch.equal(greedy(model, batch), reference["fastv"])
    assert_restored(model, batch, reference)


def test_the_active_run_errors_advice_runs_two_pipelines_at_once(model, batch, reference):
    """The ActiveRunError's way to run two pipelines at once, a copy of the model, works when the copy is made
    outside every block; inside one, where the nested apply was refused, deepcopy fails (the model carries the Run's
    hooks), so the message says where to copy (it said only copy.deepcopy(model))."""
    import copy

    twin = copy.deepcopy(model)
    with arrcoc.hf.apply(model, BOTH):
        with pytest.raises(ActiveRunError) as err:
            with arrcoc.hf.apply(model, FASTV):
                pass  # pragma: no cover - never entered
        with pytest.raises(Exception):
            copy.deepcopy(model)
        with arrcoc.hf.apply(twin, FASTV):
            assert torch.equal(greedy(twin, batch), reference["fastv"])
            assert torch.equal(greedy(model, batch), reference["both"])
    msg = str(err.value)
    assert "copy.deepcopy(model) before entering" in msg and "outside every apply block" in msg, msg
    assert_restored(model, batch, reference)
    assert_restored(twin, batch, reference)


def test_contexts_left_in_non_lifo_order(model, batch, reference):
    other = tiny_llava()  # the same seeded weights: the same outputs
    first, second = arrcoc.hf.apply(model, BOTH), arrcoc.hf.apply(other, FASTV)
    first.__enter__()
    second.__enter__()
    assert torch.equal(greedy(model, batch), reference["both"])
    first.__exit__(None, None, None)  # the first entered leaves first
    assert_restored(model, batch, reference)
    assert torch.equal(greedy(other, batch), reference["fastv"])  # the other model's Run is untouched
    second.__exit__(None, None, None)
    assert_restored(other, batch, reference)

    # On one model the second context is refused at entry, so it can never be left out of order.
    first, second = arrcoc.hf.apply(model, BOTH), arrcoc.hf.apply(model, FASTV)
    first.__enter__()
    with pytest.raises(ActiveRunError):
        second.__enter__()
    first.__exit__(None, None, None)
    assert_restored(model, batch, reference)


# --------------------------------------------------------------------------- threads
def test_apply_from_a_second_thread_is_refused_while_the_first_is_inside(model, batch, reference):
    entered, release = threading.Event(), threading.Event()
    results = {}

    def holder():
        with arrcoc.hf.apply(model, BOTH):
            entered.set()
            release.wait(30)
            results["holder"] = greedy(model, batch)

    thread = threading.Thread(target=holder, name="holder-thread")
    thread.start()
    try:
        assert entered.wait(30)
        with pytest.raises(ActiveRunError) as err:
            with arrcoc.hf.apply(model, FASTV):
                pass  # pragma: no cover - never entered
    finally:
        release.set()
        thread.join(60)
    assert "holder-thread" in str(err.value) and "'both_stages'" in str(err.value)
    assert torch.equal(results["holder"], reference["both"])
    assert_restored(model, batch, reference)


def test_calls_from_two_threads_inside_one_run_are_serialised(model, batch, reference):
    """Thread B's forward, started while thread A's generate is between two decoding steps, waits for A's
    generate to end: A's pruned cache and B's prefill never share the engine's per-call state."""
    single = llava_batch([(2, 2)], seed=9)
    with arrcoc.hf.apply(model, FASTV):
        alone = logits(model, single)
    results, finished_early = {}, []

    def forward_b():
        results["b"] = logits(model, single)

    thread_b = threading.Thread(target=forward_b)

    def between_steps(input_ids, scores):  # runs in thread A, after its prefill forward
        if not thread_b.is_alive() and "b" not in results:
            thread_b.start()
            thread_b.join(0.3)
            finished_early.append(not thread_b.is_alive())
        return scores

    from transformers import LogitsProcessorList

    with arrcoc.hf.apply(model, FASTV):
        results["a"] = greedy(model, batch, logits_processor=LogitsProcessorList([between_steps]))
        thread_b.join(60)
    assert finished_early == [False]  # B waited for A's generate
    assert torch.equal(results["a"], reference["fastv"])
    torch.testing.assert_close(results["b"], alone, rtol=0, atol=0)
    assert_restored(model, batch, reference)


# --------------------------------------------------------------------------- failures
def test_an_exception_inside_generate_leaves_the_run_usable(model, batch, reference):
    def explode(input_ids, scores):
        raise RuntimeError("boom in a logits processor")

    from transformers import LogitsProcessorList

    with arrcoc.hf.apply(model, BOTH) as run:
        with pytest.raises(RuntimeError, match="boom"):
            greedy(model, batch, logits_processor=LogitsProcessorList([explode]))
        assert torch.equal(greedy(model, batch), reference["both"])
        assert run.report.layer_visual[-1] == [16, 16] and run.report.new_tokens == NEW
    assert_restored(model, batch, reference)


def test_a_failure_while_entering_undoes_what_was_installed(model, batch, reference, monkeypatch):
    install = LLMEngine.install

    def install_then_fail(self):
        install(self)  # hooks on every decoder layer are in place when this fails
        raise RuntimeError("install failed")

    monkeypatch.setattr(LLMEngine, "install", install_then_fail)
    with pytest.raises(RuntimeError, match="install failed"):
        with arrcoc.hf.apply(model, BOTH):
            pass  # pragma: no cover - never entered
    monkeypatch.undo()
    assert_restored(model, batch, reference)
    with arrcoc.hf.apply(model, BOTH):  # the model was released too
        assert torch.equal(greedy(model, batch), reference["both"])


def test_a_failure_while_leaving_still_undoes_everything_else(model, batch, reference, monkeypatch):
    remove = LLMEngine.remove

    def remove_then_fail(self):
        remove(self)
        raise RuntimeError("remove failed")

    monkeypatch.setattr(LLMEngine, "remove", remove_then_fail)
    with pytest.raises(RuntimeError, match="remove failed"):
        with arrcoc.hf.apply(model, BOTH):
            pass
    monkeypatch.undo()
    # The steps after the failing one ran too (generate, get_image_features, attention, the Run's own hooks).
    assert_restored(model, batch, reference)
    with arrcoc.hf.apply(model, FASTV):  # a failed exit does not keep the model claimed
        assert torch.equal(greedy(model, batch), reference["fastv"])


def test_a_run_whose_block_ended_refuses_calls(model, batch, reference):
    with arrcoc.hf.apply(model, BOTH):
        wrapped = model.generate  # the Run's wrapper, kept past the block by mistake
    with pytest.raises(ModelError) as err:
        wrapped(**batch, max_new_tokens=NEW)
    assert "ended" in str(err.value) and "both_stages" in str(err.value)
    assert isinstance(err.value, ArrcocError)
    assert_restored(model, batch, reference)


# --------------------------------------------------------------------------- vision_feature_layer as a list
LAYERS = [-3, -2]  # hidden states 1 and 2 of the 3-layer tower: features of width 2 x 32 before the projector
NEXT_SIZES = [[50, 100], [100, 100]]  # crop grids (1, 2) and (2, 2)


def with_feature_layers(family, layers):
    """The tiny LLaVA / LLaVA-NeXT of tiny_models.py with ``vision_feature_layer=layers``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration
    from tiny_models import IMAGE, LLAMA, _clip

    torch.manual_seed(0)
    if family == "llava":
        config = LlavaConfig(vision_config=_clip(112), text_config=LlamaConfig(**LLAMA), image_token_id=IMAGE,
                             vision_feature_layer=layers)
        return LlavaForConditionalGeneration(config).eval().to(torch.float64)
    config = LlavaNextConfig(vision_config=_clip(56), text_config=LlamaConfig(**LLAMA), image_token_id=IMAGE,
                             image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=layers)
    return LlavaNextForConditionalGeneration(config).eval().to(torch.float64)


def next_batch(model):
    from tiny_models import IMAGE, left_pad

    sizes = torch.tensor(NEXT_SIZES)
    pixels = torch.randn(2, 5, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    per = arrcoc.hf.adapter_for(model).tokens_per_image(pixels, {"image_sizes": sizes})
    ids, mask = left_pad([[1, 5, 6, *[IMAGE] * per[0], 20, 21, 9], [1, *[IMAGE] * per[1], 22, 9]])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


KEEP_ALL = {
    "random_keep": {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 1.0}]},
    # CLS attention read from the tower while the features are concatenated
    # (crops: null: each view keeps its own share; HiRED's per-image split floors the crops' shares)
    "hired": {"encoder": {"use": "timm_vit"}, "compress": [{"use": "hired", "keep": 1.0, "crops": None}]},
    "fastv": {"encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]},
}


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def layered(request):
    model = with_feature_layers(request.param, LAYERS)
    inputs = llava_batch([(1, 4), (3, 2)], seed=5) if request.param == "llava" else next_batch(model)
    return model, inputs


@pytest.mark.parametrize("pipeline", sorted(KEEP_ALL))
def test_feature_layer_list_keep_everything_is_the_model(layered, pipeline):
    model, inputs = layered
    own_logits, own_tokens = logits(model, inputs), greedy(model, inputs)
    with arrcoc.hf.apply(model, KEEP_ALL[pipeline]) as run:
        inside_logits, inside_tokens = logits(model, inputs), greedy(model, inputs)
    torch.testing.assert_close(inside_logits, own_logits, rtol=0, atol=0)
    assert torch.equal(inside_tokens, own_tokens)
    if pipeline != "fastv":
        assert run.encoder.embed_dim == len(LAYERS) * 32


def test_feature_layer_list_pruning_sees_the_concatenated_features(monkeypatch):
    """HiRED before the projector: tokens of width len(list) x hidden, ranked by the CLS attention of the layer
    producing the deepest listed layer (hidden state 2: layer 1's output), from the model's own eager attention."""
    model = with_feature_layers("llava", LAYERS)
    inputs = llava_batch([(1, 4), (3, 2)], seed=5)
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True)
        concatenated = torch.cat([out.hidden_states[1], out.hidden_states[2]], -1)  # [2, 65, 64]
        projected = model.model.multi_modal_projector(concatenated)
        model.set_attn_implementation({"vision_config": "eager"})
        attentions = model.model.vision_tower(pixels, output_attentions=True).attentions
        model.set_attn_implementation({"vision_config": "sdpa"})
    kept = attentions[1][:, :, 0, 1:].sum(1).topk(16, dim=1).indices.sort(1).values
    own = torch.stack(list(model.model.get_image_features(pixels).pooler_output))
    torch.testing.assert_close(projected[:, 1:], own, rtol=0, atol=1e-15)  # the features the model itself uses

    from arrcoc_plugins.compressors.hired import HiRED

    widths = []
    call = HiRED.__call__
    monkeypatch.setattr(HiRED, "__call__", lambda self, state: widths.append(state.D) or call(self, state))
    with arrcoc.hf.apply(model, {"encoder": {"use": "timm_vit"}, "compress": [{"use": "hired", "keep": 16}]}) as run:
        greedy(model, inputs)
    assert widths == [len(LAYERS) * 32]
    torch.testing.assert_close(run.state.tokens, projected[:, 1:].gather(1, kept[..., None].expand(-1, -1, 64)),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run.state.cls, projected[:, 0], rtol=1e-12, atol=1e-12)
    assert run.report.layer_visual[-1] == [16, 16]


def test_feature_layer_must_be_an_int_or_a_list_of_ints():
    model = with_feature_layers("llava", -2)
    model.config.vision_feature_layer = []
    with pytest.raises(ModelError, match=r"vision_feature_layer must be an int or a non-empty list of ints, got \[\]"):
        arrcoc.hf.adapter_for(model)


# --------------------------------------------------------------------------- the model's own exception types
SPECS = {
    "no_stages": {"encoder": {"use": "timm_vit"}},
    "pre_llm": {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 4}]},
    "llm": {"encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]},
}


def mismatched(family):
    """A model and inputs whose images and placeholders do not match (3 placeholders short, or 2 images for the
    placeholders of 1)."""
    from tiny_models import tiny_llava_next, tiny_qwen2_vl

    if family == "llava":
        batch = llava_batch([(1, 4)], seed=5)
        return tiny_llava(), dict(batch, pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1))
    if family == "llava_next":
        model = tiny_llava_next()
        batch = next_batch(model)
        keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        keep[0, (batch["input_ids"][0] == 199).nonzero()[:3, 0]] = False  # the first prompt loses 3 placeholders
        ids = torch.stack([batch["input_ids"][0][keep[0]], batch["input_ids"][1][keep[1]][3:]])
        return model, dict(batch, input_ids=ids, attention_mask=(ids != 0).long())
    model = tiny_qwen2_vl()
    ids = torch.tensor([[1, 10, 11, 902, *[900] * 20, 903, 50, 51]])  # 20 placeholders, the image has 24 tokens
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == 900).int(),
                   "pixel_values": torch.randn(96, 1176, dtype=torch.float64), "image_grid_thw": torch.tensor([[1, 8, 12]])}


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_a_placeholder_mismatch_is_arrcocs_message_as_the_models_exception_type(family):
    from arrcoc.errors import PlaceholderMismatchError

    model, bad = mismatched(family)
    with pytest.raises(Exception) as own:
        logits(model, bad)
    assert type(own.value) is ValueError and "do not match" in str(own.value)  # transformers' get_placeholder_mask
    for spec in SPECS.values():
        for call in (logits, greedy):
            with pytest.raises(PlaceholderMismatchError) as err:
                with arrcoc.hf.apply(model, spec):
                    call(model, bad)
            assert isinstance(err.value, ValueError) and isinstance(err.value, ArrcocError)
            assert "image placeholders" in str(err.value) and "build the inputs with the model's processor" in str(err.value)


def test_next_images_without_image_sizes_raise_the_models_type_error():
    from arrcoc.errors import InputError
    from tiny_models import tiny_llava_next

    model = tiny_llava_next()
    bad = next_batch(model)
    del bad["image_sizes"]
    for call in (logits, greedy):
        with pytest.raises(TypeError):  # the model: generate's missing argument, forward's None
            call(model, bad)
        for spec in SPECS.values():
            with pytest.raises(TypeError) as err:
                with arrcoc.hf.apply(model, spec):
                    call(model, bad)
            assert isinstance(err.value, InputError) and "image_sizes" in str(err.value)


def test_a_per_call_feature_layer_other_than_the_config_is_refused_not_ignored(model, batch, reference):
    """The model encodes with a call's ``vision_feature_layer``; pre-LLM stages encode with the config's, so such a
    call is refused (it was silently answered from the config's layer).  In-LLM stages leave the encoding to the
    model, which honours it."""
    from arrcoc.errors import InputError

    other_layer = dict(batch, vision_feature_layer=-1)
    own_logits, own_tokens = logits(model, other_layer), greedy(model, other_layer)
    assert not torch.equal(own_tokens, reference["plain"])  # the layer matters
    with arrcoc.hf.apply(model, KEEP_ALL["random_keep"]):
        for call in (logits, greedy):
            with pytest.raises(InputError) as err:
                call(model, other_layer)
            assert "vision_feature_layer=-1" in str(err.value) and "model.config.vision_feature_layer" in str(err.value)
        assert torch.equal(greedy(model, dict(batch, vision_feature_layer=-2)), reference["plain"])  # the config's
    with arrcoc.hf.apply(model, KEEP_ALL["fastv"]):
        torch.testing.assert_close(logits(model, other_layer), own_logits, rtol=0, atol=0)
        assert torch.equal(greedy(model, other_layer), own_tokens)
    assert_restored(model, batch, reference)


def test_a_call_that_waited_while_the_block_was_left_computes_as_the_model(model, batch, reference):
    """A thread's forward that read the model's hooks before another thread left the block, and waited for the
    Run meanwhile, then runs the Run's pre-hook on a restored model: it must neither compress (the in-LLM hooks
    and the post-hook are gone) nor keep the Run's call lock (the hook that releases it is gone too)."""
    with arrcoc.hf.apply(model, BOTH) as run:
        pass
    stale = model.register_forward_pre_hook(run._pre_hook, with_kwargs=True, prepend=True)  # as torch read it
    try:
        torch.testing.assert_close(logits(model, batch), reference["plain_logits"], rtol=0, atol=0)
    finally:
        stale.remove()
    released = []
    thread = threading.Thread(target=lambda: released.append(run._call_lock.acquire(timeout=5)))
    thread.start()
    thread.join(10)
    assert released == [True]  # another thread can take it: the stale call did not keep it
    assert_restored(model, batch, reference)


def test_a_generate_that_waited_while_the_block_was_left_generates_as_the_model(model, batch, reference):
    """Thread B calls ``model.generate`` (the Run's wrapper) while a call of thread A holds the Run, and A leaves the
    block meanwhile: B generates as the model alone.  It ran the pre-LLM stages and then the model's own generate
    without the in-LLM hooks (neither the pipeline's tokens nor the model's)."""
    import time

    results, waiting = {}, threading.Event()
    thread_b = threading.Thread(target=lambda: results.setdefault("b", greedy(model, batch)), daemon=True)
    with arrcoc.hf.apply(model, BOTH) as run:
        begin = run._begin_call

        def observed_begin():
            if threading.current_thread() is thread_b:
                waiting.set()
            return begin()

        run._begin_call = observed_begin
        run._begin_call()  # a call of this thread in flight (as a generate's) until after the block is left
        thread_b.start()
        assert waiting.wait(30)
        time.sleep(0.2)  # B is past its check of the Run, blocked on the call lock
    run._end_call()
    thread_b.join(120)
    assert torch.equal(results["b"], reference["plain"])
    assert_restored(model, batch, reference)


@pytest.mark.parametrize("call", ["generate", "forward"])
def test_a_call_stopped_by_keyboard_interrupt_does_not_keep_the_run(model, batch, reference, call):
    """Ctrl-C inside a forward, caught inside the block (as a chat loop does): torch runs the always_call hook that
    gives the Run back on ``Exception`` only, so the interrupted thread kept the Run and another thread's call waited
    forever.  The next call of the interrupted thread (or the end of its generate) gives it back."""
    fired = []

    def interrupt(module, args):
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt

    run_call = greedy if call == "generate" else logits
    with arrcoc.hf.apply(model, FASTV) as run:
        alone = logits(model, batch)
        handle = model.model.language_model.layers[1].register_forward_pre_hook(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                run_call(model, batch)
        finally:
            handle.remove()
        if call == "forward":  # the interrupted thread's next forward
            torch.testing.assert_close(logits(model, batch), alone, rtol=0, atol=0)
        out = {}
        thread = threading.Thread(target=lambda: out.setdefault("b", greedy(model, batch)), daemon=True)
        thread.start()
        thread.join(30)
        waited_forever = thread.is_alive()
        while waited_forever:  # let the test end: give back what this thread kept
            try:
                run._call_lock.release()
            except RuntimeError:
                break
        thread.join(60)
    assert not waited_forever, "another thread's call waited for a Run the interrupted call kept"
    assert torch.equal(out["b"], reference["fastv"])
    assert_restored(model, batch, reference)


def test_a_per_call_select_strategy_under_in_llm_stages_is_left_to_the_model(model):
    """``vision_feature_select_strategy='full'`` in a call gives each image one placeholder more (its class token);
    the model honours it, and so must a pipeline that leaves the encoding to the model (in-LLM stages, or none).
    arrcoc's placeholder check counted with the config's 'default' and refused the right prompt as a
    PlaceholderMismatchError telling the caller to use the processor.  Pre-LLM stages still refuse the call."""
    from arrcoc.errors import InputError, PlaceholderMismatchError
    from tiny_models import BOS, IMAGE, left_pad

    ids, mask = left_pad([[BOS, 5, *[IMAGE] * 65, 30, 31, 32], [BOS, 5, 6, 7, *[IMAGE] * 65, 30]])
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "vision_feature_select_strategy": "full"}
    own_logits, own_tokens = logits(model, full), greedy(model, full)
    for spec in (KEEP_ALL["fastv"], SPECS["no_stages"]):
        with arrcoc.hf.apply(model, spec):
            torch.testing.assert_close(logits(model, full), own_logits, rtol=0, atol=0)
            assert torch.equal(greedy(model, full), own_tokens)
    with arrcoc.hf.apply(model, FASTV) as run:
        greedy(model, full)
    assert run.report.layer_visual[0] == [65, 65] and run.report.layer_visual[-1] == [16, 16]  # a quarter of 65
    with arrcoc.hf.apply(model, KEEP_ALL["random_keep"]):
        with pytest.raises(InputError, match="vision_feature_select_strategy='full'") as err:
            greedy(model, full)
        assert not isinstance(err.value, PlaceholderMismatchError)


def test_a_generate_bound_before_the_block_does_not_skip_the_pre_llm_stages_silently(model, batch, reference):
    """``gen = model.generate`` (or a functools.partial of it) taken before ``apply`` is the model's own generate:
    it encodes the images itself and hands the forward ``mm_encoder_outputs``, so the pre-LLM stages were skipped
    without a word (64 tokens per image reached the LLM, the report had no pre-LLM record) while the in-LLM ones
    ran.  Such a forward is an InputError saying what happened; in-LLM-only pipelines run as usual."""
    from arrcoc.errors import InputError

    bound = model.generate
    with arrcoc.hf.apply(model, BOTH):
        with pytest.raises(InputError, match=r"gen = model.generate") as err:
            with torch.no_grad():
                bound(**batch, max_new_tokens=NEW, do_sample=False)
        assert "'both_stages'" in str(err.value)
        assert torch.equal(greedy(model, batch), reference["both"])  # the block's own generate is unaffected
    with arrcoc.hf.apply(model, FASTV) as run:
        with torch.no_grad():
            assert torch.equal(bound(**batch, max_new_tokens=NEW, do_sample=False), reference["fastv"])
    assert run.report.layer_visual[-1] == [16, 16]
    assert_restored(model, batch, reference)


# --------------------------------------------------------------------------- model calls nested in a generate
# A logits processor (classifier-free guidance's among them) may call the model in the middle of a generate, in
# the same thread.  Each such call is a call of its own: the pipeline prunes it as it would alone in the block,
# and the generate around it keeps its own pruning, tokens and report.
FULL_REPORT = [[64, 64]] * 4  # every layer of the keep-everything FastV saw both prompts' 64 image tokens
FASTV_REPORT = [[64, 64], [64, 64], [16, 16], [16, 16]]


def nested_forward(model, inputs, seen):
    """A logits processor that calls the model once per step (a batch-1 prompt inside the batch-2 generate)."""
    from transformers import LogitsProcessorList

    def call_model(input_ids, scores):
        seen.append(logits(model, inputs))
        return scores

    return LogitsProcessorList([call_model])


def assert_generate_report(report, visual):
    assert (report.batch, report.new_tokens, report.layer_visual) == (2, NEW, visual), report
    assert report.layer_tokens == [[v + 6, v + 6] for v, _ in visual], report  # 6 text tokens per prompt


def test_a_forward_from_a_logits_processor_is_a_call_of_its_own(model, batch, reference):
    """Before: the nested forward took over the engine's per-call state (trace, prefill bookkeeping), so the
    generate's report described the batch-1 forward (layer_visual [[64], [64], [16], [16]])."""
    single = llava_batch([(2, 2)], seed=9)
    own = []
    plain = greedy(model, batch, logits_processor=nested_forward(model, single, own))
    assert torch.equal(plain, reference["plain"]) and len(own) == NEW
    inside = []
    with arrcoc.hf.apply(model, KEEP_ALL["fastv"]) as run:
        out = greedy(model, batch, logits_processor=nested_forward(model, single, inside))
    assert torch.equal(out, plain)
    torch.testing.assert_close(torch.stack(inside), torch.stack(own), rtol=0, atol=0)
    assert_generate_report(run.report, FULL_REPORT)
    # Pruning: the generate is pruned as alone, the nested forward as a forward alone in the block.
    inside.clear()
    with arrcoc.hf.apply(model, FASTV) as run:
        alone = logits(model, single)
        out = greedy(model, batch, logits_processor=nested_forward(model, single, inside))
        assert torch.equal(out, reference["fastv"])
        assert_generate_report(run.report, FASTV_REPORT)
        assert not torch.allclose(alone, own[0])  # the nested forward is pruned, as alone
        torch.testing.assert_close(torch.stack(inside), alone.expand(NEW, *alone.shape), rtol=0, atol=0)
    assert_restored(model, batch, reference)


def test_classifier_free_guidance_is_the_models_with_a_consistent_report(model, batch, reference):
    """generate(guidance_scale=...) calls the model from a logits processor on an unconditional prompt (the
    prompt's last token, with its own cache).  Before: the tokens were right, but the report counted the
    unconditional forwards as decoding steps (new_tokens 7 for 4) and its layers were the unconditional
    prefill's (layer_visual all zeros)."""
    plain = greedy(model, batch, guidance_scale=1.5)
    assert not torch.equal(plain, reference["plain"])  # guidance changes the tokens
    with arrcoc.hf.apply(model, KEEP_ALL["fastv"]) as run:
        out = greedy(model, batch, guidance_scale=1.5)
    assert torch.equal(out, plain)
    assert_generate_report(run.report, FULL_REPORT)
    with arrcoc.hf.apply(model, BOTH) as run:
        greedy(model, batch, guidance_scale=1.5)
        both = run.report
        greedy(model, batch)  # the same prompts without guidance: the same pruning, the same report
        assert (both.batch, both.new_tokens, both.layer_tokens) == (2, NEW, run.report.layer_tokens)
        records = [[(r.stage, r.tokens_in, r.tokens_out) for r in report.pre_llm] for report in (both, run.report)]
        assert records[0] == records[1] != []
    assert_restored(model, batch, reference)


def test_a_generate_from_a_logits_processor_leaves_the_outer_generate_alone(model, batch, reference):
    """A nested generate (batch 1) is a call of its own too: before, it ended the outer generate's state (its
    report described the nested generate)."""
    from transformers import LogitsProcessorList

    single = llava_batch([(2, 2)], seed=9)
    with arrcoc.hf.apply(model, FASTV) as run:
        alone = greedy(model, single)
        inner = []

        def call_generate(input_ids, scores):
            if not inner:
                inner.append(greedy(model, single))
            return scores

        out = greedy(model, batch, logits_processor=LogitsProcessorList([call_generate]))
        assert torch.equal(out, reference["fastv"]) and torch.equal(inner[0], alone)
        assert_generate_report(run.report, FASTV_REPORT)

        def call_failing(input_ids, scores):  # a nested forward that raises (its images have no placeholders)
            with pytest.raises(ArrcocError):
                logits(model, {**single, "input_ids": single["input_ids"].clamp(max=IMAGE - 1)})
            return scores

        out = greedy(model, batch, logits_processor=LogitsProcessorList([call_failing]))
        assert torch.equal(out, reference["fastv"])
        assert_generate_report(run.report, FASTV_REPORT)
    assert_restored(model, batch, reference)
