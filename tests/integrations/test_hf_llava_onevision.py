"""arrcoc.hf on LLaVA-OneVision: per-view compression, the model's own unpadding, bilinear pooling and newlines.

References come from the model itself: ``get_image_features`` (its projector's
per-view output, captured by a hook, and its packed sequences), its
``pack_image_features``, and the model run on a hand-built shortened prompt.
The tiny model (tiny_llava_onevision.py) pools the 2x2 and 3x3 crop grids
(``anyres_max_2``) and leaves the 1x2 / 2x1 ones as they are.
"""

import math

import pytest

pytest.importorskip("transformers")

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import arrcoc
from arrcoc.errors import InputError, ModelError
from tiny_llava_onevision import IMAGE, PINPOINTS, S, SIZES, ov_batch, tiny_llava_onevision, views_of
from test_hf_support_matrix import MATRIX, check_cell
from tiny_models import generate_positions, left_pad, reference_attention

NEW = 10
THREE = (["wide", "square", "big"], [(2, 3), (1, 6), (0, 1)])  # 1x2 kept, 2x2 pooled to 5x5, 3x3 pooled to 4x6


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


def spec(**sections):
    return {"encoder": {"use": "timm_vit"}, **sections}


def greedy(model, batch, n=NEW):
    return model.generate(**batch, max_new_tokens=n, do_sample=False)


@torch.no_grad()
def model_views(model, batch) -> list[torch.Tensor]:
    """The model's own projected features of every view ``[16, D]``, views of all images in order (its projector's
    output inside ``get_image_features``)."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    finally:
        handle.remove()
    return list(seen[0])


@torch.no_grad()
def model_packed(model, batch) -> list[torch.Tensor]:
    return list(model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output)


def window(size, rows, cols):
    """The unpadded window of the stitched grid, written from transformers' ``unpad_image``."""
    H, W = rows * S, cols * S
    height, width = size
    if width / height > W / H:
        new = int(round(height * (W / width), 7))
        pad = (H - new) // 2
        return pad, H - pad, 0, W
    new = int(round(width * (H / height), 7))
    pad = (W - new) // 2
    return 0, H, pad, W - pad


def crop_grid(size):
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(size, PINPOINTS, S * 14)


def pooled_size(h, w, max_views=2):
    ratio = math.sqrt(h * w / (max_views * S * S))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)


def bilinear_taps(n_in, n_out):
    """Per output index: ``[(source, weight), (source, weight)]`` of ``interpolate(mode="bilinear",
    align_corners=False)`` without antialias, and the source nearest the sampling point."""
    scale = n_in / n_out
    taps, nearest = [], []
    for i in range(n_out):
        real = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = int(math.floor(real))
        i1 = min(i0 + 1, n_in - 1)
        lam = real - i0
        taps.append([(i0, 1 - lam), (i1, lam)])
        nearest.append(min(int(math.floor(real + 0.5)), n_in - 1))
    return taps, nearest


def kept_cells(state, first_view, views):
    """``{(view, cell)}`` of the tokens a selection kept (cell = row * S + col on the view's grid)."""
    cells = set()
    for v in range(views):
        n = int(state.counts[first_view + v])
        rc = state.positions[first_view + v, :n].round().long()
        cells |= {(v, int(r) * S + int(c)) for r, c in rc.tolist()}
    return cells


