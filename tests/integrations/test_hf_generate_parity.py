"""``arrcoc.hf.apply`` with a pipeline that keeps everything is invisible to ``generate`` and ``forward``.

One systematic check instead of one test per symptom: every family config
(:data:`CONFIGS`: a model factory and an input builder) x every keep-everything
pipeline (:data:`PIPELINES`: pre-LLM and in-LLM) x every generation mode
(:data:`MODES`) runs once without arrcoc and once inside ``apply``; the
outputs must be identical (token ids equal; scores, logits, attentions and
hidden states equal in shape and allclose at 1e-5 in float64; cache lengths
equal), or the call must be refused with the :class:`arrcoc.ArrcocError`
listed in :data:`REFUSALS` (docs/hf.md, "What `apply` supports").

Every batch is two prompts of different lengths, left-padded, whose images
differ (LLaVA-NeXT: different crop grids); one config puts both images in
the first prompt and none in the second.  The reference runs the model
alone; the placeholder counts of the prompts come from the model's own
``get_image_features``, never from arrcoc.

Adding a family: a factory in ``tiny_models.py``, an input builder
``(model) -> batch`` here, and a row in :data:`CONFIGS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from transformers import GenerationConfig
from tiny_models import BOS, IMAGE, PAD, QWEN_END, QWEN_IMAGE, QWEN_START, left_pad, tiny_llava, tiny_llava_next
from tiny_models import tiny_qwen2_5_vl, tiny_qwen2_vl

NEW = 3  # new tokens per generate call
ATOL = 1e-5


# ------------------------------------------------------------------ inputs
def _pixels(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _prompts(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts ``bos, text, n x <image>, question`` of different lengths, left-padded."""
    texts = [(2, 4), (0, 7)]
    rows = [[BOS, *range(5, 5 + pre), *[IMAGE] * n, *range(30, 30 + post)] for n, (pre, post) in zip(counts, texts)]
    return left_pad(rows)


def _model_counts(model: Any, **image_inputs: Any) -> list[int]:
    """Placeholders per image as the model itself counts them (the reference owes nothing to arrcoc)."""
    with torch.no_grad():
        features = model.model.get_image_features(**image_inputs).pooler_output
    return [f.shape[0] for f in features]


