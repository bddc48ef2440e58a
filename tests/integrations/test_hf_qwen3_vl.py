"""arrcoc.hf on Qwen3-VL: DeepStack planes follow the kept tokens, before and inside the LLM.

The tiny model (tiny_qwen3_vl.py) adds three DeepStack planes after decoder
layers 0, 1 and 2, so every ``llm:`` stage of these tests (layers 1 and 2)
acts before the last injection.  References, float64:

* the model on a hand-built shortened prompt: the kept placeholders only,
  positions from the model's own ``get_rope_index`` on the FULL prompt
  (gathered for the kept columns), and ``mm_encoder_outputs`` holding the
  model's own features and DeepStack planes gathered here by the kept
  indices (a plane gathered with any other index changes the logits: the
  DeepStack test);
* the unmodified model on the FULL prompt with the dropped image tokens
  masked as keys (in every layer for pre-LLM dropping, from layer K on for
  in-LLM pruning): they still get their planes, but no kept token reads them.
"""

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from test_hf_generate_parity import MODES, PIPELINES, assert_same
from tiny_models import generate_positions, left_pad
from test_hf_support_matrix import MATRIX, check_cell  # noqa: E402
from tiny_qwen3_vl import IMAGE, qwen3_inputs, tiny_qwen3_vl

@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_vl()


def spec(**sections):
    return {"encoder": {"use": "timm_vit"}, **sections}


def greedy(model, batch, n=10):
    return model.generate(**batch, max_new_tokens=n, do_sample=False)


