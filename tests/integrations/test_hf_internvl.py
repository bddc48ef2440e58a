"""arrcoc.hf on InternVL3 (HF format): tiles of 16 shuffled tokens, a thumbnail, several images per prompt.

The tiny model (tiny_internvl.py) has an InternViT tower with a class token whose 8 x 8 patches per tile the
pixel shuffle folds 2 x 2 into 16 tokens of four times the width, and a Qwen2 decoder.  Every expectation is
computed independently of the integration: by the unmodified model (outside the context), by the model on a
hand-built short prompt that carries the kept features, by the tower's own eager attention weights, or by a
decoder run by hand (the FastV reference).  float64 throughout.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc.errors import ModelError  # noqa: E402
from arrcoc.integrations.hf.vision import VisionTower  # noqa: E402
from test_hf_support_matrix import MATRIX, check_cell  # noqa: E402
from tiny_internvl import IMAGE, PATCHES, SIDE, TOKENS, batch, shortened, tiny_internvl  # noqa: E402
from tiny_models import generate_positions, reference_attention  # noqa: E402

NEW = 10  # new tokens per greedy generation
#: Text before / after and the tiles of each image of the three prompts: one tile alone; two tiles and the
#: thumbnail; two images (a tile and its thumbnail, then one tile).
ROWS = [(3, 5, [1]), (2, 8, [3]), (4, 2, [2, 1])]
#: Qwen2's RMSNorm computes in float32 even in a float64 model, so one prompt alone and in a padded batch differ
#: by ~7.5e-9 in the unmodified model itself: comparisons across batch layouts use this tolerance (same layout: 1e-8,
#: or exact).
ACROSS_LAYOUTS = 1e-7


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


def spec(**sections):
    return {"encoder": {"use": "timm_vit"}, **sections}


def greedy(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def kept_raster(state):
    """Per state row (a tile), the raster indices on its 4 x 4 grid of the tokens it kept, in order."""
    cols = state.grid[1]
    return [(state.positions[b, :int(n)].round().long() @ torch.tensor([cols, 1])).tolist()
            for b, n in enumerate(state.counts.tolist())]


def model_features(model, pixels):
    """The model's own projected features per tile ``[tiles, 16, D]`` (its get_image_features)."""
    return model.model.get_image_features(pixel_values=pixels).pooler_output


def on_short_prompt(model, inputs, kept):
    """The unmodified model on the hand-built short prompt carrying the kept features: last-position logits."""
    short = shortened(inputs, [len(k) for k in kept])
    feats = model_features(model, inputs["pixel_values"])
    chosen = torch.cat([feats[i, k] for i, k in enumerate(kept)])[None]
    return model(**short, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=chosen)}
                 ).logits[:, -1], short, chosen


# ------------------------------------------------------------------------------------------- the tower
def test_each_token_is_its_two_by_two_patch_block_and_projects_to_the_models_features(model):
    adapter = arrcoc.hf.adapter_for(model)
    pixels = batch(ROWS)["pixel_values"]
    with torch.no_grad():
        out = adapter.encode_images(pixels, {}, keep_hidden=False)
        patches = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]  # class row dropped
    tiles = pixels.shape[0]
    assert out.grids == [(SIDE, SIDE)] * tiles and out.cls is None
    assert adapter.tokens_per_image(pixels, {}) == [TOKENS] * tiles and adapter.feature_width == 4 * 32
    grid = patches.reshape(tiles, PATCHES, PATCHES, -1)
    for r in range(SIDE):
        for c in range(SIDE):
            # Written out here: token (r, c) is [top-left, top-right, bottom-left, bottom-right] of its block.
            block = torch.cat([grid[:, 2 * r, 2 * c], grid[:, 2 * r, 2 * c + 1],
                               grid[:, 2 * r + 1, 2 * c], grid[:, 2 * r + 1, 2 * c + 1]], -1)
            assert torch.equal(torch.stack(out.features)[:, r * SIDE + c], block)
    with torch.no_grad():
        assert torch.equal(adapter.project(torch.stack(out.features)), model_features(model, pixels))


