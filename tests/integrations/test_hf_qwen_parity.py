"""Qwen2-VL / Qwen2.5-VL: ``arrcoc.hf.apply`` with a pipeline that keeps everything is invisible.

``test_hf_generate_parity.py`` runs every generate mode on one batch of each
family (two image sizes, left-padded) and its comparison, ``assert_same``,
is used here.  This file adds the prompt shapes Qwen's prompts take
(:data:`PROMPTS`) x family (:data:`FAMILIES`, eager attention too) x
keep-everything pipeline (:data:`PIPELINES`: pre-LLM and in-LLM) x mode
(:data:`MODES`), each once on the bare model and once inside ``apply``: token
ids equal; scores, logits, attentions and hidden states of the same shapes and
allclose at 1e-5 (float64); caches of equal lengths per layer.

The prompt shapes are the ones where a token used to go missing (attention
``[.., 38, 38]`` instead of ``39, 39``, a cache one shorter, a mask of 42
against 39 keys when continuing from ``past_key_values``): arrcoc rebuilt the
prompt from its real tokens only, so any column the caller had masked (left
padding when every row has some, a pad id inside a prompt) was dropped.  And
``generate`` with a static cache hands the model a dict of 4-D masks, which
arrcoc read as a tensor (``'dict' object has no attribute 'bool'``).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from arrcoc.errors import InputError
from arrcoc.integrations.hf.compat import cache_kwarg
from arrcoc.integrations.hf.prompt import padding_mask, shrink_prompts
from test_hf_generate_parity import DICT, NEW, PIPELINES, assert_same
from tiny_models import BOS, PAD, QWEN_END as END, QWEN_IMAGE as IMAGE, QWEN_START as START
from tiny_models import tiny_qwen2_5_vl, tiny_qwen2_vl

#: (t, h, w) patch grids; 2 x 2 patches merge into one token: 8, 9 and 4 placeholders.
GRIDS = {"wide": (1, 4, 8), "square": (1, 6, 6), "small": (1, 4, 4)}


# ------------------------------------------------------------------ inputs
def qwen_batch(rows: list[list[Any]], with_mask: bool = True, side: str = "left") -> dict:
    """Prompts from token rows where a grid name stands for that image's placeholders; left-padded with PAD, and
    every PAD masked.  ``with_mask=False`` passes no attention mask (``generate`` infers the same one);
    ``side="right"`` pads on the right (transformers warns, and generates after the padding)."""
    grids, pixels, prompts = [], [], []
    for row in rows:
        prompt = []
        for item in row:
            if isinstance(item, str):
                t, h, w = GRIDS[item]
                grids.append([t, h, w])
                pixels.append(torch.randn(t * h * w, 1176, dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(len(grids))))
                prompt += [IMAGE] * (t * h * w // 4)
            else:
                prompt.append(item)
        prompts.append(prompt)
    L = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (L - len(p)) + p if side == "left" else p + [PAD] * (L - len(p)) for p in prompts])
    batch = {"input_ids": ids, "pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids),
             "mm_token_type_ids": (ids == IMAGE).int()}
    if with_mask:
        batch["attention_mask"] = (ids != PAD).long()
    return batch


#: name -> (batch builder, the modes it runs; None: every mode).
PROMPTS: dict[str, tuple[Callable[[], dict], tuple[str, ...] | None]] = {
    # Two sizes in one batch, text before and after, left padding (every mode: test_hf_generate_parity.py).
    "sizes": (lambda: qwen_batch([[BOS, 10, 11, START, "wide", END, 50, 51, 52], [BOS, START, "square", END, 50]]),
              ("past_key_values",)),
    # Two images in one prompt with text between them, one in the other.
    "two_images": (lambda: qwen_batch([[BOS, START, "wide", END, 12, 13, START, "small", END, 50, 51],
                                       [BOS, 14, START, "square", END, 50, 51, 52]]), None),
    # Two sizes, no padding.
    "same_length": (lambda: qwen_batch([[BOS, 10, START, "wide", END, 50, 51], [BOS, 11, START, "square", END, 50]]),
                    ("greedy", "dict_outputs", "forward")),
    # One prompt, left-padded: every row starts with padding.
    "padded_alone": (lambda: qwen_batch([[PAD, PAD, BOS, 10, START, "small", END, 50]]),
                     ("greedy", "dict_outputs", "past_key_values", "forward")),
    # A prompt starting with an image (no BOS, no vision_start) and one ending with it (nothing after).
    "image_first_and_last": (lambda: qwen_batch([["small", 50, 51], [BOS, 10, START, "wide"]]),
                             ("greedy", "dict_outputs", "past_key_values")),
    # Text between vision_start and the image, and between the image and vision_end.
    "text_inside_vision": (lambda: qwen_batch([[BOS, START, 20, "wide", 21, END, 50]]), ("greedy", "dict_outputs")),
    # Both images in one prompt, none in the other.
    "no_image_row": (lambda: qwen_batch([[BOS, START, "wide", END, START, "small", END, 50], [BOS, 10, 11, 12]]),
                     ("greedy", "dict_outputs", "past_key_values")),
    # Right padding.
    "right_padded": (lambda: qwen_batch([[BOS, 10, START, "small", END, 50, 51, 52, 53], [BOS, START, "wide", END]],
                                        side="right"), ("greedy", "dict_outputs")),
    # A pad id inside the prompt and no attention mask: generate masks it.
    "pad_inside": (lambda: qwen_batch([[BOS, 10, PAD, START, "small", END, 50],
                                       [BOS, 11, START, "square", END, PAD, 51]], with_mask=False),
                   ("greedy", "dict_outputs", "past_key_values")),
}


def _eager(build: Callable[..., Any]) -> Callable[[], Any]:
    """The model in float32 with eager attention (in float64 the model's own eager attention turns a padded
    prompt into NaN, arrcoc or not)."""
    def eager():
        model = build(torch.float32)
        model.set_attn_implementation("eager")
        return model
    return eager


#: name -> (model factory, the prompts and the modes it runs; None: all).  With eager attention the attentions
#: are returned (sdpa returns empty tuples) and compared too.
FAMILIES: dict[str, tuple[Callable[[], Any], tuple[str, ...] | None, tuple[str, ...] | None]] = {
    "qwen2_vl": (tiny_qwen2_vl, None, None),
    "qwen2_5_vl": (tiny_qwen2_5_vl, None, None),
    **{f"{name}-eager": (_eager(build), ("two_images", "padded_alone", "same_length"), ("dict_outputs", "forward"))
       for name, build in (("qwen2_vl", tiny_qwen2_vl), ("qwen2_5_vl", tiny_qwen2_5_vl))},
}


# ------------------------------------------------------------------- modes
def _generate(model: Any, batch: dict, **options: Any) -> Any:
    torch.manual_seed(0)
    return model.generate(**batch, max_new_tokens=NEW, **options)


def _continued(model: Any, batch: dict) -> dict:
    """Generate, then go on from the returned cache with the grown sequences (a second turn; its images are in
    the cache already: Qwen's own generate refuses them again, tokens: 0, features: n)."""
    model.model.rope_deltas = None  # as loaded: no rotary offsets left behind by an earlier call
    first = _generate(model, batch, do_sample=False, return_dict_in_generate=True)
    follow = {"input_ids": first.sequences}
    if "attention_mask" in batch:
        grown = first.sequences.shape[1] - batch["input_ids"].shape[1]
        follow["attention_mask"] = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(
            batch["attention_mask"].shape[0], grown)], 1)
    second = _generate(model, follow, do_sample=False, return_dict_in_generate=True, output_scores=True,
                       past_key_values=first.past_key_values)
    return {"first": first.sequences, "second": second.sequences, "scores": second.scores,
            "cache": second.past_key_values}