def kept_raster(state, grids):
    """Per image, the raster indices (on its own merged grid) of the tokens a state kept, in the state's order."""
    out = []
    for b, (t, h, w) in enumerate(grids.tolist()):
        rc = state.positions[b, : int(state.counts[b])].round().long()
        out.append((rc[:, 0] * (w // 2) + rc[:, 1]).tolist())
    return out


def image_features(model, batch):
    """The model's own ``(features, planes)``: per image ``[n_i, D]``; per plane, per image ``[n_i, D]``."""
    out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    return list(out.pooler_output), [list(plane) for plane in out.deepstack_features]


def shortened_logits(model, batch, cells, features, planes, masked=None, from_layer=1):
    """Last-position logits of the model on the prompts whose image ``b`` has ``len(cells[b])`` placeholders, the
    ``j``-th at the position of the image's cell ``cells[b][j]`` (the model's own positions for the full prompt),
    given ``features`` / ``planes`` (per image, the rows for those placeholders); ``masked``: per image the cells
    whose placeholders are masked as keys from decoder layer ``from_layer`` on."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    ids, mask = batch["input_ids"], batch["attention_mask"]
    full, _ = model.model.get_rope_index(ids, batch["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=mask)
    rows, sources = [], []  # per prompt: its token ids, and the full prompt's column whose position each takes
    for b in range(ids.shape[0]):
        real = mask[b].bool().nonzero().flatten().tolist()
        image = [c for c in real if ids[b, c] == IMAGE]
        before, after = [c for c in real if c < image[0]], [c for c in real if c > image[-1]]
        sources.append(before + [image[cell] for cell in cells[b]] + after)
        rows.append([int(ids[b, c]) for c in before] + [IMAGE] * len(cells[b]) + [int(ids[b, c]) for c in after])
    short_ids, short_mask = left_pad(rows)
    L = short_ids.shape[1]
    positions = torch.zeros(3, len(rows), L, dtype=torch.long)
    for b, cols in enumerate(sources):
        positions[:, b, L - len(cols):] = full[:, b, cols]
    position_ids = torch.cat([generate_positions(short_mask).masked_fill(short_mask == 0, 0)[None], positions])
    outputs = BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=planes)
    attention_mask, hooks = short_mask, []
    if masked is not None:
        dropped = torch.zeros_like(short_ids, dtype=torch.bool)
        for b, cols in enumerate(sources):
            image = (short_ids[b] == IMAGE).nonzero().flatten()
            for j, cell in enumerate(cells[b]):
                dropped[b, image[j]] = cell in masked[b]
        base = torch.ones(L, L, dtype=torch.bool).tril()[None] & short_mask.bool()[:, None, :]
        eye = torch.eye(L, dtype=torch.bool)[None]
        attention_mask, pruned = (base | eye)[:, None], ((base & ~dropped[:, None, :]) | eye)[:, None]
        hooks = [layer.register_forward_pre_hook(lambda m, a, k: (a, {**k, "attention_mask": pruned}),
                                                 with_kwargs=True)
                 for i, layer in enumerate(model.model.language_model.layers) if i >= from_layer]
    try:
        out = model(input_ids=short_ids, attention_mask=attention_mask, position_ids=position_ids,
                    mm_token_type_ids=(short_ids == IMAGE).int(), mm_encoder_outputs={"image": outputs})
    finally:
        for h in hooks:
            h.remove()
    return out.logits[:, -1]


def masked_reference(model, batch, dropped, from_layer=0):
    """Last-position logits of the full prompt with ``dropped`` [B, L] keys masked from ``from_layer`` on."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    L = ids.shape[1]
    base = torch.ones(L, L, dtype=torch.bool).tril()[None] & mask[:, None, :]
    eye = torch.eye(L, dtype=torch.bool)[None]
    plain, pruned = (base | eye)[:, None], ((base & ~dropped[:, None, :]) | eye)[:, None]
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: (a, {**k, "attention_mask": pruned}), with_kwargs=True)
             for i, layer in enumerate(model.model.language_model.layers) if 0 < from_layer <= i]
    try:
        positions, _ = model.model.get_rope_index(ids, batch["mm_token_type_ids"], batch["image_grid_thw"],
                                                  attention_mask=batch["attention_mask"])
        text = generate_positions(batch["attention_mask"])
        out = model(**{**batch, "attention_mask": plain if from_layer else pruned,
                       "position_ids": torch.cat([text[None], positions], 0)})
    finally:
        for h in hooks:
            h.remove()
    return out.logits[:, -1]


def dropped_columns(batch, kept):
    ids = batch["input_ids"]
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        cols = (ids[b] == IMAGE).nonzero().flatten()
        keep = torch.zeros(len(cols), dtype=torch.bool)
        keep[kept[b]] = True
        dropped[b, cols[~keep]] = True
    return dropped


# ------------------------------------------------------------------ the tower
def test_one_tower_forward_gives_tokens_planes_and_the_attention_received(model):
    """encode_images: the model's own features and DeepStack planes per image, and the attention each token
    receives in the last block (every Qwen3-VL block attends over the whole image) equal to the plain-torch
    recomputation of tiny_models."""
    from tiny_models import qwen_received_reference

    batch = qwen3_inputs()
    adapter = arrcoc.hf.adapter_for(model)
    assert adapter.attention_received_layer == 2 and adapter.deepstack_planes == 3
    with torch.no_grad():
        out = adapter.encode_images(batch["pixel_values"], {"image_grid_thw": batch["image_grid_thw"]}, False,
                                    received=True)
        features, planes = image_features(model, batch)
        want = qwen_received_reference(model, batch["pixel_values"], batch["image_grid_thw"])
    assert out.grids == [(4, 6), (3, 3), (2, 4)]
    assert all(torch.equal(a, b) for a, b in zip(out.features, features))
    assert sorted(out.per_token) == ["deepstack@0", "deepstack@1", "deepstack@2"]
    for j in range(3):
        assert all(torch.equal(a, b) for a, b in zip(out.per_token[f"deepstack@{j}"], planes[j]))
    for got, ref in zip(out.received, want):
        torch.testing.assert_close(got, ref, atol=1e-15, rtol=0)


# ------------------------------------------------------------------ keep everything
@pytest.mark.parametrize("stages", [{}, {"compress": [{"use": "random_keep", "keep": 1.0}]},
                                    {"llm": [{"use": "fastv", "layer": 1, "keep": 1.0}]}],
                         ids=["none", "random_keep", "fastv"])
@pytest.mark.parametrize("images", [(0,), (0, 1, 2)], ids=["batch1", "batch3_sizes"])
def test_keep_everything_is_the_unmodified_model(model, stages, images):
    """Bit-identical logits and 10 greedy tokens (FastV at layer 1: before two DeepStack injections)."""
    batch = qwen3_inputs(images)
    with torch.no_grad():
        ref_logits, ref_tokens = model(**batch).logits, greedy(model, batch)
        with arrcoc.hf.apply(model, spec(**stages)):
            logits, tokens = model(**batch).logits, greedy(model, batch)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert "_deepstack_process" not in vars(model.model.language_model)  # the Run's hook is gone


@pytest.fixture(scope="module")
def parity_batch():
    """Two prompts of different lengths, images of 8x12 and 4x8 patches, left-padded."""
    return qwen3_inputs((0, 2), texts=[(2, 4), (0, 7)])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_keep_everything_is_invisible_in_every_generate_mode(model, parity_batch, pipeline, mode):
    """test_hf_generate_parity's modes (sampling, beams, static cache, embeddings, a conversation continued from
    the cache, dict outputs, forward) x its keep-everything pipelines (FastV at layer 2, before the last
    injection): the same outputs with and without apply; the features and planes handed on are the model's."""
    run = MODES[mode]
    with torch.no_grad():
        want = run(model, parity_batch)
        with arrcoc.hf.apply(model, PIPELINES[pipeline]):
            got = run(model, parity_batch)
    if getattr(want, "image_outputs", None) is not None:
        assert_same(got.image_outputs.pooler_output, want.image_outputs.pooler_output, "image features")
        assert_same(got.image_outputs.deepstack_features, want.image_outputs.deepstack_features, "planes")
        want, got = dict(want, image_outputs=None), dict(got, image_outputs=None)
    assert_same(got, want, f"{pipeline}/{mode}")


# ------------------------------------------------------------------ pre-LLM
@pytest.fixture(scope="module")
def dropped_half(model):
    """random_keep 0.5 on the batch of three: the logits, the kept raster indices per image."""
    batch = qwen3_inputs()
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "random_keep", "keep": 0.5}])) as run:
        logits = model(**batch).logits[:, -1]
    kept = kept_raster(run.state, batch["image_grid_thw"])
    assert [len(k) for k in kept] == [12, 4, 4]
    return batch, logits, kept


