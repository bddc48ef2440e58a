"""DivPrune inside a tiny ``LlavaForConditionalGeneration`` (tiny_models.py), batch 3 with different prompt lengths,
and inside a tiny LLaVA-NeXT (one global selection per image, as the official code).

The expectations are computed without the integration: the unmodified model (keep everything), the official
greedy loop (vbdi/divprune ``DivPrune``) run on the model's own projected features of each image (LLaVA-NeXT: the
model's own flattened image, ``get_image_features``: base view, unpadded crops, newline tokens), and the model
fed a hand-built prompt that holds only the kept features.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc.errors import BudgetError, ModelError  # noqa: E402
from tiny_models import (IMAGE, N0, ROWS, left_pad, llava_batch, prompt_with_features, tiny_llava,  # noqa: E402
                         tiny_llava_next)

NEW = 6  # new tokens per greedy generation


def divprune(**params) -> dict:
    return {"encoder": {"use": "timm_vit"}, "compress": [{"use": "divprune", **params}]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(ROWS)


@pytest.fixture(scope="module")
def projected(model, batch3):
    """The model's own projected image features, ``[3, 64, D]`` (what DivPrune sees at the LLM input)."""
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output
    return torch.stack(list(features))


@torch.no_grad()
def last_logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits[:, -1]


@torch.no_grad()
def greedy(model, inputs: dict) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def official_divprune(features: torch.Tensor, threshold_terms: int) -> list[int]:
    """vbdi/divprune ``DivPrune`` (llava_arch.py l.147-171) for one image, in float32 as arrcoc ranks."""
    x = features.float()
    norm = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - norm @ norm.t()
    s: list[int] = []
    for i in range(threshold_terms):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[torch.tensor(s)].min(0).values
        s.append(int(scores.argmax()))
    return s



def test_keep_everything_is_the_unmodified_model(model, batch3):
    ref_logits, ref_tokens = last_logits(model, batch3), greedy(model, batch3)
    with arrcoc.hf.apply(model, divprune(keep=1.0)) as run:
        logits, tokens = last_logits(model, batch3), greedy(model, batch3)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens)
    assert run.report.layer_visual == [[N0] * 3] * 4


