"""arrcoc.hf on LLaVA-NeXT: compression per view before packing, the model's own unpadding and newlines.

References come from the model itself: ``get_image_features`` packs every
token (base view, crops stitched and unpadded, one newline per row), and a
selection keeps a subset of those rows plus the newline of every row that
keeps a token.
"""

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from tiny_models import IMAGE, left_pad, tiny_llava_next

SIZES = [[50, 100], [90, 40], [100, 100]]  # crop grids (1, 2), (2, 1), (2, 2): wide, tall, square
S = 4  # 56 px / patch 14




@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


def inputs(model, images=(0, 1, 2), texts=((2, 3), (1, 5), (0, 1))):
    sizes = torch.tensor([SIZES[i] for i in images])
    pixels = torch.stack([torch.randn(5, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                          for i in images])
    per = arrcoc.hf.adapter_for(model).tokens_per_image(pixels, {"image_sizes": sizes})
    rows = [[1, *range(5, 5 + pre), *[IMAGE] * n, *range(20, 20 + post), 9] for n, (pre, post) in zip(per, texts)]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


def spec(**sections):
    return {"encoder": {"use": "timm_vit", "extra_attention_layers": [0]}, **sections}


def packed_rows(model, size):
    """For the model's packed features of one image: (view, cell) of each row, or None for a newline."""
    adapter = arrcoc.hf.adapter_for(model)
    rows, cols = adapter.crop_grid(torch.tensor(size))
    from arrcoc.integrations.hf.llava_next import _unpadded_window

    top, bottom, left, right = _unpadded_window(rows * S, cols * S, size)
    out = [(0, c) for c in range(S * S)]
    for y in range(top, bottom):
        for x in range(left, right):
            out.append((1 + (y // S) * cols + x // S, (y % S) * S + x % S))
        out.append(None)
    return out


def kept_cells(state, first_view, views):
    cells = set()
    for v in range(views):
        n = int(state.counts[first_view + v])
        rc = state.positions[first_view + v, :n].round().long()
        cells |= {(v, int(r) * S + int(c)) for r, c in rc.tolist()}
    return cells


def test_tokens_per_image_match_the_models_packing(model):
    batch = inputs(model)
    with torch.no_grad():
        packed = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    assert [p.shape[0] for p in packed] == [len(packed_rows(model, s)) for s in SIZES] == [52, 56, 88]


@pytest.mark.parametrize("stages", [{}, {"compress": [{"use": "random_keep", "keep": 1.0}]},
                                    {"llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]}],
                         ids=["none", "pre_llm", "in_llm"])
def test_keep_everything_is_the_unmodified_model(model, stages):
    batch = inputs(model)
    with torch.no_grad():
        ref_logits = model(**batch).logits[:, -1]
        ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
        with arrcoc.hf.apply(model, spec(**stages)):
            logits = model(**batch).logits[:, -1]
            out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("stages", [{"compress": [{"use": "random_keep", "keep": 0.5}]},
                                    {"compress": [{"use": "hired", "keep": 0.25}]}], ids=["random", "hired"])
def test_selection_equals_the_models_packing_of_the_kept_tokens(model, stages):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    batch = inputs(model)
    with torch.no_grad(), arrcoc.hf.apply(model, spec(**stages)) as run:
        logits = model(**batch).logits[:, -1]
        visual = run.report.layer_visual[0]
    with torch.no_grad():
        packed = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    features, first = [], 0
    for i, size in enumerate(SIZES):
        layout = packed_rows(model, size)
        views = 1 + max(v for v, _ in filter(None, layout))
        kept = kept_cells(run.state, first, views)
        first += views
        rows, row_has_token = [], False
        for j, where in enumerate(layout):
            if where is None:  # a newline survives when its row kept a token
                if row_has_token:
                    rows.append(j)
                row_has_token = False
            elif where in kept:
                rows.append(j)
                row_has_token = row_has_token or where[0] > 0
        features.append(packed[i][rows])
    # Positions the LLM sees: the per-view budgets inside the unpadded window plus the implied newlines.
    assert visual == [f.shape[0] for f in features]
    ids, mask = [], []
    # Each prompt keeps its own padding (arrcoc drops only placeholders); shorter rows get more in front.
    L = max(len(row) - p.shape[0] + f.shape[0] for row, p, f in zip(batch["input_ids"], packed, features))
    for i, f in enumerate(features):
        row = batch["input_ids"][i]
        text_before = row[: (row == IMAGE).nonzero()[0, 0]]
        text_after = row[(row == IMAGE).nonzero()[-1, 0] + 1:]
        r = torch.cat([text_before, torch.full((f.shape[0],), IMAGE), text_after])
        ids.append(torch.cat([torch.zeros(L - len(r), dtype=torch.long), r]))
        mask.append((ids[-1] != 0).long())  # pad id 0 is nowhere else in these prompts
    ids, mask = torch.stack(ids), torch.stack(mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask,
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=0)


def test_hired_splits_each_images_budget_by_its_own_crop_grid(model):
    from arrcoc_plugins.compressors.hired import HiRED

    batch = inputs(model)
    with torch.no_grad(), arrcoc.hf.apply(model, spec(compress=[{"use": "hired", "keep": 0.25}])) as run:
        model(**batch)
    counts = run.state.counts.tolist()
    # The same images one by one with the crop grid given by hand: the official per-group split.
    first = 0
    for i, size in enumerate(SIZES):
        grid = arrcoc.hf.adapter_for(model).crop_grid(torch.tensor(size))
        P = 1 + grid[0] * grid[1]
        one = inputs(model, (i,), ((2, 3),))
        with torch.no_grad(), arrcoc.hf.apply(model, spec()) as plain:
            encoder = plain.encoder
            encoder.configure(frozenset({"cls_attention"}))
            state = encoder.encode_inputs(one["pixel_values"], {"image_sizes": one["image_sizes"]})
        budgets = HiRED(keep=0.25, crops=grid).budgets(state)
        assert budgets.tolist() == counts[first:first + P]
        first += P
    # 1x2 grid: total int(3 * 16 * 0.25) = 12, the full image min(int(12 * 0.5), 16) = 6, the crops share the
    # other 6 in proportion to the full image's early attention, floored.
    assert counts[0] == 6 and 4 <= sum(counts[1:3]) <= 6


@pytest.mark.parametrize("stages", [{"compress": [{"use": "hired", "keep": 0.25}]},
                                    {"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}], ids=["pre", "in"])
def test_batched_equals_per_sample(model, stages):
    batch = inputs(model)
    texts = ((2, 3), (1, 5), (0, 1))
    with torch.no_grad(), arrcoc.hf.apply(model, spec(**stages)):
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)
        L = batch["input_ids"].shape[1]
        for i in range(3):
            one = inputs(model, (i,), (texts[i],))
            alone = model.generate(**one, max_new_tokens=6, do_sample=False)
            assert torch.equal(alone[0, one["input_ids"].shape[1]:], together[i, L:])