def test_pre_llm_dropping_equals_masking_with_original_positions(model, dropped_half):
    batch, logits, kept = dropped_half
    with torch.no_grad():
        ref = masked_reference(model, batch, dropped_columns(batch, kept))
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("plane", [None, 0, 1, 2], ids=["right", "plane0_wrong", "plane1_wrong", "plane2_wrong"])
def test_every_deepstack_plane_is_gathered_with_the_kept_indices(model, dropped_half, plane):
    """The hand-built prompt with every plane gathered by the kept indices equals arrcoc; gathering one plane with
    any other index (the first K rows: what an adapter that forgot to gather would hand on) changes the logits."""
    batch, logits, kept = dropped_half
    assert all(k == sorted(k) for k in kept)  # kept in raster order, each at its own cell
    with torch.no_grad():
        features, planes = image_features(model, batch)
        gathered = [[p[b][kept[b]] for b in range(3)] for p in planes]
        if plane is not None:
            gathered[plane] = [planes[plane][b][: len(kept[b])] for b in range(3)]
            assert all(k != list(range(len(k))) for k in kept)  # the wrong index is another index
        ref = shortened_logits(model, batch, kept, [features[b][kept[b]] for b in range(3)], gathered)
    if plane is None:
        torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)
    else:
        assert (logits - ref).abs().max() > 1e-6