def reference_features(model, batch, state):
    """What the LLM must get for a pure selection ``state`` (per view), written from the model's own features:
    the kept base rows, then for a grid the model does not pool the kept rows of its packed sequence with the
    newline of every row keeping a token; for a pooled grid each pooled cell whose nearest source cell was kept,
    valued by the model's bilinear weights renormalised over the kept sources; a newline after every pooled row
    that keeps a cell."""
    views, packed = model_views(model, batch), model_packed(model, batch)
    newline = model.model.image_newline
    out, first = [], 0
    for i, size in enumerate(batch["image_sizes"].tolist()):
        rows, cols = crop_grid(size)
        V = 1 + rows * cols
        kept = kept_cells(state, first, V)
        base = [c for c in range(S * S) if (0, c) in kept]
        parts = [views[first][base]]
        top, bottom, left, right = window(size, rows, cols)
        h, w = bottom - top, right - left
        oh, ow = pooled_size(h, w)
        cell_of = lambda y, x: (1 + (y // S) * cols + x // S, (y % S) * S + x % S)  # noqa: E731
        value_of = lambda y, x: views[first + cell_of(y, x)[0]][cell_of(y, x)[1]]  # noqa: E731
        if (oh, ow) == (h, w):
            picked, j = [], S * S
            for y in range(top, bottom):
                any_kept = False
                for x in range(left, right):
                    if cell_of(y, x) in kept:
                        picked.append(j)
                        any_kept = True
                    j += 1
                if any_kept:
                    picked.append(j)
                j += 1
            parts.append(packed[i][picked])
        else:
            row_taps, row_near = bilinear_taps(h, oh)
            col_taps, col_near = bilinear_taps(w, ow)
            for r in range(oh):
                cells = []
                for c in range(ow):
                    if cell_of(top + row_near[r], left + col_near[c]) not in kept:
                        continue
                    num, den = 0, 0.0
                    for a, wa in row_taps[r]:
                        for b, wb in col_taps[c]:
                            if cell_of(top + a, left + b) in kept:
                                num = num + wa * wb * value_of(top + a, left + b)
                                den += wa * wb
                    cells.append(num / den)
                if cells:
                    parts.append(torch.stack(cells + [newline.to(torch.float64)]))
        out.append(torch.cat(parts))
        first += V
    return out


def hand_built(batch, features):
    """The prompts with as many placeholders per image as ``features`` rows.  Each prompt keeps its own padding
    (arrcoc drops only placeholders), shorter rows get more in front, as arrcoc pads: a forward without position
    ids numbers the columns 0..L-1, padding included, and the rotary tables are float32, so another amount of
    padding in front moves the float64 logits by ~1e-8 (the model alone, without arrcoc)."""
    rows = []
    for b, f in enumerate(features):
        ids = batch["input_ids"][b].tolist()
        first, last = ids.index(IMAGE), len(ids) - ids[::-1].index(IMAGE)
        rows.append(ids[:first] + [IMAGE] * f.shape[0] + ids[last:])
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = (ids != 0).long()  # pad id 0 is nowhere else in these prompts
    return {"input_ids": ids, "attention_mask": mask,
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}


# ----------------------------------------------------------------------------------- the family's own test
def test_per_view_state_and_packing_are_the_models_own(model):
    """Keep-everything: the state holds the model's projected views (base, crops in raster order), and packing it
    gives exactly ``pack_image_features`` (unpadding, bilinear pooling of the 2x2 and 3x3 grids, newlines)."""
    names = ["wide", "tall", "square", "big"]
    batch = ov_batch(model, names, [(1, 1)] * 4)
    del batch["batch_num_images"]  # optional: without it the model crops every image too (the other tests give it)
    adapter = arrcoc.hf.adapter_for(model)
    assert type(adapter).__name__ == "LlavaOnevisionAdapter" and not adapter.has_cls
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 1.0}])) as run:
        model(**batch)
    state = run.state
    views = model_views(model, batch)
    assert state.B == len(views) == sum(views_of(SIZES[n]) for n in names) == 3 + 3 + 5 + 10
    assert state.counts.tolist() == [S * S] * state.B
    for v, expected in enumerate(views):
        assert torch.equal(state.tokens[v, :S * S], expected)
    assert state.meta["views"] == [(1, 2), (2, 1), (2, 2), (3, 3)]
    image_inputs = {"image_sizes": batch["image_sizes"]}
    assembled = adapter.assemble(state, image_inputs)
    per_image, first = [], 0
    for size in batch["image_sizes"].tolist():
        per_image.append(torch.stack(views[first:first + views_of(size)]))
        first += views_of(size)
    with torch.no_grad():
        own, lengths = model.model.pack_image_features(per_image, batch["image_sizes"], model.model.image_newline,
                                                       model.config.vision_aspect_ratio)
    # wide 1x2: 16 + 4 rows x (7 + newline); tall 2x1: 16 + 8 x (3 + 1); square 8x8 pooled to 5x5; big 8x12 -> 4x6
    assert lengths.tolist() == [52, 56, 46, 44] == adapter.tokens_per_image(batch["pixel_values"], image_inputs)
    for got, expected, packed in zip(assembled, own, model_packed(model, batch)):
        assert torch.equal(got, expected) and torch.equal(got, packed)


