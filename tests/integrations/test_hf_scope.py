"""SCOPE inside a tiny LLaVA-1.5 (``arrcoc.hf.apply``), batch 3 with different prompt lengths, float64.

* keep everything (``keep: 1.0``: every patch, in its original order) is the unmodified model, bit for bit;
* a budget of 16 equals the model run on a hand-built prompt that carries the kept features, and the kept
  features are the ones an independent reference picks: the official greedy loop (kinredon/SCOPE
  ``SCOPE``) over the model's own ``hidden_states[-2]`` patches with the CLS row of ``attentions[-2]``
  (an eager copy of the tower) summed over heads, projected by the model's projector;
* LLaVA-NeXT: every view (base and crops) keeps its own budget; Qwen2-VL (no class token): the default is
  refused with a clear error naming the substitutes, ``score: null`` (the official uniform saliency) runs, and
  ``score: attn_received`` (the attention each token receives, VisPruner's official no-class-token rule) picks
  as the official loop with that saliency recomputed in plain torch (Qwen2-VL and 2.5-VL, two image sizes).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from tiny_models import IMAGE, N0, ROWS, left_pad, llava_batch, prompt_with_features, tiny_llava  # noqa: E402

NEW = 6
SPEC = {"encoder": {"use": "timm_vit"}}


def scope(**params) -> dict:
    return {**SPEC, "compress": [{"use": "scope", **params}]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(ROWS)


@torch.no_grad()
def last_logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits[:, -1]


@torch.no_grad()
def greedy(model, inputs: dict) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def official_picks(features: torch.Tensor, cls_attn: torch.Tensor, k: int) -> list[int]:
    """kinredon/SCOPE ``SCOPE`` for one image (ALPHA 1.0, COMBINED multi): the picks in pick order."""
    x = features[None]
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = torch.bmm(unit, unit.transpose(1, 2))
    n = x.shape[1]
    selected = torch.zeros(1, n, dtype=torch.bool)
    cur_max = torch.zeros(1, n, dtype=x.dtype)
    picks = []
    for _ in range(k):
        gains = torch.maximum(torch.zeros(1, dtype=x.dtype),
                              sim.masked_fill(selected.unsqueeze(1), 0) - cur_max.unsqueeze(2)).sum(dim=1)
        gains = (gains * cls_attn[None]).masked_fill(selected, float("-inf"))
        best = int(gains.argmax(dim=1))
        selected[0, best] = True
        picks.append(best)
        cur_max = torch.maximum(cur_max, sim[0, best][None])
    return picks


@torch.no_grad()
def reference_features(model, pixels: torch.Tensor, k: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The official selection on the model's tower: the kept patch indices (original order) and their features
    through the model's projector, ``[k, hidden]``, per image."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.config._attn_implementation = "eager"  # attention weights, as the official output_attentions=True
    out = tower(pixels, output_hidden_states=True, output_attentions=True)
    hidden = out.hidden_states[-2][:, 1:]  # official: patches of hidden_states[-2]
    cls_attn = out.attentions[-2][:, :, 0, 1:].sum(1)  # CLS row, summed over heads
    kept_rows, kept = [], []
    for b in range(pixels.shape[0]):
        rows = sorted(official_picks(hidden[b], cls_attn[b], k))  # masked_select: original order
        kept_rows.append(rows)
        kept.append(model.model.multi_modal_projector(hidden[b, rows]))
    return kept_rows, kept



def test_keep_everything_is_the_unmodified_model(model, batch3):
    ref_logits, ref_tokens = last_logits(model, batch3), greedy(model, batch3)
    with arrcoc.hf.apply(model, scope(keep=1.0)) as run:
        logits, tokens = last_logits(model, batch3), greedy(model, batch3)
    assert run.state.counts.tolist() == [N0] * 3
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens)


def test_selection_equals_hand_built_prompt_and_official_reference(model, batch3):
    k = 16
    L = batch3["input_ids"].shape[1]
    with arrcoc.hf.apply(model, scope(keep=k)) as run:
        logits = last_logits(model, batch3)
        state = run.state
        tokens = greedy(model, batch3)
    assert state.counts.tolist() == [k] * 3
    features = [state.tokens[i, :k] for i in range(3)]
    expected_rows, expected = reference_features(model, batch3["pixel_values"], k)
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output
    for got, all_rows, rows, want in zip(features, full, expected_rows, expected):
        # Selection only: each kept feature is one of the model's own rows, the reference's, in original order.
        match = (got[:, None] - all_rows[None]).abs().amax(-1)
        assert (match.amin(1) == 0).all()
        assert match.argmin(1).tolist() == rows
        # the eager reference tower differs from the model's sdpa one by rounding only
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8)

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


def test_budget_above_the_tokens_is_refused(model, batch3):
    with pytest.raises(arrcoc.errors.BudgetError, match="asked to keep 65 tokens, but an image has only 64"):
        with arrcoc.hf.apply(model, scope(keep=65)):
            last_logits(model, batch3)


# ------------------------------------------------------------------ other families (as test_hf_support_matrix)
def _rows(counts: list[int], placeholders) -> dict:
    """Two prompts of different lengths, ``placeholders(n)`` the image's ids with ``n`` image tokens."""
    texts = [(list(range(5, 8)), list(range(20, 25))), (list(range(5, 6)), list(range(20, 29)))]
    ids, mask = left_pad([[1, *a, *placeholders(n), *b] for n, (a, b) in zip(counts, texts)])
    return {"input_ids": ids, "attention_mask": mask}