def test_merged_tokens_merge_their_planes_with_the_same_weights(model):
    """ToMe (size-weighted means from size 1): each merged token and each of its planes is the mean over the
    patches it stands for; and the logits equal the model fed exactly those rows."""
    batch = qwen3_inputs()
    with torch.no_grad():
        with arrcoc.hf.apply(model, spec(compress=[{"use": "tome", "r": 3, "metric": "tokens"}])) as run:
            logits = model(**batch).logits[:, -1]
        features, planes = image_features(model, batch)
    state = run.state
    assert state.counts.tolist() == [21, 6, 5] and bool((state.size > 1).any())
    merged_features, merged_planes = [], [[] for _ in planes]
    for b, (t, h, w) in enumerate(batch["image_grid_thw"].tolist()):
        n, cols = int(state.counts[b]), w // 2
        origin = state.origin[b].view(-1, state.grid[1])[: h // 2, :cols].reshape(-1)  # raster of image b
        groups = torch.zeros(n, origin.numel(), dtype=torch.float64).scatter_(0, origin[None], 1.0)
        means = groups / groups.sum(1, keepdim=True)
        torch.testing.assert_close(state.tokens[b, :n], means @ features[b], atol=1e-12, rtol=0)
        merged_features.append(state.tokens[b, :n])
        for j, plane in enumerate(planes):
            torch.testing.assert_close(state.per_token[f"deepstack@{j}"][b, :n], means @ plane[b], atol=1e-12, rtol=0)
            merged_planes[j].append(means @ plane[b])
    # Each token takes the position of the cell nearest its size-weighted centroid (rounded half up).
    cells = [[int(r) * (w // 2) + int(c) for r, c in torch.floor(state.positions[b, : int(state.counts[b])] + 0.5)
              .long().tolist()] for b, (_, _, w) in enumerate(batch["image_grid_thw"].tolist())]
    with torch.no_grad():
        ref = shortened_logits(model, batch, cells, merged_features, merged_planes)
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


# ------------------------------------------------------------------ in-LLM
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_equals_masking_from_layer_k(model, layer):
    """FastV at layer 1 or 2 prunes before DeepStack injections (the kept tokens keep their own planes), at 3
    after the last one."""
    batch = qwen3_inputs()
    with torch.no_grad(), arrcoc.hf.apply(model, spec(llm=[{"use": "fastv", "layer": layer, "keep": 0.5}])) as run:
        logits = model(**batch).logits[:, -1]
    assert run.report.layer_visual == [[24, 9, 8]] * layer + [[12, 4, 4]] * (4 - layer)
    kept = kept_raster(run.llm_states[f"llm[0]@{layer}"], batch["image_grid_thw"])
    with torch.no_grad():
        ref = masked_reference(model, batch, dropped_columns(batch, kept), from_layer=layer)
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


def test_pre_llm_dropping_then_fastv_before_the_last_injection(model):
    """random_keep 0.5 before the LLM, then FastV at layer 1 on the short prompt (the model's visual mask is the
    short prompt's; two DeepStack injections follow): equals the hand-built short prompt with the planes gathered by
    the kept indices and FastV's dropped tokens masked as keys from layer 1 on."""
    batch = qwen3_inputs()
    stages = spec(compress=[{"use": "random_keep", "keep": 0.5}], llm=[{"use": "fastv", "layer": 1, "keep": 0.5}])
    with torch.no_grad(), arrcoc.hf.apply(model, stages) as run:
        logits = model(**batch).logits[:, -1]
    assert run.report.layer_visual == [[12, 4, 4], [6, 2, 2], [6, 2, 2], [6, 2, 2]]
    kept = kept_raster(run.state, batch["image_grid_thw"])
    fastv = kept_raster(run.llm_states["llm[0]@1"], batch["image_grid_thw"])
    assert all(k == sorted(k) and set(f) < set(k) for k, f in zip(kept, fastv))
    with torch.no_grad():
        features, planes = image_features(model, batch)
        ref = shortened_logits(model, batch, kept, [features[b][kept[b]] for b in range(3)],
                               [[p[b][kept[b]] for b in range(3)] for p in planes],
                               masked=[set(k) - set(f) for k, f in zip(kept, fastv)], from_layer=1)
    torch.testing.assert_close(logits, ref, atol=1e-8, rtol=0)


def test_in_llm_planes_follow_the_original_columns():
    """realign_planes: each kept visual entry gets the plane row of its original column (rows ragged, padded)."""
    from arrcoc.integrations.hf.qwen3_vl import realign_planes

    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    planes = torch.arange(5.0)[:, None]  # rows 0..2: sample 0's columns 1..3; rows 3, 4: sample 1's 2, 3
    index = torch.tensor([[0, 3, 1, 4], [0, 0, 3, 4]])  # sample 0 keeps columns 3 and 1 (in that order)
    visual = torch.tensor([[False, True, True, False], [False, False, True, False]])
    new_mask, rows = realign_planes(mask, planes, index, visual)
    assert new_mask.tolist() == visual.tolist()
    assert rows[:, 0].tolist() == [2.0, 0.0, 4.0]


# ------------------------------------------------------------------ batches
@pytest.mark.parametrize("stages", [{"compress": [{"use": "tome", "r": 3, "metric": "tokens"}]},
                                    {"compress": [{"use": "random_keep", "keep": 0.5}]},
                                    {"llm": [{"use": "fastv", "layer": 1, "keep": 0.5}]}],
                         ids=["tome", "random_keep", "fastv"])
def test_batched_equals_per_sample(model, stages):
    """Three images of different sizes and prompts of different lengths, batched and one at a time (random_keep
    draws image b with seed + b, so its one-image run takes seed b)."""
    batch = qwen3_inputs()
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        with arrcoc.hf.apply(model, spec(**stages)):
            together = greedy(model, batch)
        for b in range(3):
            one = qwen3_inputs((b,))
            if "compress" in stages and stages["compress"][0]["use"] == "random_keep":
                stages = {"compress": [{"use": "random_keep", "keep": 0.5, "seed": b}]}
            with arrcoc.hf.apply(model, spec(**stages)):
                alone = greedy(model, one)
            assert torch.equal(alone[0, one["input_ids"].shape[1]:], together[b, L:])


# ------------------------------------------------------------------ the support matrix on Qwen3-VL
def qwen3_matrix_batch():
    """Two prompts of different lengths, images of 8x12 and 6x6 patches (24 and 9 tokens), float32."""
    model = tiny_qwen3_vl(torch.float32)
    batch = qwen3_inputs((0, 1), texts=[(3, 5), (1, 9)], dtype=torch.float32)
    return model, batch


NO_CLS = "no class token"
#: method -> the refusal's message fragment on Qwen3-VL (every other method of MATRIX runs).
QWEN3_REFUSALS = {
    "tome": NO_CLS, "pool": "full, uncompressed", "hired": NO_CLS, "prumerge": NO_CLS, "prumerge_plus": NO_CLS,
    "visionzip": NO_CLS, "sparsevlm (pre-LLM)": NO_CLS, "scope": NO_CLS, "vispruner": NO_CLS,
    "sparsevlm_llm": "multimodal rotary", "pyramiddrop": "multimodal rotary",
}


@pytest.fixture(scope="module")
def matrix_family():
    return qwen3_matrix_batch()


@pytest.mark.parametrize("method", list(MATRIX))
def test_support_matrix(matrix_family, method):
    """Every method of the support matrix on this family, batch 2: runs or refuses with the message of
    :data:`QWEN3_REFUSALS` (test_hf_support_matrix.check_cell)."""
    model, batch = matrix_family
    check_cell(model, batch, method, QWEN3_REFUSALS, alone=[24, 9])