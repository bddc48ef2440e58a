"""arrcoc.hf on Qwen2-VL: ragged image sizes, multimodal rotary positions, pre-LLM and in-LLM pruning.

The reference for dropping is the unmodified model on the FULL prompt with
the dropped image tokens masked as keys (in every layer for pre-LLM
dropping, from layer K on for FastV), positions computed by the model
itself from the full prompt: removal with original positions must equal it.
"""

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from tiny_models import QWEN_END as END, QWEN_IMAGE as IMAGE, QWEN_START as START, generate_positions, left_pad
from tiny_models import tiny_qwen2_vl
from arrcoc.errors import ModelError, MissingInputError
from arrcoc.integrations.hf.compat import cache_kwarg

GRIDS = [[1, 8, 12], [1, 6, 6], [1, 4, 8]]  # 24, 9 and 8 merged tokens




@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_vl()


def inputs(images=(0, 1, 2), texts=((3, 5), (2, 8), (4, 2))):
    grids = torch.tensor([GRIDS[i] for i in images])
    pixels = torch.cat([torch.randn(int(torch.tensor(GRIDS[i]).prod()), 1176, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(i)) for i in images])
    rows = []
    for i, (pre, post) in zip(images, texts):
        n = GRIDS[i][1] * GRIDS[i][2] // 4
        rows.append([1, *range(10, 10 + pre), START, *[IMAGE] * n, END, *range(50, 50 + post)])
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grids,
            "mm_token_type_ids": (ids == IMAGE).int()}


def spec(**sections):
    return {"encoder": {"use": "timm_vit"}, **sections}


def greedy(model, batch, n=6):
    return model.generate(**batch, max_new_tokens=n, do_sample=False)