def llava_inputs(model: Any) -> dict:
    size = model.config.vision_config.image_size
    pixels = _pixels((2, 3, size, size), seed=1, dtype=model.dtype)
    ids, mask = _prompts(_model_counts(model, pixel_values=pixels))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def llava_next_inputs(model: Any, sizes: tuple[tuple[int, int], ...] = ((50, 100), (90, 40))) -> dict:
    """Two images of different aspect ratios (crop grids 1x2 and 2x1 with the default pinpoints)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    side = model.config.vision_config.image_size
    views = max(image_size_to_num_patches(s, model.config.image_grid_pinpoints, side) for s in sizes)
    pixels = _pixels((2, views, 3, side, side), seed=1, dtype=model.dtype)
    image_sizes = torch.tensor(sizes)
    ids, mask = _prompts(_model_counts(model, pixel_values=pixels, image_sizes=image_sizes))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": image_sizes}


def two_images_and_none(inputs: Callable[[Any], dict]) -> Callable[[Any], dict]:
    """The same two images, both in the first prompt (text between them); the second prompt has none."""
    def build(model: Any) -> dict:
        batch = inputs(model)
        counts = _model_counts(model, **{k: v for k, v in batch.items() if k in ("pixel_values", "image_sizes")})
        ids, mask = left_pad([[BOS, 5, *[IMAGE] * counts[0], 6, *[IMAGE] * counts[1], 30, 31], [BOS, 7, 8, 9]])
        return {**batch, "input_ids": ids, "attention_mask": mask}
    return build


def qwen_inputs(model: Any) -> dict:
    """Two prompts ``bos, text, vision_start, n x <image>, vision_end, question`` of images of different sizes
    (4 x 8 and 6 x 6 patches: 8 and 9 merged tokens), left-padded."""
    grids = torch.tensor([[1, 4, 8], [1, 6, 6]])
    vision = model.config.vision_config
    pixels = _pixels((int(grids.prod(-1).sum()), 3 * vision.temporal_patch_size * vision.patch_size ** 2), seed=1,
                     dtype=model.dtype)
    counts = _model_counts(model, pixel_values=pixels, image_grid_thw=grids)
    rows = [[BOS, *range(5, 5 + pre), QWEN_START, *[QWEN_IMAGE] * n, QWEN_END, *range(30, 30 + post)]
            for n, (pre, post) in zip(counts, [(2, 4), (0, 7)])]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grids,
            "mm_token_type_ids": (ids == QWEN_IMAGE).int()}


@dataclass(frozen=True)
class Config:
    family: str                       # the column of docs/hf.md's table
    build: Callable[[], Any]          # () -> model (eval; float64 unless said otherwise)
    inputs: Callable[[Any], dict]     # model -> batch of 2 left-padded prompts with their images


#: name -> family config.  Several configs per family: other towers, select strategies, grids.
CONFIGS = {
    "llava": Config("llava", tiny_llava, llava_inputs),
    "llava-siglip-full": Config(
        "llava", functools.partial(tiny_llava, tower="siglip", strategy="full"), llava_inputs),
    "llava-clip-full": Config(  # the class token is the first feature row
        "llava", functools.partial(tiny_llava, strategy="full"), llava_inputs),
    "llava-siglip-default": Config(  # transformers drops the first patch: pre-LLM stages are refused (REFUSALS)
        "llava", functools.partial(tiny_llava, tower="siglip", strategy="default"), llava_inputs),
    # Eager attention returns attention weights (sdpa returns none).  float32: in float64 the model's own eager
    # attention turns a left-padded row into NaN (its mask minimum overflows), arrcoc or not.
    "llava-eager": Config("llava", functools.partial(tiny_llava, torch.float32, attn_implementation="eager"),
                          llava_inputs),
    "llava_next": Config("llava_next", tiny_llava_next, llava_next_inputs),
    "llava_next-2x2-patches": Config(  # views of 28 px: 2 patches per side, pinpoints of 1x2, 2x1, 2x2 views
        "llava_next", functools.partial(tiny_llava_next, image_size=28, pinpoints=[[28, 56], [56, 28], [56, 56]]),
        llava_next_inputs),
    "llava_next-3x3-1x3": Config(  # 3 patches per side, a 1x3 / 3x1 grid among the pinpoints
        "llava_next", functools.partial(tiny_llava_next, image_size=42,
                                        pinpoints=[[42, 126], [126, 42], [84, 84]]),
        functools.partial(llava_next_inputs, sizes=((30, 100), (100, 30)))),
    "llava_next-siglip-full": Config(
        "llava_next", functools.partial(tiny_llava_next, tower="siglip", strategy="full"), llava_next_inputs),
    "llava_next-2-images-and-none": Config("llava_next", tiny_llava_next, two_images_and_none(llava_next_inputs)),
    "llava_next-eager": Config(
        "llava_next", functools.partial(tiny_llava_next, torch.float32, attn_implementation="eager"),
        llava_next_inputs),
    # More prompt shapes, eager attention and Qwen-specific cases: test_hf_qwen_parity.py.
    "qwen2_vl": Config("qwen2_vl", tiny_qwen2_vl, qwen_inputs),
    "qwen2_5_vl": Config("qwen2_vl", tiny_qwen2_5_vl, qwen_inputs),
}

#: Pipelines that keep every token: before the LLM and inside it.
PIPELINES = {
    "pre_llm": {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 1.0}]},
    "in_llm": {"encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]},
}


# ------------------------------------------------------------------- modes
def _generate(model: Any, batch: dict, **options: Any) -> Any:
    return model.generate(**batch, max_new_tokens=NEW, pad_token_id=PAD, **options)


def _seeded(options: dict) -> Callable[[Any, dict], Any]:
    def run(model, batch):
        torch.manual_seed(0)
        return _generate(model, batch, **options)
    return run


def _with_embeds(options: dict) -> Callable[[Any, dict], Any]:
    """The same prompts as ``inputs_embeds``: each placeholder is the image token's embedding."""
    def run(model, batch):
        batch = dict(batch)
        ids = batch.pop("input_ids")
        batch["inputs_embeds"] = model.get_input_embeddings()(ids)
        return _generate(model, batch, **options)
    return run