def test_llava_next_prunes_every_view():
    from tiny_models import tiny_llava_next

    model = tiny_llava_next(torch.float32)
    sizes = torch.tensor([[50, 100], [90, 40]])  # crop grids 1x2 and 2x1: 3 views of 16 tokens each
    per = arrcoc.hf.adapter_for(model).tokens_per_image(None, {"image_sizes": sizes})
    batch = {**_rows(per, lambda n: [IMAGE] * n), "pixel_values": torch.randn(2, 5, 3, 56, 56, generator=torch.Generator()
                                                                 .manual_seed(0)), "image_sizes": sizes}
    with arrcoc.hf.apply(model, scope(keep=0.5)) as run:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert run.state.counts.tolist() == [8] * 6  # per view, as the official tower (base view + crops)
    assert all(seen < full for seen, full in zip(run.report.layer_visual[0], per))


def test_qwen2_vl_has_no_class_token_and_runs_with_uniform_saliency():
    from tiny_models import QWEN_IMAGE, QWEN_START, QWEN_END, tiny_qwen2_vl

    model = tiny_qwen2_vl(torch.float32)
    grids = torch.tensor([[1, 8, 12], [1, 6, 6]])  # 24 and 9 merged tokens
    batch = {**_rows([24, 9], lambda n: [QWEN_START, *[QWEN_IMAGE] * n, QWEN_END]), "image_grid_thw": grids,
             "pixel_values": torch.randn(96 + 36, 1176, generator=torch.Generator().manual_seed(0))}
    batch["mm_token_type_ids"] = (batch["input_ids"] == QWEN_IMAGE).int()
    with pytest.raises(arrcoc.errors.MissingInputError, match="needs 'cls_attention'.*no class token"):
        with arrcoc.hf.apply(model, scope(keep=0.5)):
            model.generate(**batch, max_new_tokens=2, do_sample=False)
    with arrcoc.hf.apply(model, scope(keep=0.5, score=None)) as run:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert run.state.counts.tolist() == [12, 4]


def test_combine_add_reads_the_towers_head_count(model, batch3):
    """``combine: add`` turns the encoder's head-mean CLS attention back into the official head sum, with the
    head count the encoder states (``meta["num_heads"]``, as timm_vit does): inside a model the tower states it
    too (it did not, and SCOPE used 1), so the default picks as ``heads`` given by hand."""
    heads = model.config.vision_config.num_attention_heads
    states = {}
    for name, extra in (("default", {}), ("given", {"heads": heads})):
        with arrcoc.hf.apply(model, scope(keep=16, combine="add", **extra)) as run:
            last_logits(model, batch3)
        states[name] = run.state
    assert states["default"].meta["num_heads"] == heads == 4
    assert torch.equal(states["default"].positions, states["given"].positions)


@pytest.mark.parametrize("factory", ["tiny_qwen2_vl", "tiny_qwen2_5_vl"])
def test_qwen_runs_with_the_attention_received_saliency(factory):
    import tiny_models
    from tiny_models import QWEN_END, QWEN_IMAGE, QWEN_START, qwen_received_reference

    model = getattr(tiny_models, factory)()
    # A random tiny tower attends almost uniformly (the received attention varies by ~1e-4 of its mean), which
    # SCOPE's gain * a cannot tell from the uniform saliency: sharpen the last block's queries and keys so that
    # the saliency decides picks (checked below: other picks than score: null).
    with torch.no_grad():
        qkv = model.model.visual.blocks[-1].attn.qkv
        qkv.weight[: 2 * qkv.in_features] *= 30
    grids = torch.tensor([[1, 8, 12], [1, 6, 6]])  # 24 and 9 merged tokens
    pixels = torch.randn(96 + 36, 1176, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = {**_rows([24, 9], lambda n: [QWEN_START, *[QWEN_IMAGE] * n, QWEN_END]), "image_grid_thw": grids,
             "pixel_values": pixels}
    batch["mm_token_type_ids"] = (batch["input_ids"] == QWEN_IMAGE).int()
    with pytest.raises(arrcoc.errors.MissingInputError, match="score: attn_received"):
        with arrcoc.hf.apply(model, scope(keep=5)):
            pass
    with torch.no_grad(), arrcoc.hf.apply(model, scope(keep=5, score="attn_received")) as run:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert run.state.counts.tolist() == [5, 5]
    with torch.no_grad(), arrcoc.hf.apply(model, scope(keep=5, score=None)) as uniform:
        model(**batch)
    assert not torch.equal(uniform.state.origin, run.state.origin)
    saliency = qwen_received_reference(model, batch["pixel_values"], grids)
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], grids).pooler_output
    for b in range(2):
        rows = sorted(official_picks(features[b], saliency[b], 5))
        assert torch.equal(run.state.tokens[b, :5], features[b][rows])
    assert run.report.layer_visual == [[5, 5]] * 4
