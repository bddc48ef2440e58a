"""arrcoc.hf on Gemma 3: a fixed 16 tokens per image, several images per prompt, bidirectional image blocks.

The tiny model (tiny_gemma3.py) alternates sliding-window and full-attention layers with their own rotary
bases, and attends bidirectionally among the tokens of one image (``token_type_ids``).  Every expectation is
computed independently of the integration: by the unmodified model (outside the context), by the model on a
hand-built short prompt that carries the kept features and consistent ``token_type_ids``, or by a decoder run by
hand over the model's modules with masks written here (the FastV reference).  float64 throughout.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc.errors import InputError  # noqa: E402
from arrcoc.integrations.hf.compat import output_cache  # noqa: E402
from test_hf_support_matrix import MATRIX, check_cell  # noqa: E402
from tiny_gemma3 import IMAGE, batch, shortened, tiny_gemma3  # noqa: E402

NEW = 10  # new tokens per greedy generation
#: Text before / after and images of the three prompts (the second: two images, as a pan-and-scan crop makes).
ROWS = [(3, 5, 1), (2, 8, 2), (4, 2, 1)]
#: Gemma 3's RMSNorm computes in float32 even in a float64 model, so one prompt alone and in a padded batch differ
#: by ~1.2e-7 in the unmodified model itself: comparisons across batch layouts use this tolerance (same layout: 1e-8).
ACROSS_LAYOUTS = 1e-6


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


def spec(**sections):
    return {"encoder": {"use": "timm_vit"}, **sections}


def greedy(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def kept_raster(state):
    """Per state row, the raster indices (on its 4 x 4 grid, or its 1 x N row) of the tokens it kept, in order."""
    cols = state.grid[1]
    return [(state.positions[b, :int(n)].round().long() @ torch.tensor([cols, 1])).tolist()
            for b, n in enumerate(state.counts.tolist())]


def features_of(model, pixels, kept):
    """The model's own pooled image features, image ``i`` keeping rows ``kept[i]`` in that order: [1, K, D]."""
    pooled = model.model.get_image_features(pixels).pooler_output
    return torch.cat([pooled[i, k] for i, k in enumerate(kept)])[None]


def on_short_prompt(model, inputs, kept, token_types=True):
    """The unmodified model on the hand-built short prompt carrying the kept features: last-position logits."""
    short = shortened(inputs, [len(k) for k in kept])
    if not token_types:
        short.pop("token_type_ids")
    feats = {"image": BaseModelOutputWithPooling(pooler_output=features_of(model, inputs["pixel_values"], kept))}
    return model(**short, mm_encoder_outputs=feats).logits[:, -1], short, feats


# ------------------------------------------------------------------------------------------- keep everything
@pytest.mark.parametrize("stages", [
    {}, {"compress": [{"use": "random_keep", "keep": 1.0}]},
    {"llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]}],
    ids=["none", "random_keep", "fastv"])
@pytest.mark.parametrize("rows", [ROWS[:1], ROWS], ids=["batch1", "batch3"])
def test_keep_everything_is_the_unmodified_model(model, stages, rows):
    inputs = batch(rows)
    with torch.no_grad():
        ref_logits, ref_tokens = model(**inputs).logits, greedy(model, inputs)
        with arrcoc.hf.apply(model, spec(**stages)):
            logits, tokens = model(**inputs).logits, greedy(model, inputs)
    real = inputs["attention_mask"].bool()
    assert torch.equal(logits[real], ref_logits[real])
    assert torch.equal(tokens, ref_tokens)


def test_keep_everything_without_token_types_is_the_causal_model(model):
    # No token_type_ids: the model attends causally, and so does the prompt arrcoc hands it.
    inputs = batch(ROWS, token_types=False)
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
        with arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 1.0}])):
            assert torch.equal(model(**inputs).logits[:, -1], ref)