@pytest.mark.parametrize("stages", [{"compress": [{"use": "random_keep", "keep": 0.5}]},
                                    {"compress": [{"use": "random_keep", "keep": 0.2}]}], ids=["half", "fifth"])
def test_selection_equals_the_model_on_the_hand_built_prompt(model, stages):
    batch = ov_batch(model, *THREE)
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), arrcoc.hf.apply(model, spec(**stages)) as run:
        logits = model(**batch).logits[:, -1]
        tokens = greedy(model, batch)
        visual = run.report.layer_visual[0]
    features = reference_features(model, batch, run.state)
    full = [p.shape[0] for p in model_packed(model, batch)]
    assert visual == [f.shape[0] for f in features] and all(v < n for v, n in zip(visual, full))
    fed = hand_built(batch, features)
    with torch.no_grad():
        ref_logits = model(**fed).logits[:, -1]
        fed["mm_encoder_outputs"] = hand_built(batch, features)["mm_encoder_outputs"]
        ref_tokens = greedy(model, fed)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-8)
    assert torch.equal(tokens[:, :L], batch["input_ids"])
    assert torch.equal(tokens[:, L:], ref_tokens[:, fed["input_ids"].shape[1]:])


def test_a_pooled_cell_is_dropped_with_its_nearest_source_and_blends_only_kept_ones(model):
    """One image (3x3 grid, window 8x12 pooled to 4x6, scale 2: pooled cell (r, c) blends window cells rows
    2r..2r+1, cols 2c..2c+1, nearest (2r+1, 2c+1)).  Keep the base view and the middle crop (window rows 2..5,
    cols 4..7): exactly pooled cells (1..2, 2..3) reach the LLM, each the model's own pooled value (all its
    sources kept), with a newline after each of the two rows."""
    from arrcoc import ops

    batch = ov_batch(model, ["big"], [(1, 1)])
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 1.0}])) as run:
        model(**batch)
    state = run.state
    valid = torch.zeros(state.B, S * S, dtype=torch.bool)
    valid[[0, 5]] = True  # the base view and crop (1, 1) of the 3x3 grid
    kept = ops.keep(state, torch.arange(S * S).expand(state.B, -1), valid)
    got = arrcoc.hf.adapter_for(model).assemble(kept, {"image_sizes": batch["image_sizes"]})[0]
    own = model_packed(model, batch)[0]  # 16 base tokens, then 4 pooled rows of 6 cells and a newline
    pooled = own[S * S:].view(4, 7, -1)
    newline = pooled[0, 6]
    assert torch.equal(newline, model.model.image_newline)
    expected = torch.cat([own[:S * S], pooled[1, 2:4], newline[None], pooled[2, 2:4], newline[None]])
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, reference_features(model, batch, kept)[0], rtol=0, atol=1e-12)