def _embeds(model: Any, batch: dict) -> Any:
    batch = dict(batch)
    batch["inputs_embeds"] = model.get_input_embeddings()(batch.pop("input_ids"))
    return _generate(model, batch, do_sample=False)


def _forward(model: Any, batch: dict) -> dict:
    """A forward's outputs; of ``image_outputs`` the features the LLM got.  (A pre-LLM pipeline hands the model
    its features through ``mm_encoder_outputs``, so the tower's own hidden states and attentions, which the
    model returns there when asked, are not returned: a documented difference, docs/hf.md.)"""
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    fields = {k: v for k, v in out.items() if k != "image_outputs"}
    # Outputs carry the features the LLM got from transformers 5.24 on; on older releases the other fields compare.
    image = getattr(out, "image_outputs", None)
    return fields if image is None else {**fields, "image_features": image.pooler_output}


MODES: dict[str, Callable[[Any, dict], Any]] = {
    "greedy": lambda m, b: _generate(m, b, do_sample=False),
    "sampling": lambda m, b: _generate(m, b, do_sample=True, top_k=0),
    "beam": lambda m, b: _generate(m, b, do_sample=False, num_beams=2, return_dict_in_generate=True,
                                   output_scores=True),
    "beam_sampling": lambda m, b: _generate(m, b, do_sample=True, num_beams=2, top_k=0, num_return_sequences=2),
    "static_cache": lambda m, b: _generate(m, b, do_sample=False, cache_implementation="static",
                                           return_dict_in_generate=True, output_scores=True),
    "past_key_values": _continued,
    "dict_outputs": lambda m, b: _generate(m, b, do_sample=False, **DICT),
    "forward": _forward,
    "inputs_embeds": _embeds,
}