@pytest.mark.parametrize("keep, k", [(16, 16), (0.098, 6)], ids=["count_16", "official_ratio_0.098"])
def test_selection_equals_hand_built_prompt(model, batch3, projected, keep, k):
    L = batch3["input_ids"].shape[1]
    with arrcoc.hf.apply(model, divprune(keep=keep)) as run:
        logits = last_logits(model, batch3)
        state = run.state
        tokens = greedy(model, batch3)
    assert state.counts.tolist() == [k] * 3  # int(round(0.098 * 64)) = 6
    # The kept features are the official picks over each image's projected features, in original order.
    kept = [sorted(official_divprune(projected[b], k)) for b in range(3)]
    assert all(len(set(picks)) == k for picks in kept)
    features = [state.tokens[b, :k] for b in range(3)]
    for b in range(3):
        assert torch.equal(features[b], projected[b, kept[b]])
        assert state.origin[b].tolist() == [kept[b].index(j) if j in kept[b] else -1 for j in range(N0)]

    ids_k, mask_k = prompt_with_features(batch3, [k] * 3)
    fed = {"input_ids": ids_k, "attention_mask": mask_k,
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
    ref_logits = last_logits(model, fed)
    fed["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    ref_tokens = greedy(model, fed)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens[:, :L], batch3["input_ids"])
    assert torch.equal(tokens[:, L:], ref_tokens[:, ids_k.shape[1]:])
    assert run.report.layer_visual == [[k] * 3] * 4


def test_budget_above_the_image_is_refused(model, batch3):
    with pytest.raises(BudgetError, match="divprune.keep: asked to keep 65 tokens, but an image has only 64"):
        with arrcoc.hf.apply(model, divprune(keep=65)):
            last_logits(model, batch3)


# ------------------------------------------------------------------ LLaVA-NeXT: one selection over the whole image
NEXT_SIZES = torch.tensor([[50, 100], [90, 40]])  # crop grids 1x2 and 2x1: 3 views each, different unpadding


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next()


def next_rows(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths with ``counts[i]`` image placeholders."""
    texts = [([5, 6, 7], [20, 21, 22, 23, 24]), ([5], list(range(20, 29)))]
    return left_pad([[1, *a, *[IMAGE] * n, *b] for n, (a, b) in zip(counts, texts)])


def with_placeholders(inputs: dict, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded prompts of ``inputs`` with ``counts[b]`` image placeholders each, every prompt keeping its
    own padding and shorter rows getting more in front (as arrcoc shortens them: the model numbers a forward's
    columns from 0 whatever the padding, so the padding must match for bit-equal logits)."""
    rows = []
    for b, k in enumerate(counts):
        ids = inputs["input_ids"][b].tolist()
        first, last = ids.index(IMAGE), len(ids) - ids[::-1].index(IMAGE)
        rows.append(ids[:first] + [IMAGE] * k + ids[last:])
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    return ids, (ids != 0).long()


@pytest.fixture(scope="module")
def next_batch(next_model):
    per = arrcoc.hf.adapter_for(next_model).tokens_per_image(None, {"image_sizes": NEXT_SIZES})
    ids, mask = next_rows(per)
    pixels = torch.randn(2, 5, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": NEXT_SIZES}


@pytest.fixture(scope="module")
def next_packed(next_model, next_batch):
    """The model's own flattened image features: base view, unpadded crops with their newline tokens."""
    with torch.no_grad():
        return list(next_model.model.get_image_features(next_batch["pixel_values"], NEXT_SIZES).pooler_output)


@pytest.mark.parametrize("keep", [0.25, 7], ids=["ratio_of_the_flattened_image", "count"])
def test_llava_next_one_selection_over_the_flattened_image(next_model, next_batch, next_packed, keep):
    lengths = [p.shape[0] for p in next_packed]
    assert lengths == [52, 56]  # 16 base + the stitched crops 4 x 8 / 8 x 4 with a newline after every row
    ks = [int(round(keep * n)) if isinstance(keep, float) else keep for n in lengths]  # official int(round(r N))
    with torch.no_grad(), arrcoc.hf.apply(next_model, divprune(keep=keep)) as run:
        logits = last_logits(next_model, next_batch)
        tokens = greedy(next_model, next_batch)
    state = run.state
    assert state.B == 2 and state.counts.tolist() == ks  # one row per image, not per view
    newline = next_model.model.image_newline
    features = []
    for b, (packed, k) in enumerate(zip(next_packed, ks)):
        picks = official_divprune(packed, k)
        assert len(set(picks)) == k
        kept = sorted(picks)  # official keep_indexs.sort(): the flattened order
        assert torch.equal(state.tokens[b, :k], packed[kept])
        features.append(state.tokens[b, :k])
        is_newline = (packed == newline).all(-1)
        assert int(is_newline.sum()) == [4, 8][b]  # the newline tokens are candidates like any other
    assert run.report.layer_visual == [ks] * 4
    # The LLM got exactly those rows: the model fed them on a hand-built prompt.
    ids_k, mask_k = with_placeholders(next_batch, ks)
    fed = {"input_ids": ids_k, "attention_mask": mask_k,
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
    ref_logits = last_logits(next_model, fed)
    fed["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    ref_tokens = greedy(next_model, fed)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    L = next_batch["input_ids"].shape[1]
    assert torch.equal(tokens[:, :L], next_batch["input_ids"])
    assert torch.equal(tokens[:, L:], ref_tokens[:, ids_k.shape[1]:])


def test_llava_next_keep_everything_is_the_unmodified_model(next_model, next_batch):
    ref_logits, ref_tokens = last_logits(next_model, next_batch), greedy(next_model, next_batch)
    with arrcoc.hf.apply(next_model, divprune(keep=1.0)) as run:
        logits, tokens = last_logits(next_model, next_batch), greedy(next_model, next_batch)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens)
    assert run.state.counts.tolist() == [52, 56]


def test_llava_next_per_view_selection_is_a_named_option(next_model, next_batch):
    with torch.no_grad(), arrcoc.hf.apply(next_model, divprune(keep=4, selection="view")) as run:
        last_logits(next_model, next_batch)
    assert run.state.counts.tolist() == [4] * 6  # base + 2 crops per image, each apart
    with torch.no_grad(), arrcoc.hf.apply(next_model, divprune(keep=4)) as run:
        last_logits(next_model, next_batch)
    assert run.state.counts.tolist() == [4, 4]


def test_llava_next_selection_before_the_projector_is_refused(next_model, next_batch):
    with pytest.raises(ModelError, match=r"divprune\) acts on each image as the sequence the LLM receives.*after "
                                         r"the llava_next projector"):
        with torch.no_grad(), arrcoc.hf.apply(next_model, divprune(keep=4), projector="after"):
            last_logits(next_model, next_batch)
    with torch.no_grad(), arrcoc.hf.apply(next_model, divprune(keep=4, selection="view"), projector="after") as run:
        last_logits(next_model, next_batch)
    assert run.state.counts.tolist() == [4] * 6


def test_packed_images_keep_each_image_its_own_question():
    # Packing the views of each image into one row re-indexes what is per row: the query (the first view's) and
    # the question as text (meta['query_text'], one string per row) alike.
    from arrcoc.integrations.hf.shorten import packed_state
    from arrcoc.state import TokenState

    layout = [(1, 2), (2, 1)]  # 3 views per image
    state = TokenState.from_patches(torch.randn(6, 4, 8, dtype=torch.float64), (2, 2))
    query = torch.arange(6, dtype=torch.float64)[:, None, None].expand(6, 2, 8)
    state = state.replace(query=query, query_mask=torch.ones(6, 2, dtype=torch.bool))
    state = state.with_meta(views=layout, query_text=("q0",) * 3 + ("q1",) * 3)
    features = [torch.randn(5, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)]
    packed = packed_state(state, features, layout)
    assert packed.B == 2 and packed.counts.tolist() == [5, 7] and "views" not in packed.meta
    assert packed.query[:, 0, 0].tolist() == [0.0, 3.0]
    assert packed.meta["query_text"] == ("q0", "q1")