def _continued(model: Any, batch: dict) -> Any:
    """Generate, then continue the same sequences from the returned cache (multi-turn reuse)."""
    first = _generate(model, batch, do_sample=False, return_dict_in_generate=True)
    grown = first.sequences
    mask = torch.cat([batch["attention_mask"], torch.ones_like(grown[:, batch["input_ids"].shape[1]:])], 1)
    # The images live in the cache now: transformers itself refuses them again (no placeholder is uncached).
    follow = {"input_ids": grown, "attention_mask": mask}
    second = _generate(model, follow, do_sample=False, return_dict_in_generate=True,
                       past_key_values=first.past_key_values)
    return {"first": first.sequences, "second": second.sequences, "cache": second.past_key_values}


DICT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_attentions=True,
            output_hidden_states=True)


def _forward(model: Any, batch: dict) -> Any:
    return model(**batch, output_attentions=True, output_hidden_states=True)


MODES: dict[str, Callable[[Any, dict], Any]] = {
    "greedy": _seeded(dict(do_sample=False)),
    "sampling": _seeded(dict(do_sample=True, top_k=0)),
    "beam": _seeded(dict(do_sample=False, num_beams=2)),
    "beam_sampling": _seeded(dict(do_sample=True, num_beams=2, top_k=0)),
    "static_cache": _seeded(dict(do_sample=False, cache_implementation="static")),
    "embeds": _with_embeds(dict(do_sample=False)),
    "embeds_beam": _with_embeds(dict(do_sample=False, num_beams=2)),
    "embeds_static_cache": _with_embeds(dict(do_sample=False, cache_implementation="static")),
    "past_key_values": _continued,
    "dict_outputs": _seeded(dict(do_sample=False, **DICT)),
    "dict_outputs_beam": _seeded(dict(do_sample=False, num_beams=2, **DICT)),
    "forward": _forward,
}

#: (config name, pipeline) -> a fragment of the ArrcocError every mode gets instead, or (config name, pipeline,
#: mode) -> the one that mode gets (docs/hf.md).  (Qwen given inputs_embeds numbers the prompt as text, the model
#: alone as inside apply: no refusal; it was refused, the model alone running.)
REFUSALS: dict[tuple[str, ...], str] = {
    ("llava-siglip-default", "pre_llm"): "no class token, so the model drops the first image patch",
}

#: Configs ``apply`` refuses when the block is entered: name -> (model factory, a fragment of the ModelError).
REFUSED_CONFIGS = {
    # transformers' own packing fails on the views left after dropping each view's first patch
    "llava_next-siglip-default": (functools.partial(tiny_llava_next, tower="siglip", strategy="default"),
                                  "no class token, so the model drops the first image patch"),
    # transformers itself cannot pack such views (a RuntimeError in pack_image_features): refused up front
    "llava_next-clip-full": (functools.partial(tiny_llava_next, strategy="full"),
                             "cannot reshape to its patch grid"),
}


# ---------------------------------------------------------------- compare
def _cache_lengths(cache: Any) -> list[int]:
    return [cache.get_seq_length(i) for i in range(len(cache.layers))]


def assert_same(got: Any, want: Any, where: str = "output") -> None:
    """Token ids equal; float tensors of the same shape allclose at ``ATOL``; caches of equal lengths."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__} instead of a tensor"
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} instead of {tuple(want.shape)}"
        if want.is_floating_point():
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(got, want), f"{where}: {got.tolist()} instead of {want.tolist()}"
    elif hasattr(want, "layers") and hasattr(want, "get_seq_length"):  # a transformers Cache
        assert type(got) is type(want), f"{where}: {type(got).__name__} instead of {type(want).__name__}"
        assert _cache_lengths(got) == _cache_lengths(want), f"{where}: cache lengths differ"
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), (
            f"{where}: {len(got) if isinstance(got, (tuple, list)) else type(got).__name__} entries instead of "
            f"{len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, dict) or hasattr(want, "keys"):
        keys = [k for k in want.keys() if want[k] is not None]
        assert sorted(k for k in got.keys() if got[k] is not None) == sorted(keys), f"{where}: other fields"
        for k in keys:
            assert_same(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want, f"{where}: {got!r} instead of {want!r}"


# ------------------------------------------------------------------ tests
@functools.lru_cache(maxsize=None)
def _built(name: str) -> tuple[Any, dict]:
    """Each config's model and batch, built once per test session."""
    model = CONFIGS[name].build()
    return model, CONFIGS[name].inputs(model)