def test_tokens_meeting_in_one_cell_of_a_pooled_grid_merge_by_size(model):
    """Two tokens whose positions round to one cell of a pooled grid (as merged tokens' centroids may) count as
    one token there, their size-weighted mean, as arrcoc.ops.merge merges: the packing equals the one of a state
    holding that mean alone in the cell."""
    from arrcoc import ops

    batch = ov_batch(model, ["big"], [(1, 1)])
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 1.0}])) as run:
        model(**batch)
    state, view, a, b = run.state, 5, 5, 6  # cells (1, 1) and (1, 2) of the middle crop
    positions, size = state.positions.clone(), state.size.clone()
    positions[view, b] = positions[view, a] + 0.3  # rounds to a's cell
    size[view, a], size[view, b] = 1.0, 3.0
    met = state.replace(positions=positions, size=size)
    tokens = state.tokens.clone()
    tokens[view, a] = (state.tokens[view, a] + 3 * state.tokens[view, b]) / 4
    valid = torch.ones(state.B, S * S, dtype=torch.bool)
    valid[view, b] = False
    alone = ops.keep(state.replace(tokens=tokens), torch.arange(S * S).expand(state.B, -1), valid)
    adapter, inputs = arrcoc.hf.adapter_for(model), {"image_sizes": batch["image_sizes"]}
    got, expected = adapter.assemble(met, inputs)[0], adapter.assemble(alone, inputs)[0]
    # b's cell (window (3, 6)) is no pooled cell's nearest source, a's (3, 5) is pooled cell (1, 2)'s: all 44 stay.
    assert got.shape == expected.shape == model_packed(model, batch)[0].shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    assert not torch.equal(got, adapter.assemble(state, inputs)[0][: got.shape[0]])


# ----------------------------------------------------------------------------------- keep everything
@pytest.mark.parametrize("stages", [{"compress": [{"use": "random_keep", "keep": 1.0}]},
                                    {"llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]}], ids=["pre_llm", "in_llm"])
@pytest.mark.parametrize("images", [(["big"], [(2, 3)]), THREE], ids=["batch1", "batch3_sizes"])
def test_keep_everything_is_the_unmodified_model(model, stages, images):
    batch = ov_batch(model, *images)
    with torch.no_grad():
        ref_logits, ref_tokens = model(**batch).logits[:, -1], greedy(model, batch)
        with arrcoc.hf.apply(model, spec(**stages)):
            logits, tokens = model(**batch).logits[:, -1], greedy(model, batch)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


# ----------------------------------------------------------------------------------- FastV
@torch.no_grad()
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
    K, keep = 2, 0.3
    batch = ov_batch(model, *THREE)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, L = ids.shape
    features = torch.cat(model_packed(model, batch))
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
    for t in range(NEW):
        dropped = torch.cat([drop, torch.zeros(B, t, dtype=torch.bool)], 1)
        logits, _ = reference_forward(model, seq, m, features, L, dropped, K)
        ref_logits = logits[:, -1] if t == 0 else ref_logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    with arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": K, "keep": keep}])) as run:
        with torch.no_grad():
            got = model(**batch, position_ids=generate_positions(mask)).logits[:, -1]
        tokens = greedy(model, batch)
    torch.testing.assert_close(got, ref_logits, rtol=0, atol=1e-8)
    assert torch.equal(tokens[:, L:], seq[:, L:])
    full = [p.shape[0] for p in model_packed(model, batch)]
    assert run.report.layer_visual == [full] * K + [kept_counts] * (4 - K)


# ----------------------------------------------------------------------------------- batched = per sample
@pytest.mark.parametrize("stages", [{"compress": [{"use": "tome", "r": 5, "metric": "tokens"}]},
                                    {"compress": [{"use": "divprune", "keep": 0.3}]},
                                    {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}],
                         ids=["tome_per_view", "divprune_packed", "fastv"])
def test_batched_equals_per_sample(model, stages):
    names, texts = THREE
    batch = ov_batch(model, names, texts)
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), arrcoc.hf.apply(model, spec(**stages)) as run:
        together = greedy(model, batch, 6)
        seen = run.report.layer_visual[-1]
        for i in range(3):
            one = ov_batch(model, [names[i]], [texts[i]])
            alone = greedy(model, one, 6)
            assert run.report.layer_visual[-1] == [seen[i]]
            assert torch.equal(alone[0, one["input_ids"].shape[1]:], together[i, L:]), i


# ----------------------------------------------------------------------------------- several images per prompt
def test_several_images_per_prompt_refused_before_the_llm_left_to_the_model_inside_it(model):
    """``batch_num_images``: the model encodes each image of a prompt with several as one base view and a
    newline; in-LLM stages count those placeholders and run, pre-LLM stages refuse (single images only)."""
    pixels = torch.randn(2, 5, 3, S * 14, S * 14, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ids, mask = left_pad([[1, 5, *[IMAGE] * (S * S + 1), 6, *[IMAGE] * (S * S + 1), 7, 8]])
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
             "image_sizes": torch.tensor([SIZES["wide"], SIZES["square"]]), "batch_num_images": torch.tensor([2])}
    with torch.no_grad():
        ref = greedy(model, batch, 4)
        with arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": 2, "keep": 1.0}])):
            assert torch.equal(greedy(model, batch, 4), ref)
        with pytest.raises(InputError, match="single images only"):
            with arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])):
                model(**batch)


