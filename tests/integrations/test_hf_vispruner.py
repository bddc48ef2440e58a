"""VisPruner inside the tiny LLaVA-1.5 (and its per-view budget in LLaVA-NeXT; Qwen2-VL / 2.5-VL with the
official no-class-token rule, the attention each token receives; refused on a tower with neither signal).

References come from the model itself: the tower run with ``output_attentions`` (eager), its
``hidden_states[-2][:, 1:]`` and the CLS row of ``attentions[-2]`` averaged over heads, as the official
``encode_images`` reads them; the kept features fed to the model on a hand-built prompt.  Qwen: the attention
received recomputed in plain torch from the last block's input (tiny_models.qwen_received_reference).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from tiny_models import (IMAGE, N0, QWEN_END, QWEN_IMAGE, QWEN_START, ROWS, left_pad, llava_batch,  # noqa: E402
                         qwen_received_reference, tiny_llava, tiny_llava_next, tiny_qwen2_5_vl, tiny_qwen2_vl)
from arrcoc.errors import MissingInputError  # noqa: E402
from arrcoc.integrations.hf.vision import VisionTower  # noqa: E402

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
    return [official_loop(a, f, T, r) for f, a in zip(features, attentions)]


def official_loop(a, f, T, r):
    """llava_arch.py l.141-186 for one image with importance ``a`` ``[N]`` and features ``f`` ``[N, C]`` (stable
    sorts): the kept indices, ascending."""
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
    return sorted(torch.cat([important, residual]).tolist())


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


QWEN_GRIDS = torch.tensor([[1, 8, 12], [1, 6, 6]])  # 4 x 6 and 3 x 3 merged tokens


def qwen_batch() -> dict:
    """Two prompts of different lengths whose images differ in size (24 and 9 merged tokens), float64 pixels."""
    rows = [[1, 5, 6, 7, QWEN_START, *[QWEN_IMAGE] * 24, QWEN_END, 20, 21, 22],
            [1, 5, QWEN_START, *[QWEN_IMAGE] * 9, QWEN_END, *range(20, 29)]]
    ids, mask = left_pad(rows)
    pixels = torch.randn(96 + 36, 1176, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": QWEN_GRIDS,
            "mm_token_type_ids": (ids == QWEN_IMAGE).int()}


@pytest.mark.parametrize("make", [tiny_qwen2_vl, tiny_qwen2_5_vl], ids=["qwen2_vl", "qwen2_5_vl"])
def test_qwen_runs_with_the_attention_each_token_receives(make):
    # Official SigLIP rule (no class token): importance = the last layer's attention each token receives; here
    # the Qwen tower's last (full-attention) block, a merged token the mean of its 4 patches.
    model = make()
    batch = qwen_batch()
    T = 6
    with torch.no_grad(), arrcoc.hf.apply(model, spec(keep=T, signal="received", attention_map=None)) as run:
        tokens = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    state = run.state
    assert state.counts.tolist() == [T, T]
    received = qwen_received_reference(model, batch["pixel_values"], QWEN_GRIDS)
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], QWEN_GRIDS).pooler_output
    for b in range(2):
        expected = official_loop(received[b], features[b], T, 0.5)
        assert torch.equal(state.tokens[b, :T], features[b][expected])  # the official picks, original order
    assert run.report.layer_visual == [[T, T]] * 4
    L = batch["input_ids"].shape[1]
    assert tokens.shape == (2, L + NEW) and torch.equal(tokens[:, :L], batch["input_ids"])


@pytest.mark.parametrize("make", [tiny_qwen2_vl, tiny_qwen2_5_vl], ids=["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tower_gives_the_attention_received_per_token(make):
    # The field the plugin reads equals the plain-torch reference; a batch of two image sizes equals each alone.
    model = make()
    batch = qwen_batch()
    tower = VisionTower.for_model(model)
    assert "attention_received" in tower.provides
    tower.configure(frozenset({"attention_received"}))
    with torch.no_grad():
        state = tower.encode_inputs(batch["pixel_values"], {"image_grid_thw": QWEN_GRIDS})
    reference = qwen_received_reference(model, batch["pixel_values"], QWEN_GRIDS)
    got = state.per_token["attn_received"]
    assert state.meta["num_heads"] == 4
    for b, (want, n) in enumerate(zip(reference, (24, 9))):
        torch.testing.assert_close(got[b, :n], want, rtol=0, atol=1e-12)
        assert bool((got[b, n:] == 0).all())
        # query-mean of softmax rows: each image's patches receive 1 in all, a merged token the mean of 4
        torch.testing.assert_close(got[b, :n].sum(), torch.tensor(0.25, dtype=got.dtype), rtol=0, atol=1e-12)
    with torch.no_grad():
        alone = tower.encode_inputs(batch["pixel_values"][96:], {"image_grid_thw": QWEN_GRIDS[1:]})
    torch.testing.assert_close(alone.per_token["attn_received"][0], got[1, :9], rtol=0, atol=1e-15)


def test_qwen_attention_received_in_query_chunks_and_low_precision(monkeypatch):
    # Queries taken a few at a time (a large image never holds its heads x N x N logits at once) give the same
    # signal; a bfloat16 model computes it in float32 from its own bfloat16 queries and keys, close to float64.
    from arrcoc.integrations.hf import adapter as hf_adapter

    model = tiny_qwen2_vl()
    batch = qwen_batch()
    reference = qwen_received_reference(model, batch["pixel_values"], QWEN_GRIDS)
    adapter = arrcoc.hf.adapter_for(model)
    monkeypatch.setattr(hf_adapter, "RECEIVED_CHUNK_ELEMENTS", 2 * 4 * 96 * 5)  # 5 queries per chunk: 20 chunks
    with torch.no_grad():
        out = adapter.encode_images(batch["pixel_values"], {"image_grid_thw": QWEN_GRIDS}, False, received=True)
    for got, want in zip(out.received, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    monkeypatch.undo()
    low = tiny_qwen2_vl(torch.bfloat16)
    with torch.no_grad():
        out = arrcoc.hf.adapter_for(low).encode_images(batch["pixel_values"].bfloat16(), {"image_grid_thw": QWEN_GRIDS},
                                                       False, received=True)
    for got, want in zip(out.received, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=0)
        assert torch.isclose(got.sum(), torch.tensor(0.25), rtol=0, atol=1e-6)


def test_qwen2_vl_default_and_maps_are_refused_naming_the_substitute():
    model = tiny_qwen2_vl()
    with pytest.raises(MissingInputError, match=r"vispruner\) needs 'cls_attention'.*no class token.*"
                                                r"signal: received, attention_map: null"):
        with arrcoc.hf.apply(model, spec(keep=4)):
            pass
    with pytest.raises(MissingInputError, match=r"vispruner\) needs 'attention_maps'.*attention_map: null"):
        with arrcoc.hf.apply(model, spec(keep=4, signal="received")):
            pass


def test_a_tower_with_neither_signal_is_refused():
    # A SigLIP tower in LLaVA: no class token, and arrcoc computes no attention-received signal for it.
    model = tiny_llava(torch.float32, tower="siglip", strategy="full")
    with pytest.raises(MissingInputError, match=r"vispruner\) needs 'attention_received'.*gives no 'attention "
                                                r"received' signal"):
        with arrcoc.hf.apply(model, spec(keep=4, signal="received", attention_map=None)):
            pass


def test_qwen2_5_vl_reads_the_block_the_model_runs_with_full_attention():
    # Qwen2.5-VL runs block i with full attention iff ``i in fullatt_block_indexes`` (no negative indexing): a
    # list [-1] leaves every block windowed, so no block gives the attention received from the whole image.
    from arrcoc.errors import ModelError

    model = tiny_qwen2_5_vl()
    adapter = arrcoc.hf.adapter_for(model)
    assert adapter.attention_received_layer == 1
    model.model.visual.fullatt_block_indexes = [-1]
    assert adapter.attention_received_layer is None
    with torch.no_grad(), pytest.raises(ModelError, match="every block of this vision tower attends within windows"):
        adapter.encode_images(qwen_batch()["pixel_values"], {"image_grid_thw": QWEN_GRIDS}, False, received=True)
    model.model.visual.fullatt_block_indexes = [0, -1]
    assert adapter.attention_received_layer == 0