#: mode -> a fragment of the error the model ALONE raises on a prompt (transformers 5.25): given embeddings, it
#: numbers the prompt as text and its generate fails on two images in one prompt ("Sizes of tensors must match").
#: Inside apply an in-LLM pipeline fails the same way; a pre-LLM one hands the model its features
#: (mm_encoder_outputs) and runs.  On one image per prompt both equal the model (test_hf_generate_parity.py).
MODEL_FAILS = {("two_images", "inputs_embeds"): "Sizes of tensors must match"}


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def family(request):
    """``(name, model, reference cache)``: each model built once; each reference computed once."""
    return request.param, FAMILIES[request.param][0](), {}


CASES = [(family, prompt, mode) for family, (_, prompts, only) in FAMILIES.items()
         for prompt, (_, modes) in PROMPTS.items() if prompts is None or prompt in prompts
         for mode in (modes or MODES) if only is None or mode in only]


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("family, prompt, mode", CASES, ids=["-".join(c) for c in CASES], indirect=["family"])
def test_keep_everything_is_invisible(family, prompt, mode, pipeline):
    name, model, references = family
    batch = PROMPTS[prompt][0]()
    run = MODES[mode]
    failure = MODEL_FAILS.get((prompt, mode))
    with torch.no_grad():
        if failure is not None:
            with pytest.raises(RuntimeError, match=failure):
                run(model, batch)
            with arrcoc.hf.apply(model, PIPELINES[pipeline]):
                if pipeline == "in_llm":
                    with pytest.raises(RuntimeError, match=failure):
                        run(model, batch)
                else:
                    assert run(model, batch).shape == (batch["input_ids"].shape[0], NEW)
            return
        if (prompt, mode) not in references:
            references[prompt, mode] = run(model, batch)
        with arrcoc.hf.apply(model, PIPELINES[pipeline]):
            got = run(model, batch)
    assert_same(got, references[prompt, mode], f"{name}/{prompt}/{pipeline}/{mode}")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"], indirect=True)
def test_forward_with_a_prepared_dict_mask(family):
    """A forward handed the dict of 4-D masks ``generate`` prepares for a static cache (as compiled decoding
    does) gives the model's own logits; arrcoc reads the padding behind the dict."""
    from transformers import StaticCache
    from transformers.masking_utils import create_masks_for_generate

    name, model, _ = family
    batch = PROMPTS["sizes"][0]()
    B, L = batch["input_ids"].shape

    def forward():
        cache = StaticCache(config=model.config.text_config, max_cache_len=L + 4)
        mask = create_masks_for_generate(
            config=model.config.text_config, inputs_embeds=torch.empty(B, L, 0, dtype=model.dtype),
            attention_mask=batch["attention_mask"], position_ids=None, **cache_kwarg(create_masks_for_generate, cache))
        assert isinstance(mask, dict)
        position_ids, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                     batch["image_grid_thw"], attention_mask=batch["attention_mask"])
        return model(**{**batch, "attention_mask": mask}, position_ids=position_ids, past_key_values=cache).logits

    with torch.no_grad():
        want = forward()
        for pipeline in PIPELINES.values():
            with arrcoc.hf.apply(model, pipeline):
                assert_same(forward(), want, f"{name}/dict mask")