def masked_reference(model, batch, dropped, from_layer=0):
    """Last-position logits of the full prompt with ``dropped`` [B, L] keys masked from ``from_layer`` on."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    B, L = ids.shape
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    base = causal[None] & mask[:, None, :]
    eye = torch.eye(L, dtype=torch.bool)[None]
    plain = (base | eye)[:, None]  # padding rows see themselves: no NaN rows
    pruned = ((base & ~dropped[:, None, :]) | eye)[:, None]
    hooks = []
    if from_layer > 0:
        for i, layer in enumerate(model.model.language_model.layers):
            if i >= from_layer:
                hooks.append(layer.register_forward_pre_hook(
                    lambda m, a, k: (a, {**k, "attention_mask": pruned}), with_kwargs=True))
    try:
        full = dict(batch)
        # The model computes its own mrope positions from the full prompt; the 4-D mask is used as given.
        positions, _ = model.model.get_rope_index(ids, batch["mm_token_type_ids"], batch["image_grid_thw"],
                                                  attention_mask=batch["attention_mask"])
        text = generate_positions(batch["attention_mask"])
        full.update(attention_mask=plain if from_layer > 0 else pruned,
                    position_ids=torch.cat([text[None], positions], 0))
        out = model(**full)
    finally:
        for h in hooks:
            h.remove()
    return out.logits[:, -1]


def kept_raster(state, grids):
    """Per image, the raster indices (on its own merged grid) of the tokens a state kept."""
    out = []
    for b, (t, h, w) in enumerate(grids.tolist()):
        n = int(state.counts[b])
        rc = state.positions[b, :n].round().long()
        out.append(sorted((rc[:, 0] * (w // 2) + rc[:, 1]).tolist()))
    return out


def dropped_columns(batch, kept):
    ids = batch["input_ids"]
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        cols = (ids[b] == IMAGE).nonzero().flatten()
        keep = torch.zeros(len(cols), dtype=torch.bool)
        keep[kept[b]] = True
        dropped[b, cols[~keep]] = True
    return dropped


@pytest.mark.parametrize("stages", [{}, {"compress": [{"use": "random_keep", "keep": 1.0}]},
                                    {"llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]}],
                         ids=["none", "pre_llm", "in_llm"])
@pytest.mark.parametrize("images", [(0,), (0, 1, 2)], ids=["batch1", "batch3_sizes"])
def test_keep_everything_is_the_unmodified_model(model, stages, images):
    batch = inputs(images, ((3, 5), (2, 8), (4, 2))[: len(images)])
    with torch.no_grad():
        ref_logits, ref_tokens = model(**batch).logits[:, -1], greedy(model, batch)
        with arrcoc.hf.apply(model, spec(**stages)):
            logits, tokens = model(**batch).logits[:, -1], greedy(model, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def test_pre_llm_dropping_equals_masking_with_original_positions(model):
    batch = inputs()
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])) as run:
        logits = model(**batch).logits[:, -1]
    kept = kept_raster(run.state, batch["image_grid_thw"])
    assert [len(k) for k in kept] == [12, 4, 4]
    with torch.no_grad():
        ref = masked_reference(model, batch, dropped_columns(batch, kept))
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


def test_fastv_equals_masking_from_layer_k(model):
    batch = inputs()
    with torch.no_grad(), arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": 2, "keep": 0.5}])) as run:
        logits = model(**batch).logits[:, -1]
    assert run.report.layer_visual == [[24, 9, 8], [24, 9, 8], [12, 4, 4], [12, 4, 4]]
    state = run.llm_states["llm[0]@2"]
    kept = kept_raster(state, batch["image_grid_thw"])
    with torch.no_grad():
        ref = masked_reference(model, batch, dropped_columns(batch, kept), from_layer=2)
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("stages", [{"compress": [{"use": "tome", "r": 3, "metric": "tokens"}]},
                                    {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}], ids=["pre", "in"])
def test_batched_equals_per_sample(model, stages):
    batch = inputs()
    with torch.no_grad(), arrcoc.hf.apply(model, spec(**stages)):
        together = greedy(model, batch)
        L = batch["input_ids"].shape[1]
        for b, image in enumerate((0, 1, 2)):
            one = inputs((image,), [((3, 5), (2, 8), (4, 2))[b]])
            alone = greedy(model, one)
            assert torch.equal(alone[0, one["input_ids"].shape[1]:], together[b, L:])


@pytest.mark.parametrize("side", ["pre", "both"])
def test_batched_equals_per_sample_when_rows_lose_different_counts(model, side):
    """Half of each image dropped (24, 9, 8 tokens: rows lose 12, 5 and 4), so the shortened rows get different
    amounts of padding in front: each row's scores equal a one-prompt run's (random_keep draws image b with
    seed + b; its one-image run takes seed b).  tome above drops the same count from every image."""
    def stages(seed):
        pre = {"compress": [{"use": "random_keep", "keep": 0.5, "seed": seed}]}
        return spec(**pre, llm=[{"use": "fastv", "layer": 2, "keep": 0.5}]) if side == "both" else spec(**pre)

    texts = ((3, 5), (2, 8), (4, 2))
    batch = inputs()
    options = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        with arrcoc.hf.apply(model, stages(0)) as run:
            together = model.generate(**batch, **options)
        assert run.report.layer_visual[0] == [12, 4, 4]
        L = batch["input_ids"].shape[1]
        for b in range(3):
            one = inputs((b,), [texts[b]])
            with arrcoc.hf.apply(model, stages(b)):
                alone = model.generate(**one, **options)
            assert torch.equal(alone.sequences[0, one["input_ids"].shape[1]:], together.sequences[b, L:])
            for got, want in zip(together.scores, alone.scores):
                torch.testing.assert_close(got[b], want[0], atol=1e-8, rtol=0)


def test_methods_that_need_a_class_token_are_refused(model):
    with pytest.raises(MissingInputError, match="no class token"):
        with arrcoc.hf.apply(model, spec(compress=[{"use": "hired", "keep": 0.5}])):
            pass


def test_compact_positions_are_refused_with_multimodal_rope(model):
    batch = inputs()
    with pytest.raises(ModelError, match="multimodal rotary"):
        with torch.no_grad(), arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": 2, "keep": 0.5,
                                                                 "positions": "compact"}])):
            model(**batch)


# ------------------------------------------------- sliding-window text models
def _windowed_qwen2_vl(window: int, full_layers: int = 0):
    """The tiny Qwen2-VL whose decoder layers from ``full_layers`` on attend in a window of ``window`` keys."""
    return tiny_qwen2_vl(use_sliding_window=True, sliding_window=window, max_window_layers=full_layers)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_behind_a_sliding_window_dict_mask(attn):
    """A model whose every layer attends in a window gets ``{"sliding_attention": 4-D}`` only: its last row hides
    the real columns before the window, so each new column is read from its own row (it read them as padding)."""
    from transformers import DynamicCache, Qwen2Config
    from transformers.masking_utils import create_masks_for_generate

    from arrcoc.integrations.hf.prompt import padding_mask

    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         use_sliding_window=True, sliding_window=3, max_window_layers=0, vocab_size=100)
    config._attn_implementation = attn
    mask2d = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]])
    masks = create_masks_for_generate(config=config, inputs_embeds=torch.empty(2, 8, 0), attention_mask=mask2d,
                                      position_ids=None,
                                      **cache_kwarg(create_masks_for_generate, DynamicCache(config=config)))
    assert list(masks) == ["sliding_attention"]
    assert padding_mask(masks).tolist() == mask2d.tolist()
    # Two new columns after six cached ones (a 4-D mask handed over as is): the new ones read from their rows.
    step = masks["sliding_attention"][:, :, 6:, :]
    assert padding_mask({"sliding_attention": step}, past=6)[:, 6:].tolist() == mask2d[:, 6:].tolist()


def test_a_forward_handed_a_sliding_window_dict_mask_is_the_model(model):
    """Pre-LLM stages on a windowed model handed the dict of masks a static cache uses: the model's own logits (the
    padding read from the window's last row masked real tokens; get_rope_index then failed)."""
    from transformers import StaticCache
    from transformers.masking_utils import create_masks_for_generate

    windowed = _windowed_qwen2_vl(6)
    batch = inputs((1, 2), ((2, 8), (4, 2)))
    B, L = batch["input_ids"].shape

    def forward():
        cache = StaticCache(config=windowed.config.text_config, max_cache_len=L + 4)
        mask = create_masks_for_generate(config=windowed.config.text_config, attention_mask=batch["attention_mask"],
                                         inputs_embeds=torch.empty(B, L, 0, dtype=windowed.dtype), position_ids=None,
                                         **cache_kwarg(create_masks_for_generate, cache))
        assert list(mask) == ["sliding_attention"]
        positions, _ = windowed.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                     batch["image_grid_thw"], attention_mask=batch["attention_mask"])
        return windowed(**{**batch, "attention_mask": mask}, position_ids=positions, past_key_values=cache).logits

    with torch.no_grad():
        want = forward()
        with arrcoc.hf.apply(windowed, spec(compress=[{"use": "random_keep", "keep": 1.0}])):
            got = forward()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("full_layers", [0, 3], ids=["all_windowed", "windowed_from_3"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_in_llm_stages_keep_each_layers_window(full_layers, cache):
    """llm: stages on a model whose layers attend in windows: each layer from the stage's on gets the mask of its
    own attention type (they all got one full causal mask).  Keeping everything is the model; dropping half
    decodes alike with either cache."""
    windowed = _windowed_qwen2_vl(6, full_layers)
    batch = inputs((1, 2), ((2, 8), (4, 2)))
    options = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True,
                   cache_implementation=cache)
    with torch.no_grad():
        want = windowed.generate(**batch, **options)
        for layer in (1, 2):
            with arrcoc.hf.apply(windowed, spec(llm=[{"use": "fastv", "layer": layer, "keep": 1.0}])):
                got = windowed.generate(**batch, **options)
            assert torch.equal(got.sequences, want.sequences)
            for a, b in zip(got.scores, want.scores):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_in_llm_stages_refuse_attention_types_whose_masks_they_cannot_build():
    windowed = _windowed_qwen2_vl(6, 3)
    windowed.config.text_config.layer_types = ["full_attention"] * 3 + ["chunked_attention"]
    with pytest.raises(ModelError, match=r"attention type \['chunked_attention'\].*pre-LLM stages only"):
        with arrcoc.hf.apply(windowed, spec(llm=[{"use": "fastv", "layer": 2, "keep": 0.5}])):
            pass
    with arrcoc.hf.apply(windowed, spec(compress=[{"use": "random_keep", "keep": 0.5}])):  # pre-LLM only: runs
        pass


def test_a_pruned_conversation_goes_on_from_a_copy_of_its_cache_after_other_prompts(model):
    """transformers' prompt-reuse pattern, after a generate on other prompts (three of other sizes): a
    continuation from ``copy.deepcopy`` of the cache of a prompt shortened before the LLM goes on from the short
    prompt (the copy was not recognised: the caller's long ids were read against the short cache), numbered by
    that prompt's rotary offsets (rope_deltas counting ITS dropped tokens; the other generate's were used)."""
    import copy

    batch = inputs((1, 2), ((2, 8), (4, 2)))
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])):
        whole = model.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                               output_scores=True)
        first = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        greedy(model, inputs(), n=2)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
        second = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                past_key_values=copy.deepcopy(first.past_key_values), return_dict_in_generate=True,
                                output_scores=True)
    assert torch.equal(second.sequences, whole.sequences)
    for got, want in zip(second.scores, whole.scores[3:]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