@pytest.fixture(scope="module", params=list(CONFIGS))
def config(request):
    """``(name, config, model, batch)``."""
    return request.param, CONFIGS[request.param], *_built(request.param)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_keep_everything_is_invisible(config, pipeline, mode):
    name, cfg, model, batch = config
    run = MODES[mode]
    refusal = REFUSALS.get((name, pipeline), REFUSALS.get((name, pipeline, mode)))
    with torch.no_grad():
        if refusal is not None:  # (no reference: the model alone may fail there too)
            with pytest.raises(arrcoc.ArrcocError, match=refusal):
                with arrcoc.hf.apply(model, PIPELINES[pipeline]):
                    run(model, batch)
            return
        want = run(model, batch)
        with arrcoc.hf.apply(model, PIPELINES[pipeline]):
            got = run(model, batch)
    if getattr(want, "image_outputs", None) is not None:
        # With pre-LLM stages the model gets the features arrcoc assembled (mm_encoder_outputs), so its
        # image_outputs holds those alone (docs/hf.md): the features must be the model's own.
        assert_same(got.image_outputs.pooler_output, want.image_outputs.pooler_output, f"{name}: image features")
        want, got = dict(want, image_outputs=None), dict(got, image_outputs=None)
    assert_same(got, want, f"{name}/{pipeline}/{mode}")


@pytest.mark.parametrize("name", list(REFUSED_CONFIGS))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_unsupported_configs_are_refused_when_entering(name, pipeline):
    build, message = REFUSED_CONFIGS[name]
    model = build()
    with pytest.raises(arrcoc.errors.ModelError, match=message):
        with arrcoc.hf.apply(model, PIPELINES[pipeline]):
            pass
    assert "generate" not in vars(model)  # nothing was left patched


@pytest.mark.parametrize("name", ["llava", "llava_next"])
@pytest.mark.parametrize("sections", [{"compress": [{"use": "random_keep", "keep": 0.5}]},
                                      {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}], ids=["pre_llm", "in_llm"])
def test_a_prompt_given_as_embeddings_is_pruned_as_its_ids_are(name, sections):
    model, batch = _built(name)
    spec = {"encoder": {"use": "timm_vit"}, **sections}
    embeds = {**{k: v for k, v in batch.items() if k != "input_ids"},
              "inputs_embeds": model.get_input_embeddings()(batch["input_ids"])}
    with torch.no_grad(), arrcoc.hf.apply(model, spec) as run:
        from_ids = _generate(model, batch, do_sample=False, num_beams=2)
        seen_from_ids = run.report.layer_visual
        from_embeds = _generate(model, embeds, do_sample=False, num_beams=2)
        seen_from_embeds = run.report.layer_visual
    assert torch.equal(from_embeds, from_ids[:, batch["input_ids"].shape[1]:])
    assert seen_from_embeds == seen_from_ids
    full = [int(n) for n in (batch["input_ids"] == IMAGE).sum(1)]
    assert max(seen_from_ids[-1]) < min(full)  # the last layer saw fewer visual tokens in every (beam) row


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_a_fullgraph_compiled_forward_is_refused_before_it_runs(call):
    # Refused before dynamo traces anything, so nothing is compiled here (a compile would take minutes on CPU).
    model, batch = _built("llava")
    compiled = torch.compile(model.forward, fullgraph=True)
    model.forward = compiled
    try:
        with torch.no_grad(), arrcoc.hf.apply(model, PIPELINES["in_llm"]) as run:
            with pytest.raises(arrcoc.errors.ModelError, match="fullgraph=True.*Compile without fullgraph"):
                model(**batch) if call == "forward" else _generate(model, batch, do_sample=False)
            # the refusal left nothing behind: the model still answers, uncompiled
            model.forward = compiled._torchdynamo_orig_callable
            assert_same(model(**batch).logits, run.model.forward(**batch).logits)
    finally:
        vars(model).pop("forward", None)


