"""Every way of calling the model inside ``apply`` gets the pipeline: positional inputs, several sequences."""

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from tiny_models import llava_batch, tiny_llava

PRE = {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 16}]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def test_positional_pixel_values_go_through_the_pre_llm_stages(model):
    batch = llava_batch([(1, 4), (3, 2)], seed=3)
    with torch.no_grad(), arrcoc.hf.apply(model, PRE) as run:
        by_name = model(**batch).logits
        positional = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    assert [r.plugin for r in run.report.pre_llm] == ["random_keep"]
    assert positional.shape == by_name.shape == (2, 16 + 6, 200)  # 16 kept image tokens + bos and 5 text tokens
    torch.testing.assert_close(positional, by_name, atol=0, rtol=0)


@pytest.mark.parametrize("options", [dict(num_return_sequences=2, do_sample=True),
                                     dict(num_beams=2, num_return_sequences=2)], ids=["sampled", "beams"])
def test_several_sequences_per_prompt_keep_the_callers_prompt(model, options):
    batch = llava_batch([(1, 4), (3, 2)], seed=3)
    L = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    with torch.no_grad(), arrcoc.hf.apply(model, PRE):
        out = model.generate(**batch, max_new_tokens=3, **options)
    assert out.shape == (4, L + 3)
    assert torch.equal(out[:, :L], batch["input_ids"].repeat_interleave(2, 0))


def test_a_shipped_file_with_its_own_query_encoder_runs_inside_another_model(model):
    # sparsevlm.yaml names hf_text on the shipped toy model (width 192) for standalone runs; inside a model
    # the query is the prompt's text in that model's embeddings, so the file's query encoder is never built
    batch = llava_batch([(1, 4), (3, 2)], seed=3)
    with arrcoc.hf.apply(model, "sparsevlm") as run:
        assert run.pipeline.query_encoder is None
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert run.report.visual_tokens_mean == pytest.approx(0.4 * 64, abs=1)
