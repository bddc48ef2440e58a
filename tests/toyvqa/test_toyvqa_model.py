"""The shipped ToyVQA model: loads offline through from_pretrained and answers far above the priors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import arrcoc.toyvqa as toyvqa  # noqa: E402
from arrcoc.errors import ModelError  # noqa: E402

# The image-blind "question lookup" baseline scores 31.4% (docs/toyvqa.md); random weights score ~0.  The
# shipped model scores 83.6% on this slice (88.8% on 2000): the margin absorbs a flipped answer or two from
# another CPU's float rounding, not a model that stopped looking at the image.
THRESHOLD = 0.75
SLICE = 128


@pytest.fixture(scope="module")
def loaded():
    return toyvqa.load()


def test_shipped_files_are_small_fp16_and_complete():
    path = toyvqa.model_path()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in path.iterdir()) < 20 * 2**20
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
    config = json.loads((path / "config.json").read_text())
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"


def test_loads_through_the_ordinary_from_pretrained_path(loaded):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = loaded
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    again = AutoProcessor.from_pretrained(toyvqa.model_path())
    assert type(again) is type(processor) and again.tokenizer.padding_side == "left"
    half = LlavaForConditionalGeneration.from_pretrained(toyvqa.model_path(), dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_answers_a_fixed_test_slice_far_above_the_priors(loaded):
    model, processor = loaded
    result = toyvqa.evaluate(model, processor, split="test", n=SLICE, batch_size=32, progress=False)
    assert result.accuracy.total == SLICE
    assert result.overall >= THRESHOLD, result.accuracy.as_dict()


def test_batched_left_padded_generate_gives_the_evaluated_answers(loaded):
    model, processor = loaded
    batch = list(toyvqa.samples("test", 8, start=100))
    assert len({len(s.question.text.split()) for s in batch}) > 1   # prompts of different lengths: padding
    inputs = processor(images=[s.image for s in batch], text=[toyvqa.prompt(s.question.text) for s in batch],
                       padding=True, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    new = generated[:, inputs["input_ids"].shape[1]:]
    first_words = processor.tokenizer.convert_ids_to_tokens(new[:, 0].tolist())
    assert first_words == toyvqa.predict(model, processor, batch)
    # one word, then </s>
    assert (new[:, 1] == processor.tokenizer.eos_token_id).all()


def test_a_missing_model_directory_is_an_arrcoc_error(tmp_path):
    with pytest.raises(ModelError, match="expected .*config.json"):
        toyvqa.load(tmp_path)


def test_load_accepts_the_shipped_name_like_every_other_model_argument():
    model, _ = toyvqa.load("arrcoc:toyvqa", dtype=torch.float16)
    reference = toyvqa.load(toyvqa.model_path(), dtype=torch.float16)[0]
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
