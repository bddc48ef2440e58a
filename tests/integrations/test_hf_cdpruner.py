"""CDPruner inside tiny VLMs (tiny_models): LLaVA-1.5 (float64, batch 3 ragged), LLaVA-NeXT and Qwen2-VL.

The stage runs on the projected features (``stage: projector``), the instruction is the LLM input embeddings of
each prompt's text after the image.  Expectations come from the unmodified model: keep-everything equals it bit
for bit, and the selection equals the official greedy DPP (written below for one image) on the model's own
features and question embeddings, fed back through a hand-built prompt.  LLaVA-NeXT: every view keeps the
budget and an image's views share one relevance min / max; Qwen2-VL: runs with the prompt's text as the
instruction.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from tiny_models import IMAGE, N0, ROWS, left_pad, llava_batch, tiny_llava, tiny_llava_next, tiny_qwen2_vl  # noqa: E402
from arrcoc.errors import InputError  # noqa: E402
import arrcoc_plugins.compressors.cdpruner as cdpruner_module  # noqa: E402
from arrcoc_plugins.compressors.cdpruner import cdpruner_relevance  # noqa: E402

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
    e_img, e_txt = x.float(), q.float()  # the official relevance embeddings are float32 (CLIP loads in float32)
    relevance = -((e_img / e_img.norm(dim=-1, keepdim=True)) @ (e_txt / e_txt.norm(dim=-1, keepdim=True)).t()).mean(-1)
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


def test_llava_next_views_each_keep_the_budget_and_share_the_relevance_range(monkeypatch):
    # Two images with crop grids 1x2 and 2x1: 3 views each of 16 tokens (official NeXT: each view keeps T).
    model = tiny_llava_next(torch.float32)
    sizes = torch.tensor([[50, 100], [90, 40]])
    per = arrcoc.hf.adapter_for(model).tokens_per_image(None, {"image_sizes": sizes})
    rows = [[1, 5, 6, 7, *[IMAGE] * n, *range(20, 20 + post)] for n, post in zip(per, (5, 9))]
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, "image_sizes": sizes,
              "pixel_values": torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(3))}
    seen = []

    def spy(*args, **kwargs):  # the groups the stage normalises the relevance over
        seen.append(args[4])
        return cdpruner_relevance(*args, **kwargs)

    monkeypatch.setattr(cdpruner_module, "cdpruner_relevance", spy)
    with arrcoc.hf.apply(model, spec(keep=4)) as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.state.counts.tolist() == [4] * 6
    assert run.state.meta["views"] == [(1, 2), (2, 1)]
    assert seen[0].tolist() == [0, 0, 0, 1, 1, 1]  # one min / max per image, over its views
    assert out.shape == (2, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)


def test_qwen2_vl_runs_with_the_prompt_as_instruction():
    model = tiny_qwen2_vl(torch.float32)
    grids = torch.tensor([[1, 8, 12], [1, 6, 6]])
    rows = [[1, 5, 6, 902, *[900] * n, 903, *range(20, 20 + post)] for n, post in zip((24, 9), (5, 9))]
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, "image_grid_thw": grids,
              "pixel_values": torch.randn(96 + 36, 1176, generator=torch.Generator().manual_seed(4)),
              "mm_token_type_ids": (ids == 900).int()}
    with arrcoc.hf.apply(model, spec(keep=0.5)) as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.state.counts.tolist() == [12, 4]
    assert out.shape == (2, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)
    assert run.report.layer_visual[0] == [12, 4]
