"""CDPruner inside a tiny ``LlavaForConditionalGeneration`` (tiny_models.tiny_llava, float64, batch 3 ragged).

The stage runs on the projected features (``stage: projector``), the instruction is the LLM input embeddings of
each prompt's text after the image.  Expectations come from the unmodified model: keep-everything equals it bit
for bit, and the selection equals the official greedy DPP (written below for one image) on the model's own
features and question embeddings, fed back through a hand-built prompt.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from tiny_models import IMAGE, N0, ROWS, left_pad, llava_batch, tiny_llava  # noqa: E402
from arrcoc.errors import InputError  # noqa: E402

NEW = 6


def spec(**params) -> dict:
    return {"encoder": {"use": "timm_vit"}, "compress": [{"use": "cdpruner", **params}]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(ROWS)


@torch.no_grad()
def run_model(model, inputs):
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, out.logits[0]


def official_picks(x: torch.Tensor, q: torch.Tensor, T: int) -> list[int]:
    """Official ``encode_images`` (llava_arch.py l.150-184) for one image: x [N, D] projected features,
    q [M, D] instruction rows (here the question's token embeddings)."""
    N = x.shape[0]
    xn = (x / x.norm(dim=-1, keepdim=True)).float()
    similarity = xn @ xn.t()
    relevance = -((x / x.norm(dim=-1, keepdim=True)) @ (q / q.norm(dim=-1, keepdim=True)).t()).float().mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    cis = torch.zeros(T, N)
    di2s = torch.diagonal(kernel).clone()
    picks = []
    for i in range(T):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis.square()
        di2s[j] = -float("inf")
    return sorted(picks)


def test_keep_everything_is_the_unmodified_model(model, batch3):
    ref_tokens, ref_logits = run_model(model, batch3)
    with arrcoc.hf.apply(model, spec(keep=1.0)) as run:
        tokens, logits = run_model(model, batch3)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens)
    assert run.state.counts.tolist() == [N0] * 3


def test_selection_equals_official_dpp_on_a_hand_built_prompt(model, batch3):
    k = 12
    with arrcoc.hf.apply(model, spec(keep=k)) as run:
        tokens, logits = run_model(model, batch3)
        state = run.state
    assert state.counts.tolist() == [k] * 3
    ids, mask = batch3["input_ids"], batch3["attention_mask"]
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output
    embed = model.get_input_embeddings()
    features, rows = [], []
    for b in range(3):
        row = ids[b, mask[b].bool()].tolist()
        last = max(i for i, t in enumerate(row) if t == IMAGE)
        with torch.no_grad():
            question = embed(torch.tensor(row[last + 1:]))
        picks = official_picks(full[b], question, k)
        assert torch.equal(state.tokens[b, :k], full[b][picks])  # the same tokens, in original order
        features.append(full[b][picks])
        first = row.index(IMAGE)
        rows.append(row[:first] + [IMAGE] * k + row[first + N0:])
    # Different questions pick differently: the instruction reaches the stage.
    assert len({tuple(state.positions[b, :k].flatten().tolist()) for b in range(3)}) == 3
    ids_k, mask_k = left_pad(rows)
    fed = {"input_ids": ids_k, "attention_mask": mask_k,
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
    ref_tokens, ref_logits = run_model(model, fed)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    L = ids.shape[1]
    assert torch.equal(tokens[:, :L], ids) and torch.equal(tokens[:, L:], ref_tokens[:, ids_k.shape[1]:])


def test_a_prompt_without_a_question_is_refused(model):
    inputs = llava_batch([(3, 4), (2, 0)])
    with arrcoc.hf.apply(model, spec(keep=8)):
        with pytest.raises(InputError, match="a query-aware stage needs text after the image in every prompt"):
            run_model(model, inputs)