def test_attention_received_is_the_towers_eager_attention_averaged_over_each_tokens_patches():
    eager = tiny_internvl(attn_implementation="eager")  # the same seed: the same weights, attention weights kept
    adapter = arrcoc.hf.adapter_for(eager)
    pixels = batch(ROWS)["pixel_values"]
    with torch.no_grad():
        out = adapter.encode_images(pixels, {}, keep_hidden=False, received=True)
        weights = eager.model.vision_tower(pixel_values=pixels, output_attentions=True).attentions[-1]
    assert adapter.attention_received_layer == 1
    per_patch = weights.mean(2).mean(1)[:, 1:].reshape(-1, PATCHES, PATCHES)  # query mean, head mean
    for t, got in enumerate(out.received):
        expected = torch.stack([per_patch[t, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean()
                                for r in range(SIDE) for c in range(SIDE)])
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # Not a uniform signal (that would make the check above vacuous).
    assert torch.stack(out.received).std() > 1e-3


@pytest.mark.parametrize("heads", ["mean", "single"])
def test_cls_attention_and_keys_are_the_means_over_each_tokens_patches(heads):
    # The substitute for the class-token signals: per token, the mean over its 2 x 2 patches of the CLS row of the
    # tower's own eager attention weights (head mean), or of that row over the full width ('single', written out
    # here from the block's modules), and of the keys.
    eager = tiny_internvl(attn_implementation="eager")
    pixels = batch(ROWS)["pixel_values"]
    tower = VisionTower.for_model(eager, attention_layer=-1, extra_attention_layers=[0], cls_attention_heads=heads)
    tower.configure(frozenset({"cls_attention", "keys"}))
    with torch.no_grad():
        state = tower.encode_inputs(pixels, {})
        out = eager.model.vision_tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    assert state.cls is None and state.tokens.shape[:2] == (pixels.shape[0], TOKENS)

    def pooled(per_patch):  # [tiles, 64, ...] -> [tiles, 16, ...], the mean of each token's block, written out
        grid = per_patch.reshape(per_patch.shape[0], PATCHES, PATCHES, *per_patch.shape[2:])
        return torch.stack([grid[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((1, 2))
                            for r in range(SIDE) for c in range(SIDE)], 1)

    for name, block in (("cls_attn", 1), ("cls_attn@0", 0)):
        if heads == "mean":
            per_patch = out.attentions[block][:, :, 0, 1:].mean(1)
        else:
            layer = eager.model.vision_tower.encoder.layer[block]
            h = layer.layernorm_before(out.hidden_states[block])
            q, k = layer.attention.q_proj(h), layer.attention.k_proj(h)
            per_patch = ((q[:, :1] @ k.transpose(1, 2)) * q.shape[-1] ** -0.5).softmax(-1)[:, 0, 1:]
        # The tower wrapper takes the CLS softmax in float32 (as on every family): float32 rounding.
        torch.testing.assert_close(state.per_token[name].double(), pooled(per_patch), atol=1e-6, rtol=0)
    layer = eager.model.vision_tower.encoder.layer[1]
    k = layer.attention.k_proj(layer.layernorm_before(out.hidden_states[1]))[:, 1:]
    if heads == "mean":
        k = k.reshape(*k.shape[:2], 4, -1).mean(2)
    torch.testing.assert_close(state.per_token["keys"], pooled(k), atol=1e-12, rtol=0)
    assert state.per_token["cls_attn"].std() > 1e-3  # not uniform: the check above is not vacuous


def test_a_cls_attention_selection_equals_the_short_prompt_with_the_hand_pooled_ranking(model):
    # VisPruner's important tokens alone (important_ratio 1: keep 5 of 16 per tile by CLS attention): per tile, the
    # 5 tokens of the largest patch-mean CLS attention (the signal checked against the eager weights above) reach
    # the LLM as the model's own features.
    inputs = batch(ROWS)
    stage = {"use": "vispruner", "keep": 5, "important_ratio": 1.0}
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[stage])) as run:
        logits = model(**inputs).logits[:, -1]
        tower = VisionTower.for_model(model)
        tower.configure(frozenset({"cls_attention"}))
        attn = tower.encode_inputs(inputs["pixel_values"], {}).per_token["cls_attn"]
    kept = kept_raster(run.state)
    top = torch.sort(-attn, dim=1, stable=True).indices[:, :5]
    assert [sorted(k) for k in kept] == sorted_rows(top)
    with torch.no_grad():
        ref, _, _ = on_short_prompt(model, inputs, kept)
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


def sorted_rows(index):
    return [sorted(row) for row in index.tolist()]