# ------------------------------------------------------------------------------------------- pre-LLM dropping
def test_pre_llm_dropping_equals_the_short_prompt_and_keeps_each_image_bidirectional(model):
    inputs = batch(ROWS)
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])) as run:
        logits, tokens = model(**inputs).logits[:, -1], greedy(model, inputs)
    kept = kept_raster(run.state)
    assert [len(k) for k in kept] == [8, 8, 8, 8]
    assert run.report.layer_visual[0] == [8, 16, 8]
    with torch.no_grad():
        ref, short, feats = on_short_prompt(model, inputs, kept)
        ref_tokens = model.generate(**short, mm_encoder_outputs=feats, max_new_tokens=NEW, do_sample=False)
        causal, _, _ = on_short_prompt(model, inputs, kept, token_types=False)
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(tokens[:, L:], ref_tokens[:, short["input_ids"].shape[1]:])
    # The kept tokens of an image still see each other both ways: the same short prompt read causally (the
    # token types dropped) is another model output for every prompt.
    assert ((logits - causal).abs().amax(1) > 1e-3).all(), (logits - causal).abs().amax(1)


def test_pre_llm_dropping_with_embeddings_carries_the_token_types(model):
    inputs = batch(ROWS)
    embeds = model.model.language_model.embed_tokens(inputs["input_ids"]).detach()
    as_embeds = {k: v for k, v in inputs.items() if k != "input_ids"} | {"inputs_embeds": embeds}
    pipe = spec(compress=[{"use": "pool", "stride": 2}])  # deterministic: the same tokens both ways
    with torch.no_grad():
        with arrcoc.hf.apply(model, pipe):
            by_ids = model(**inputs).logits[:, -1]
        with arrcoc.hf.apply(model, pipe):
            by_embeds = model(**as_embeds).logits[:, -1]
    torch.testing.assert_close(by_embeds, by_ids, atol=1e-10, rtol=0)


def test_token_types_of_another_shape_are_refused(model):
    inputs = batch(ROWS)
    inputs["token_type_ids"] = inputs["token_type_ids"][:, 1:]
    with pytest.raises(InputError, match=r"token_type_ids must have the prompt's shape \(3, 49\)"):
        with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])):
            model(**inputs)


def test_a_conversation_continued_from_a_short_prompts_cache_reads_its_token_types(model):
    # The cache holds the short prompt: the continuation's token_type_ids must be the short prompt's (with the
    # long ones, the model reads image blocks at the wrong columns), as for the model given the short prompt.
    inputs = batch(ROWS)
    extra = torch.full((3, 2), 40)
    follow = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        with arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])) as run:
            first = model.generate(**inputs, **follow)
            kept = kept_raster(run.state)
            ids = torch.cat([first.sequences, extra], 1)
            mask = torch.cat([inputs["attention_mask"], torch.ones(3, 5, dtype=torch.long)], 1)
            then = model.generate(input_ids=ids, attention_mask=mask, token_type_ids=(ids == IMAGE).long(),
                                  past_key_values=output_cache(first), **follow)
        short = shortened(inputs, [len(k) for k in kept])
        feats = {"image": BaseModelOutputWithPooling(pooler_output=features_of(model, inputs["pixel_values"], kept))}
        ref_first = model.generate(**short, mm_encoder_outputs=feats, **follow)
        ref_ids = torch.cat([ref_first.sequences, extra], 1)
        ref_mask = torch.cat([short["attention_mask"], torch.ones(3, 5, dtype=torch.long)], 1)
        ref = model.generate(input_ids=ref_ids, attention_mask=ref_mask, token_type_ids=(ref_ids == IMAGE).long(),
                             past_key_values=output_cache(ref_first), **follow)
    torch.testing.assert_close(torch.stack(then.logits), torch.stack(ref.logits), atol=1e-8, rtol=0)


