"""VisPruner inside the tiny LLaVA-1.5 (and its per-view budget in LLaVA-NeXT, its refusal on Qwen2-VL).

References come from the model itself: the tower run with ``output_attentions`` (eager), its
``hidden_states[-2][:, 1:]`` and the CLS row of ``attentions[-2]`` averaged over heads, as the official
``encode_images`` reads them; the kept features fed to the model on a hand-built prompt.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from tiny_models import IMAGE, N0, ROWS, left_pad, llava_batch, tiny_llava, tiny_llava_next, tiny_qwen2_vl  # noqa: E402
from arrcoc.errors import MissingInputError  # noqa: E402

NEW = 6


def spec(**params) -> dict:
    return {"encoder": {"use": "timm_vit"}, "compress": [{"use": "vispruner", **params}]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(ROWS)


@torch.no_grad()
def run_model(model, inputs):
    logits = model(**inputs).logits[:, -1]
    tokens = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    return logits, tokens


def official_selection(model, pixels, T, r):
    """Official ``encode_images`` on the model's own tower (eager attention), one image at a time, written from
    llava_arch.py l.141-186 with stable sorts: the kept patch indices, ascending."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
    features = out.hidden_states[-2][:, 1:]
    attentions = out.attentions[-2][:, :, 0, 1:].mean(1)
    kept = []
    for f, a in zip(features, attentions):
        important_num = int(T * r)
        diverse_num = T - important_num
        order = torch.sort(a, descending=True, stable=True).indices
        important, residual = order[:important_num], order[important_num:]
        unit = f / f.norm(dim=-1, keepdim=True)
        while diverse_num > 0:
            step = min(8, residual.shape[0] - diverse_num)
            if step <= 0:
                break
            scores = (unit[residual[::2]] @ unit[residual[1::2]].T).max(-1).values
            distinct = torch.sort(scores, descending=True, stable=True).indices[step:]
            residual = torch.cat([residual[::2][distinct], residual[1::2]])
        kept.append(sorted(torch.cat([important, residual]).tolist()))
    return kept


def test_keep_everything_is_the_unmodified_model(model, batch3):
    ref_logits, ref_tokens = run_model(model, batch3)
    with arrcoc.hf.apply(model, spec(keep=N0)) as run:
        logits, tokens = run_model(model, batch3)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens)
    assert run.report.layer_visual == [[N0] * 3] * 4


@pytest.mark.parametrize("T,r", [(16, 0.5), (12, 0.75)])
def test_selection_equals_official_picks_on_a_hand_built_prompt(model, batch3, T, r):
    with arrcoc.hf.apply(model, spec(keep=T, important_ratio=r)) as run:
        logits, tokens = run_model(model, batch3)
        state = run.state
    assert state.counts.tolist() == [T] * 3
    expected = official_selection(model, batch3["pixel_values"], T, r)
    for b in range(3):
        kept = [int(j) for j in (state.origin[b] >= 0).nonzero()[:, 0]]
        assert kept == expected[b]  # the official picks, in original order
        assert state.origin[b, kept].tolist() == list(range(T))
    # The LLM got exactly the model's own projected features of those patches.
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output
    features = [state.tokens[b, :T] for b in range(3)]
    for f, g, keep in zip(features, full, expected):
        torch.testing.assert_close(f, g[keep], rtol=0, atol=1e-12)
    rows = []
    for b in range(3):
        ids = batch3["input_ids"][b][batch3["attention_mask"][b].bool()].tolist()
        first = ids.index(IMAGE)
        rows.append(ids[:first] + [IMAGE] * T + ids[first + N0:])
    ids_k, mask_k = left_pad(rows)
    fed = {"input_ids": ids_k, "attention_mask": mask_k,
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
    with torch.no_grad():
        ref_logits = model(**fed).logits[:, -1]
        ref_tokens = model.generate(**fed, max_new_tokens=NEW, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    L = batch3["input_ids"].shape[1]
    assert torch.equal(tokens[:, :L], batch3["input_ids"])
    assert torch.equal(tokens[:, L:], ref_tokens[:, ids_k.shape[1]:])
    assert run.report.layer_visual == [[T] * 3] * 4


def test_llava_next_keeps_the_budget_in_every_view():
    # Official (README: 32 x 5 = 160): every view, base and crops, keeps T of its own tokens.
    model = tiny_llava_next()
    sizes = torch.tensor([[50, 100], [100, 100]])  # crop grids 1x2 and 2x2: 3 and 5 views
    pixels = torch.randn(2, 5, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per = arrcoc.hf.adapter_for(model).tokens_per_image(pixels, {"image_sizes": sizes})
    ids, mask = left_pad([[1, 5, *[IMAGE] * n, 20, 9] for n in per])
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}
    with torch.no_grad(), arrcoc.hf.apply(model, spec(keep=6)) as run:
        model(**batch)
    assert run.state.counts.tolist() == [6] * 8


def test_qwen2_vl_is_refused_naming_the_missing_signal():
    model = tiny_qwen2_vl()
    with pytest.raises(MissingInputError, match=r"vispruner\) needs 'cls_attention'.*no class token"):
        with arrcoc.hf.apply(model, spec(keep=4)):
            pass
    with pytest.raises(MissingInputError, match=r"vispruner\) needs 'attention_maps'"):
        with arrcoc.hf.apply(model, spec(keep=4, signal="received")):
            pass