# ------------------------------------------------------------------------------------------- keep everything
@pytest.mark.parametrize("stages", [
    {}, {"compress": [{"use": "random_keep", "keep": 1.0}]}, {"llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]}],
    ids=["none", "random_keep", "fastv"])
@pytest.mark.parametrize("rows", [ROWS[1:2], ROWS], ids=["batch1", "batch3"])
def test_keep_everything_is_the_unmodified_model(model, stages, rows):
    inputs = batch(rows)
    with torch.no_grad():
        ref_logits, ref_tokens = model(**inputs).logits, greedy(model, inputs)
        with arrcoc.hf.apply(model, spec(**stages)):
            logits, tokens = model(**inputs).logits, greedy(model, inputs)
    real = inputs["attention_mask"].bool()
    assert torch.equal(logits[real], ref_logits[real])
    assert torch.equal(tokens, ref_tokens)


# ------------------------------------------------------------------------------------------- pre-LLM dropping
@pytest.mark.parametrize("stage", [{"use": "random_keep", "keep": 0.5},
                                   {"use": "vispruner", "keep": 6, "signal": "received", "attention_map": None}],
                         ids=["random_keep", "vispruner_received"])
def test_pre_llm_dropping_equals_the_short_prompt(model, stage):
    inputs = batch(ROWS)
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[stage])) as run:
        logits, tokens = model(**inputs).logits[:, -1], greedy(model, inputs)
    kept = kept_raster(run.state)
    per_tile = TOKENS // 2 if stage["use"] == "random_keep" else 6
    assert [len(k) for k in kept] == [per_tile] * 7  # every tile (thumbnails too) keeps its share
    assert run.report.layer_visual[0] == [per_tile, 3 * per_tile, 3 * per_tile]
    with torch.no_grad():
        ref, short, chosen = on_short_prompt(model, inputs, kept)
        ref_tokens = model.generate(**short, mm_encoder_outputs={"image": BaseModelOutputWithPooling(
            pooler_output=chosen)}, max_new_tokens=NEW, do_sample=False)
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(tokens[:, L:], ref_tokens[:, short["input_ids"].shape[1]:])


def test_a_prompt_given_as_embeddings_is_shortened_as_the_ids_are(model):
    inputs = batch(ROWS)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    as_embeds = {k: v for k, v in inputs.items() if k != "input_ids"} | {"inputs_embeds": embeds}
    pipe = spec(compress=[{"use": "pool", "stride": 2}])  # deterministic: the same tokens both ways
    with torch.no_grad():
        with arrcoc.hf.apply(model, pipe):
            by_ids = model(**inputs).logits[:, -1]
        with arrcoc.hf.apply(model, pipe) as run:
            by_embeds = model(**as_embeds).logits[:, -1]
    assert run.report.layer_visual[0] == [4, 12, 12]
    torch.testing.assert_close(by_embeds, by_ids, atol=1e-10, rtol=0)


def test_merged_tokens_are_the_projected_mean_of_their_shuffled_features(model):
    # pool stride 2 merges each 2 x 2 block of a tile's 4 x 4 tokens: the LLM gets the projector of their mean
    # (in the shuffled space, before the projector), in the model's prompt at 4 tokens per tile.
    inputs = batch(ROWS)
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "pool", "stride": 2}])) as run:
        logits = model(**inputs).logits[:, -1]
    assert run.report.layer_visual[0] == [4, 12, 12]
    adapter = arrcoc.hf.adapter_for(model)
    with torch.no_grad():
        shuffled = torch.stack(adapter.encode_images(inputs["pixel_values"], {}, keep_hidden=False).features)
        cells = shuffled.reshape(-1, 2, 2, 2, 2, shuffled.shape[-1]).mean((2, 4)).reshape(-1, 4, shuffled.shape[-1])
        chosen = model.model.multi_modal_projector(cells).reshape(1, -1, model.config.text_config.hidden_size)
        short = shortened(inputs, [4] * 7)
        ref = model(**short, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=chosen)}
                    ).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


# ------------------------------------------------------------------------------------------- in-LLM (FastV)
def reference_forward(model, ids, mask, features, prompt, drop=None, K=None, weights_at=None):
    """A manual no-cache forward of the Qwen2 decoder over the whole sequence (float64): ``features`` fill the
    placeholder rows of the first ``prompt`` columns, ``drop`` ``[B, S]`` marks keys no query may see in layers
    ``>= K``; positions as ``generate`` numbers them."""
    lm = model.model.language_model
    h = model.get_input_embeddings()(ids).clone()
    image = ids == IMAGE
    image[:, prompt:] = False  # a generated token may be the placeholder id
    h[image] = features.to(h.dtype)
    cos, sin = lm.rotary_emb(h, generate_positions(mask))
    L = ids.shape[1]
    real = mask.bool()
    eye = torch.eye(L, dtype=torch.bool)[None]
    base = (torch.ones(L, L, dtype=torch.bool).tril()[None] & real[:, None, :]) | (eye & ~real[:, :, None])
    weights = None
    for i, layer in enumerate(lm.layers):
        allowed = base if drop is None or i < K else base & ~(drop[:, None, :] & ~eye)
        out, w, _ = reference_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, allowed)
        weights = w if i == weights_at else weights
        h = h + out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h)), weights


