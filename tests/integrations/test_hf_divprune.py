"""DivPrune inside a tiny ``LlavaForConditionalGeneration`` (tiny_models.py), batch 3 with different prompt lengths.

The expectations are computed without the integration: the unmodified model (keep everything), the official
greedy loop (vbdi/divprune ``DivPrune``) run on the model's own projected features of each image, and the model
fed a hand-built prompt that holds only the kept features.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc.errors import BudgetError  # noqa: E402
from tiny_models import N0, ROWS, llava_batch, prompt_with_features, tiny_llava  # noqa: E402

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