def test_a_video_beside_the_image_is_refused_before_the_llm(model):
    batch = ov_batch(model, ["wide"], [(1, 2)])
    batch["pixel_values_videos"] = torch.zeros(1, 2, 3, S * 14, S * 14, dtype=torch.float64)
    with pytest.raises(InputError, match="videos are not supported yet"):
        with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])):
            model(**batch)


def test_a_vision_aspect_ratio_the_model_cannot_read_is_refused_when_entering():
    model = tiny_llava_onevision(torch.float32)
    model.config.vision_aspect_ratio = "anyres"
    with pytest.raises(ModelError, match="vision_aspect_ratio must be 'anyres_max_N'.*got 'anyres'"):
        with arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])):
            pass


def test_the_budget_rules_refuse_it_by_its_own_name(model):
    """arrcoc eval's budget rules need one feature grid per image; views, unpadding and pooling are none."""
    batch = ov_batch(model, ["wide"], [(1, 1)])
    with pytest.raises(ModelError, match="^llava_onevision: an image is a base view plus rows x cols crops"):
        arrcoc.hf.adapter_for(model).budget_context(batch["pixel_values"], {"image_sizes": batch["image_sizes"]})


# ----------------------------------------------------------------------------------- the support matrix column
NO_CLS = "no class token"
NO_RECEIVED = "gives no 'attention received' signal"
#: method of test_hf_support_matrix.MATRIX -> the refusal's message fragment (every other method runs).
REFUSALS = {
    "tome": NO_CLS, "hired": NO_CLS, "prumerge": NO_CLS, "prumerge_plus": NO_CLS, "visionzip": NO_CLS,
    "sparsevlm (pre-LLM)": NO_CLS, "scope": NO_CLS, "vispruner": NO_CLS,
    "scope (score: attn_received)": NO_RECEIVED,
    "vispruner (signal: received, attention_map: null)": NO_RECEIVED,
}


@pytest.fixture(scope="module")
def matrix_family():
    """Batch 2, float32: a 1x2 grid left as it is and a 2x2 grid pooled to 5x5, prompts of different lengths."""
    model = tiny_llava_onevision(torch.float32)
    return model, ov_batch(model, ["wide", "square"], [(3, 5), (1, 9)], dtype=torch.float32)


@pytest.mark.parametrize("method", list(MATRIX))
def test_support_matrix(matrix_family, method):
    """Every method of the support matrix on this family, batch 2: runs or refuses with the message of
    :data:`REFUSALS` (test_hf_support_matrix.check_cell)."""
    model, batch = matrix_family
    check_cell(model, batch, method, REFUSALS)


def test_support_matrix_knows_every_refused_method():
    assert set(REFUSALS) <= set(MATRIX)