def test_fastv_equals_no_cache_reference(model):
    # FastV ranks a prompt's visual tokens over all its tiles at once (one pool per prompt, thumbnails included).
    K, keep = 2, 0.3
    inputs = batch(ROWS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, L = ids.shape
    with torch.no_grad():
        features = model_features(model, inputs["pixel_values"]).reshape(-1, model.config.text_config.hidden_size)
        _, w = reference_forward(model, ids, mask, features, L, weights_at=K - 1)
    last = w[:, :, -1].mean(1)
    drop = torch.zeros(B, L, dtype=torch.bool)
    kept_counts = []
    for b in range(B):
        image = (ids[b] == IMAGE).nonzero().squeeze(1)
        k = math.floor(len(image) * keep)
        order = torch.sort(-last[b, image], stable=True).indices
        drop[b, image] = True
        drop[b, image[order[:k]]] = False
        kept_counts.append(k)
    seq, m, ref_logits = ids, mask, None
    with torch.no_grad():
        for t in range(NEW):
            dropped = torch.cat([drop, torch.zeros(B, t, dtype=torch.bool)], 1)
            logits, _ = reference_forward(model, seq, m, features, L, dropped, K)
            ref_logits = logits[:, -1] if t == 0 else ref_logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
        with arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": K, "keep": keep}])) as run:
            got = model(**inputs, position_ids=generate_positions(mask)).logits[:, -1]
            tokens = greedy(model, inputs)
    torch.testing.assert_close(got, ref_logits, rtol=0, atol=1e-8)
    assert torch.equal(tokens[:, L:], seq[:, L:])
    assert run.report.layer_visual == [[16, 48, 48]] * K + [kept_counts] * (4 - K)


# ------------------------------------------------------------------------------------------- batched = per sample
@pytest.mark.parametrize("stages", [
    {"compress": [{"use": "tome", "r": 5, "metric": "tokens"}]},
    {"compress": [{"use": "divprune", "keep": 0.5}]},
    {"compress": [{"use": "scope", "keep": 0.5, "score": "attn_received"}]},
    {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}], ids=["tome", "divprune", "scope_received", "fastv"])
def test_batched_equals_per_sample(model, stages):
    inputs = batch(ROWS)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), arrcoc.hf.apply(model, spec(**stages)) as run:
        together, tokens = model(**inputs).logits[:, -1], greedy(model, inputs)
        seen = run.report.layer_visual
        tile = 0
        for b, row in enumerate(ROWS):
            alone = batch([row])
            n = sum(row[2])
            alone["pixel_values"] = inputs["pixel_values"][tile:tile + n]
            tile += n
            torch.testing.assert_close(model(**alone).logits[0, -1], together[b], atol=ACROSS_LAYOUTS, rtol=0)
            alone_tokens = greedy(model, alone)
            assert run.report.layer_visual == [[layer[b]] for layer in seen]
            assert torch.equal(alone_tokens[0, alone["input_ids"].shape[1]:], tokens[b, L:]), b


# ------------------------------------------------------------------------------------------- refusals
def test_a_select_strategy_keeping_the_class_token_is_refused_when_entering():
    model = tiny_internvl(torch.float32)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ModelError, match="cannot fold into its 2 x 2 grid"):
        with arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])):
            pass


# ------------------------------------------------------------------------------------------- support matrix
#: method -> the refusal's message fragment on InternVL (absent: runs).
REFUSALS: dict[str, str] = {}  # every method runs (class-token signals: the mean over a token's patches)


@pytest.fixture(scope="module")
def matrix_batch():
    model = tiny_internvl(torch.float32)
    inputs = batch([(3, 5, [1]), (1, 9, [3])], dtype=torch.float32)  # 1 tile / 2 tiles + thumbnail
    return model, inputs


@pytest.mark.parametrize("method", list(MATRIX))
def test_support_matrix(matrix_batch, method):
    """Every method of the support matrix on this family, batch 2: runs or refuses with the message of
    :data:`REFUSALS` (test_hf_support_matrix.check_cell)."""
    model, batch = matrix_batch
    check_cell(model, batch, method, REFUSALS, alone=[16, 48])