def received_reference(model, pixels):
    """Per image ``[16]``: the attention each pooled token receives in the tower's last block, recomputed here in
    plain torch from that block's input (the tower's ``hidden_states[-2]``): layer norm, per-head q / k, the
    softmax of every query row over all patches, the mean over queries then heads; a token the mean of its 2 x 2
    patches (cells (2r + i, 2c + j) of the 8 x 8 patch grid)."""
    tower = model.model.vision_tower
    x = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    block = getattr(tower, "vision_model", tower).encoder.layers[-1]
    ln, attn = block.layer_norm1, block.self_attn
    h = torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    heads = attn.num_heads
    q = (h @ attn.q_proj.weight.T + attn.q_proj.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
    k = (h @ attn.k_proj.weight.T + attn.k_proj.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)  # [images, heads, 64, 64]
    patch = probs.mean(2).mean(1).view(-1, 8, 8)
    return [torch.stack([patch[i, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean() for r in range(4) for c in range(4)])
            for i in range(patch.shape[0])]


@pytest.mark.parametrize("chunk", [None, 4 * 64 * 10], ids=["whole", "10_queries_a_chunk"])
def test_attention_received_equals_the_plain_torch_recomputation(model, monkeypatch, chunk):
    from arrcoc.integrations.hf import adapter as hf_adapter

    if chunk is not None:
        monkeypatch.setattr(hf_adapter, "RECEIVED_CHUNK_ELEMENTS", chunk)
    pixels = batch(ROWS)["pixel_values"]
    adapter = arrcoc.hf.adapter_for(model)
    assert adapter.attention_received_layer == 1
    with torch.no_grad():
        out = adapter.encode_images(pixels, {}, keep_hidden=False, received=True)
        ref = received_reference(model, pixels)
        features = model.model.get_image_features(pixels).pooler_output
    assert torch.equal(torch.stack(out.features), features)  # the hook changes nothing in the model's forward
    for got, want in zip(out.received, ref):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)


@pytest.mark.parametrize("stages", [
    {"compress": [{"use": "pool", "stride": 2}]},
    {"compress": [{"use": "divprune", "keep": 0.5}]},
    {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}],
    ids=["pool", "divprune", "fastv"])
def test_batched_equals_per_sample(model, stages):
    inputs = batch(ROWS)
    with torch.no_grad(), arrcoc.hf.apply(model, spec(**stages)):
        together = model(**inputs).logits[:, -1]
        image = 0
        for b, row in enumerate(ROWS):
            alone = batch([row])
            alone["pixel_values"] = inputs["pixel_values"][image:image + row[2]]
            image += row[2]
            torch.testing.assert_close(model(**alone).logits[0, -1], together[b], atol=ACROSS_LAYOUTS, rtol=0)


# ------------------------------------------------------------------------------------------- in-LLM (FastV)
def decoder_reference(model, inputs, kept_visual, from_layer, blocks_after=True):
    """Last-position logits of ONE prompt (batch 1, no padding), the decoder run by hand over the model's modules.

    Layers ``< from_layer`` see the whole prompt; from ``from_layer`` on only the text and the ``kept_visual``
    image tokens (indices among the prompt's image tokens) go on, with their original positions and each layer
    type's own rotary table.  Masks written here, over the sequence as each layer sees it: causal, OR the same
    image block (a run of image tokens; ``blocks_after=False``: not from ``from_layer`` on); sliding layers AND a
    window of ``sliding_window`` sequence entries back.
    """
    lm = model.model.language_model
    cfg = lm.config
    ids = inputs["input_ids"]
    embeds = lm.embed_tokens(ids)
    pooled = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    embeds[ids == IMAGE] = pooled.reshape(-1, pooled.shape[-1]).to(embeds.dtype)
    is_image = ids[0] == IMAGE
    block = torch.where(is_image, (is_image & ~torch.cat([is_image[:1] & False, is_image[:-1]])).cumsum(0) - 1, -1)
    columns = torch.arange(ids.shape[1])
    visual = columns[is_image]
    keep = torch.sort(torch.cat([columns[~is_image], visual[kept_visual]])).values
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        if i == from_layer:
            hidden, columns = hidden[:, keep], columns[keep]
        b = block[columns] if (i < from_layer or blocks_after) else torch.full_like(columns, -1)
        S = columns.shape[0]
        q, k = torch.arange(S)[:, None], torch.arange(S)[None]
        allowed = (k <= q) | ((b[:, None] == b[None]) & (b[:, None] >= 0))
        kind = cfg.layer_types[i]
        if kind == "sliding_attention":
            allowed &= k > q - cfg.sliding_window
        cos_sin = lm.rotary_emb(hidden, columns[None], kind)
        hidden = layer(hidden, attention_mask=allowed[None, None], position_embeddings=cos_sin,
                       position_ids=columns[None])
    return model.lm_head(lm.norm(hidden))[0, -1]


def sample(inputs, b):
    """Prompt ``b`` of :func:`batch` ``ROWS``, unpadded, with its own images."""
    real = inputs["attention_mask"][b].bool()
    first = sum(r[2] for r in ROWS[:b])
    return {"input_ids": inputs["input_ids"][b, real][None], "token_type_ids": inputs["token_type_ids"][b, real][None],
            "pixel_values": inputs["pixel_values"][first:first + ROWS[b][2]]}


def test_fastv_equals_the_decoder_by_hand_and_keeps_the_image_blocks_bidirectional(model):
    inputs = batch(ROWS)
    with torch.no_grad(), arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": 2, "keep": 0.5}])) as run:
        logits = model(**inputs).logits[:, -1]
    assert run.report.layer_visual == [[16, 32, 16], [16, 32, 16], [8, 16, 8], [8, 16, 8]]
    kept = kept_raster(run.llm_states["llm[0]@2"])  # per prompt, indices among its image tokens
    with torch.no_grad():
        for b in range(len(ROWS)):
            one = sample(inputs, b)
            ref = decoder_reference(model, one, torch.tensor(kept[b]), 2)
            torch.testing.assert_close(logits[b], ref, atol=ACROSS_LAYOUTS, rtol=0)
            # An earlier kept image token attends to a later one of its image at layers >= 2: read causally
            # there, the same kept tokens give another output.
            causal = decoder_reference(model, one, torch.tensor(kept[b]), 2, blocks_after=False)
            assert (logits[b] - causal).abs().max() > 1e-3, (b, (logits[b] - causal).abs().max())


def test_fastv_keeping_all_from_layer_1_generates_the_models_tokens(model):
    # Greedy tokens after FastV keeping all at layer 1 (every layer from 1 on is rebuilt by the engine, both
    # types, with the image blocks) equal the unmodified model's: decoding after the rebuilt prefill is exact.
    inputs = batch(ROWS)
    with torch.no_grad():
        ref = greedy(model, inputs)
        with arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": 1, "keep": 1.0}])):
            assert torch.equal(greedy(model, inputs), ref)


# ------------------------------------------------------------------------------------------- support matrix
NO_CLS = "no class token"
#: method -> the refusal's message fragment on Gemma 3 (absent: runs).
REFUSALS = {
    "tome": NO_CLS, "hired": NO_CLS, "prumerge": NO_CLS, "prumerge_plus": NO_CLS, "visionzip": NO_CLS,
    "sparsevlm (pre-LLM)": NO_CLS, "scope": NO_CLS, "vispruner": NO_CLS,
}


@pytest.fixture(scope="module")
def matrix_batch():
    model = tiny_gemma3(torch.float32)
    inputs = batch([(3, 5, 1), (1, 9, 2)])  # one image / two (a pan-and-scan crop), different lengths
    inputs["pixel_values"] = inputs["pixel_values"].float()
    return model, inputs


@pytest.mark.parametrize("method", list(MATRIX))
def test_support_matrix(matrix_batch, method):
    """Every method of the support matrix on this family, batch 2: runs or refuses with the message of
    :data:`REFUSALS` (test_hf_support_matrix.check_cell)."""
    model, batch = matrix_batch
    check_cell(model, batch, method, REFUSALS, alone=[16, 32])