@pytest.mark.parametrize("sections", [{"compress": [{"use": "random_keep", "keep": 0.5}]},
                                      {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}], ids=["pre_llm", "in_llm"])
def test_a_prompt_given_as_embeddings_and_ids_is_pruned_as_its_ids_are(sections):
    # generate(input_ids=..., inputs_embeds=...): the embeddings are the prefill's prompt, the ids what it returns
    # before the new tokens.  Only the ids were shortened: the model got a long prompt for the kept features
    # ("Image features and image tokens do not match").
    model, batch = _built("llava")
    spec = {"encoder": {"use": "timm_vit"}, **sections}
    both = {**batch, "inputs_embeds": model.get_input_embeddings()(batch["input_ids"])}
    with torch.no_grad(), arrcoc.hf.apply(model, spec) as run:
        from_ids = _generate(model, batch, do_sample=False)
        seen_from_ids = run.report.layer_visual
        from_both = _generate(model, both, do_sample=False)
        assert run.report.layer_visual == seen_from_ids
    assert torch.equal(from_both, from_ids)


def test_a_pad_embedding_equal_to_the_image_tokens_pads_no_placeholder():
    # Rows a pre-LLM stage shortens more get padding in front; given embeddings, the padding must not be the image
    # token's embedding (transformers would count it as a placeholder): here the pad row equals the image row, as in
    # a checkpoint whose added tokens were initialised alike (zeros).
    model = tiny_llava()
    batch = llava_inputs(model)
    n = int((batch["input_ids"] == IMAGE).sum()) // 2
    # both images in the first prompt, none in the second (it gets 2 x n / 2 columns of padding), no caller padding
    rows = [[BOS, 5, *[IMAGE] * n, 6, *[IMAGE] * n, 30, 31], [BOS, *range(7, 7 + 2 * n + 4)]]
    batch.update(input_ids=torch.tensor(rows), attention_mask=torch.ones(2, len(rows[0]), dtype=torch.long))
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        table[PAD] = table[IMAGE] = 0.0
    spec = {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 0.5}]}
    embeds = {**{k: v for k, v in batch.items() if k != "input_ids"},
              "inputs_embeds": model.get_input_embeddings()(batch["input_ids"])}
    with torch.no_grad(), arrcoc.hf.apply(model, spec):
        from_ids = _generate(model, batch, do_sample=False)
        from_embeds = _generate(model, embeds, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, batch["input_ids"].shape[1]:])


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_generate_arguments_given_by_position_or_as_inputs(pipeline):
    # generate(inputs, generation_config, ...): the generation config given by position was dropped (other lengths,
    # other tokens), and generate(inputs=ids) was an InputError with pre-LLM stages.
    from transformers import GenerationConfig

    model, batch = _built("llava")
    images = {k: v for k, v in batch.items() if k != "input_ids"}
    config = GenerationConfig(max_new_tokens=NEW + 2, do_sample=False, pad_token_id=PAD)
    calls = {
        "positional": lambda: model.generate(batch["input_ids"], config, **images),
        "inputs=": lambda: model.generate(inputs=batch["input_ids"], generation_config=config, **images),
    }
    with torch.no_grad():
        want = {name: call() for name, call in calls.items()}
        with arrcoc.hf.apply(model, PIPELINES[pipeline]):
            got = {name: call() for name, call in calls.items()}
    assert want["positional"].shape[1] == batch["input_ids"].shape[1] + NEW + 2
    assert_same(got, want, pipeline)


