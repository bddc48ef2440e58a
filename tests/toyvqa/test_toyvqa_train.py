"""ToyVQA training on a tiny model: the loss falls, resuming equals not stopping, inputs match the processor's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from arrcoc.toyvqa import prompt, sample, vocabulary  # noqa: E402
from arrcoc.toyvqa.modeling import TINY, build_model, build_processor, pixel_values  # noqa: E402
from arrcoc.toyvqa.questions import QUESTION_TYPES, all_questions  # noqa: E402
from arrcoc.toyvqa.train import (  # noqa: E402
    Batcher,
    TrainConfig,
    TrainingExistsError,
    examples_for_step,
    forward_losses,
    grounding_loss,
    train,
    use_supervised_attention,
)

TINY_RUN = TrainConfig(steps=4, batch_images=2, questions_per_image=2, lr=3e-3, warmup=1, size=TINY)


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_every_question_word_is_in_the_vocabulary(processor):
    s = sample("test", 0)
    words = set()
    for qtype in QUESTION_TYPES:
        for q in all_questions(s.scene, qtype):
            words |= set(processor.tokenizer.tokenize(q.text)) | {q.answer}
    assert words <= set(vocabulary())
    ids = processor.tokenizer("What colour is the STAR?")["input_ids"]
    assert processor.tokenizer.convert_ids_to_tokens(ids) == ["<s>", "what", "colour", "is", "the", "star", "?"]
    assert processor.tokenizer("a unicorn")["input_ids"][-1] == processor.tokenizer.unk_token_id


def test_training_inputs_are_what_the_processor_makes(processor):
    example = examples_for_step(0, replace(TINY_RUN, questions_per_image=3))[0]
    batch = Batcher(processor.tokenizer)([example])
    first = example.questions[0]
    inputs = processor(images=[example.scene.image], text=[prompt(first.text)], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    assert (inputs["input_ids"] == processor.tokenizer.image_token_id).sum() == 256
    assert torch.equal(inputs["input_ids"][0], batch["input_ids"][0, :n])
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"])
    torch.testing.assert_close(pixel_values(example.scene.image[None]), inputs["pixel_values"])
    # the label right after the first prompt is the first answer, then </s>
    word = {w: i for i, w in enumerate(vocabulary())}
    assert batch["labels"][0, n].item() == word[first.answer]
    assert batch["labels"][0, n + 1].item() == processor.tokenizer.eos_token_id
    assert (batch["labels"][0, :n] == -100).all()


def test_chat_template_writes_the_llava_prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the star ?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt("what colour is the star ?")


def test_grounding_loss_rewards_alignment():
    words = torch.eye(4)
    targets = torch.zeros(1, 3, 4)
    targets[0, 0, 1] = targets[0, 1, 2] = 1.0
    aligned = torch.stack([words[1], words[2], -words.sum(0)])[None]
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert grounding_loss(aligned, words, targets, mask, 10.0) < grounding_loss(aligned.flip(1), words, targets, mask, 10.0)


def test_attention_supervision_rows_are_the_question_words_and_the_answer_token(processor):
    batcher = Batcher(processor.tokenizer)
    examples = examples_for_step(0, TINY_RUN)
    batch = batcher(examples)
    tokens = processor.tokenizer.convert_ids_to_tokens
    words = tokens(batch["input_ids"][batch["word_rows"][:, 0], batch["word_rows"][:, 1]].tolist())
    named = {w for e in examples for q in e.questions for w in q.words}
    assert words and set(words) <= named
    answer_tokens = tokens(batch["input_ids"][batch["answer_rows"][:, 0], batch["answer_rows"][:, 1]].tolist())
    assert set(answer_tokens) == {":"}
    # the label after each answer row is the answer word
    assert (batch["labels"][batch["answer_rows"][:, 0], batch["answer_rows"][:, 1] + 1] >= 0).all()
    assert (batch["word_targets"].sum(-1) >= 1).all() and (batch["answer_targets"].sum(-1) >= 1).all()


def test_supervised_attention_equals_eager_attention(processor):
    batcher = Batcher(processor.tokenizer)
    batch = batcher(examples_for_step(0, TINY_RUN))
    results = []
    for setup in (lambda m: m.set_attn_implementation({"text_config": "eager"}), use_supervised_attention):
        model = build_model(TINY, seed=0)
        setup(model)
        probe = torch.nn.Linear(TINY.text_width, 2)
        torch.nn.init.constant_(probe.weight, 0.01)
        losses = forward_losses(model, batch, batcher, TINY_RUN, probe)
        losses["loss"].backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (supervised, supervised_grads) = results
    for key in eager:
        torch.testing.assert_close(eager[key], supervised[key])
    assert eager_grads.keys() == supervised_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(eager_grads[name], supervised_grads[name], rtol=1e-4, atol=1e-6)


def test_image_features_are_256_patch_tokens_per_image():
    model = build_model(TINY)
    features = model.model.get_image_features(pixel_values=pixel_values(np.stack([sample("test", 0).image] * 2)),
                                              return_dict=True).pooler_output
    assert len(features) == 2 and features[0].shape == (256, TINY.text_width)


def test_tiny_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    losses = []
    config = replace(TINY_RUN, steps=8)
    train(tmp_path / "straight", config, progress=False, checkpoint_every=4,
          on_step=lambda step, record: losses.append(record["answer_loss"]))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses

    class Stop(Exception):
        pass

    def stop_at_4(step, record):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train(tmp_path / "stopped", config, progress=False, checkpoint_every=4, on_step=stop_at_4)
    with pytest.raises(TrainingExistsError, match="pass --resume"):
        train(tmp_path / "stopped", config, progress=False)
    with pytest.raises(TrainingExistsError, match="another config"):
        train(tmp_path / "stopped", replace(config, lr=1e-2), resume=True, progress=False)
    train(tmp_path / "stopped", config, resume=True, progress=False, checkpoint_every=4)

    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0)


def test_pixel_values_of_images_of_different_sizes_is_an_input_error():
    from arrcoc.errors import InputError

    image = sample("test", 0).image
    with pytest.raises(InputError, match=r"images: expected uint8 \[B, 128, 128, 3\].*got .*\[64, 128, 3\]"):
        pixel_values([image, image[:64]])