# ------------------------------------------------------ the prompt helpers
def test_shrinking_keeps_masked_columns_in_place():
    """Dropping placeholders leaves every other column where it was, padding and masked pad ids included;
    shorter rows get padding in front."""
    ids = torch.tensor([[PAD, BOS, IMAGE, IMAGE, IMAGE, 7, PAD, 8],
                        [BOS, 5, IMAGE, IMAGE, IMAGE, IMAGE, 9, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    new_ids, new_mask, index, valid = shrink_prompts(ids, mask, IMAGE, PAD, [3, 4], torch.tensor([3, 1]))
    assert new_ids.tolist() == [[PAD, BOS, IMAGE, IMAGE, IMAGE, 7, PAD, 8],
                                [PAD, PAD, PAD, BOS, 5, IMAGE, 9, 9]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    assert valid.tolist() == [[True] * 8, [False] * 3 + [True] * 5]
    assert index[1, 3:].tolist() == [0, 1, 2, 6, 7]
    # Keeping everything is the identity, even when every row starts with padding.
    kept = shrink_prompts(ids[:1], mask[:1], IMAGE, PAD, [3], torch.tensor([3]))
    assert torch.equal(kept[0], ids[:1]) and torch.equal(kept[1], mask[:1])


def test_padding_mask_reads_every_mask_form():
    mask2d = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    bool4d = causal[None, None] & mask2d.bool()[:, None, None, :]
    eager4d = torch.zeros(2, 1, 4, 4, dtype=torch.float64).masked_fill(~bool4d, torch.finfo(torch.float64).min)
    static = torch.cat([bool4d, torch.zeros(2, 1, 4, 3, dtype=torch.bool)], -1)  # a static cache's spare room
    for form in (mask2d, bool4d, eager4d, {"full_attention": bool4d}, {"full_attention": static}):
        assert padding_mask(form).tolist() == mask2d.tolist()
    assert padding_mask(None) is None and padding_mask({"full_attention": None}) is None
    # Decoding: one query after 4 cached columns; the mask covers past + 1 keys (of a static cache's 7).
    step = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    assert padding_mask({"full_attention": step}, past=4).tolist() == [[0, 1, 1, 1, 1], [1, 1, 0, 1, 1]]
    with pytest.raises(InputError, match=r"2-D \[batch, length\] or 4-D .* got shape \(2, 4, 4\)"):
        padding_mask(bool4d[:, 0])
    with pytest.raises(InputError, match="attention mask as a tensor .* got str"):
        padding_mask({"full_attention": "block"})


# ------------------------------------------------------- pruning, static cache
@pytest.mark.parametrize("stages", [{"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]},
                                    {"compress": [{"use": "random_keep", "keep": 0.5}]}], ids=["in_llm", "pre_llm"])
@pytest.mark.parametrize("family", ["qwen2_vl"], indirect=True)
def test_pruning_with_a_static_cache_equals_the_dynamic_cache(family, stages):
    """Half the visual tokens dropped: a static cache (its layers past the pruning layer hold fewer entries, and
    the model gets its masks as a dict) decodes exactly as the dynamic one."""
    name, model, _ = family
    batch = PROMPTS["sizes"][0]()
    pipeline = {"encoder": {"use": "timm_vit"}, **stages}
    runs = {}
    with torch.no_grad(), arrcoc.hf.apply(model, pipeline) as run:
        for cache in ("dynamic", "static"):
            runs[cache] = _generate(model, batch, do_sample=False, cache_implementation=cache,
                                    return_dict_in_generate=True, output_scores=True)
            visual = run.report.layer_visual
    assert visual[-1] == [4, 4]  # of 8 and 9 image tokens
    assert torch.equal(runs["static"].sequences, runs["dynamic"].sequences)
    assert_same(runs["static"].scores, runs["dynamic"].scores, f"{name}/static cache scores")


@pytest.mark.parametrize("family", ["qwen2_vl"], indirect=True)
def test_a_fullgraph_compiled_forward_is_refused_before_it_runs(family):
    """Refused before dynamo traces anything (nothing is compiled here), and the model is left as it was."""
    name, model, _ = family
    batch = PROMPTS["sizes"][0]()
    compiled = torch.compile(model.forward, fullgraph=True)
    model.forward = compiled
    try:
        with torch.no_grad(), arrcoc.hf.apply(model, PIPELINES["pre_llm"]):
            with pytest.raises(arrcoc.errors.ModelError, match="fullgraph=True.*Compile without fullgraph"):
                model(**batch)
            with pytest.raises(arrcoc.errors.ModelError, match="fullgraph=True"):
                _generate(model, batch, do_sample=False)
    finally:
        del model.forward
    assert "forward" not in vars(model) and "generate" not in vars(model)


# ------------------------------------------------- a pruned conversation goes on
HALF = {"in_llm": {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]},
        "pre_llm": {"compress": [{"use": "random_keep", "keep": 0.5}]}}


@pytest.mark.parametrize("stages", list(HALF))
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"], indirect=True)
def test_a_pruned_conversation_goes_on_from_its_cache(family, stages):
    """Three new tokens, then three more from the returned cache, equal six in one generate.  With pre-LLM
    pruning the cache holds the shortened prompt while generate returned the caller's: the second call is
    rebuilt on the short one (it used to read the wrong columns as uncached and number them wrongly)."""
    name, model, _ = family
    batch = PROMPTS["sizes"][0]()
    with torch.no_grad(), arrcoc.hf.apply(model, {"encoder": {"use": "timm_vit"}, **HALF[stages]}):
        whole = model.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                               output_scores=True)
        first = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
        second = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                past_key_values=first.past_key_values, return_dict_in_generate=True,
                                output_scores=True)
        if stages == "pre_llm":
            with pytest.raises(InputError, match="shortened before the LLM; continue them with the sequences"):
                model.generate(input_ids=first.sequences[:, 1:], attention_mask=mask[:, 1:], max_new_tokens=1,
                               past_key_values=first.past_key_values)
    assert torch.equal(second.sequences, whole.sequences)
    assert_same(second.scores, whole.scores[3:], f"{name}/{stages}: scores of the second call")