def test_a_fullgraph_compiled_module_or_generate_compile_config_is_refused():
    # model.compile(fullgraph=True) compiles the call, arrcoc's hooks included, and generate's compile_config
    # compiles the decoding steps: both failed inside dynamo on arrcoc's call lock ("RLock acquire"), unnamed.
    from transformers import CompileConfig

    model, batch = _built("llava")
    model.compile(fullgraph=True)
    try:
        with pytest.raises(arrcoc.errors.ModelError, match=r"model.compile\(fullgraph=True\).*Compile without"):
            with arrcoc.hf.apply(model, PIPELINES["in_llm"]):
                pass
        assert "generate" not in vars(model)
    finally:
        vars(model).pop("_compiled_call_impl", None)
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # what a GPU does with a static cache, here on the CPU
    for pipeline in PIPELINES:
        with torch.no_grad(), arrcoc.hf.apply(model, PIPELINES[pipeline]):
            with pytest.raises(arrcoc.errors.ModelError, match="compile_config fullgraph=True.*disable_compile"):
                _generate(model, batch, do_sample=False, cache_implementation="static", compile_config=config)
            assert_same(_generate(model, batch, do_sample=False, cache_implementation="static"),
                        _generate(model, batch, do_sample=False))
        assert "get_compiled_call" not in vars(model)


@pytest.mark.parametrize("sections", [{"compress": [{"use": "random_keep", "keep": 0.5}]},
                                      {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}], ids=["pre_llm", "in_llm"])
def test_qwen_prunes_a_prompt_given_as_embeddings(sections):
    # Was refused ("need input_ids"), although the model alone runs on embeddings (numbered as text).
    model, batch = _built("qwen2_vl")
    embeds = {**{k: v for k, v in batch.items() if k != "input_ids"},
              "inputs_embeds": model.get_input_embeddings()(batch["input_ids"])}
    with torch.no_grad(), arrcoc.hf.apply(model, {"encoder": {"use": "timm_vit"}, **sections}) as run:
        out = _generate(model, embeds, do_sample=False, num_beams=2)
    assert out.shape == (2, NEW)
    full = [int(n) for n in (batch["input_ids"] == QWEN_IMAGE).sum(1)]
    assert max(run.report.layer_visual[-1]) < min(full)  # every (beam) row saw fewer visual tokens


@pytest.mark.parametrize("prompt", ["ids", "embeds", "both"])
def test_max_length_counts_the_callers_prompt_when_pre_llm_stages_shorten_it(prompt):
    # max_length counts the prompt: a prompt shortened by 32 columns made 32 more new tokens than the model alone
    # (108 columns returned for max_length=76).
    model, batch = _built("llava")
    L = batch["input_ids"].shape[1]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    given = {"ids": batch, "embeds": {**{k: v for k, v in batch.items() if k != "input_ids"}, "inputs_embeds": embeds},
             "both": {**batch, "inputs_embeds": embeds}}[prompt]
    spec = {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 0.5}]}
    with torch.no_grad(), arrcoc.hf.apply(model, spec) as run:
        out = model.generate(**given, max_length=L + 4, pad_token_id=PAD, do_sample=False)
        assert max(run.report.layer_visual[0]) < int((batch["input_ids"] == IMAGE).sum(1).min())  # shortened
        from_config = model.generate(**given, pad_token_id=PAD, do_sample=False,
                                     generation_config=GenerationConfig(max_length=L + 2))
    assert out.shape[1] == (4 if prompt == "embeds" else L + 4)
    assert from_config.shape[1] == (2 if prompt == "embeds" else L + 2)


def test_a_streamer_gets_the_callers_prompt_when_pre_llm_stages_shorten_it():
    # generate puts the prompt it got first: the shortened one (40 columns for 72) while it returns the caller's.
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.reshape(1, -1))

        def end(self):
            self.puts.append("end")

    model, batch = _built("llava")
    one = {k: v[1:] for k, v in batch.items()}  # streamers take one prompt
    streamer = Recorder()
    spec = {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 0.5}]}
    with torch.no_grad(), arrcoc.hf.apply(model, spec):
        out = _generate(model, one, do_sample=False, streamer=streamer)
    assert streamer.puts[-1] == "end"
    assert torch.equal(torch.cat(streamer.puts[:-1], 1), out)  # the prompt, then each new token
