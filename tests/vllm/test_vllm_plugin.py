"""arrcoc in vLLM (CPU build, the shipped ToyVQA model): the same answers as transformers and arrcoc.hf.apply.

* keep-everything (random_keep at K = 256 of 256): greedy ids and top-5
  logprobs equal transformers' ``generate`` without arrcoc on 16 prompts;
* random_keep, visionzip, hired, sparsevlm (query-aware) and prumerge (the
  last layer's attention, beyond the layers vLLM builds) at K = 64: the
  engine's prompt is text + K, the kept tokens (``origin``) are those of
  ``arrcoc.hf.apply`` with the same pipeline set to the same K, and the
  answers and logprobs equal its answers (1e-4);
* two questions on one image in one batch: different kept sets, each the
  one ``apply`` keeps for its question (the caches do not mix them);
* a batch mixing one- and two-image prompts of different lengths.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints")  # not just "vllm": tests/vllm itself imports as a namespace package

import torch  # noqa: E402

from vllm_helpers import ALL, K, Engines, apply_reference, assert_same_generation, generate, hf_generate, planned, \
    request, top5, toy_samples, vllm_ids_and_tops  # noqa: E402

#: prumerge reads the LAST layer's attention, which vLLM's LLaVA does not build (it stops at the feature layer -2):
#: arrcoc's class builds the whole tower for such pipelines (before, the first request stopped the engine)
PIPELINES = ["random_keep", "visionzip", "hired", "sparsevlm", "prumerge"]


@pytest.fixture(scope="module")
def engines():
    engines = Engines()
    yield engines
    engines.close()


@pytest.fixture(scope="module")
def samples():
    return toy_samples(16)


def test_keep_everything_equals_transformers(engines, toy, samples):
    model, processor = toy
    llm = engines.get("random_keep", ALL, tell_model=False)
    outs, states = generate(llm, [request(s) for s in samples])
    assert len(states) == len(samples)
    for state in states:  # every patch kept, in its own place
        assert torch.equal(state.origin[0], torch.arange(ALL))
    for i, (sample, out) in enumerate(zip(samples, outs)):
        text = len(processor(images=[sample.image], text=[request(sample)["prompt"]])["input_ids"][0]) - ALL
        assert len(out.prompt_token_ids) == text + ALL
        assert_same_generation(vllm_ids_and_tops(out), hf_generate(model, processor, sample), 1e-4, f"prompt {i}")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_equals_apply(engines, toy, samples, pipeline):
    model, processor = toy
    spec = planned(pipeline, model)
    llm = engines.get(pipeline, K)
    outs, states = generate(llm, [request(s) for s in samples])
    assert len(states) == len(samples)
    origins = []
    for i, (sample, out) in enumerate(zip(samples, outs)):
        text = len(processor(images=[sample.image], text=[request(sample)["prompt"]])["input_ids"][0]) - ALL
        assert len(out.prompt_token_ids) == text + K, f"prompt {i}: {len(out.prompt_token_ids)} tokens"
        want, origin = apply_reference(model, processor, spec, sample)
        assert int((origin >= 0).sum()) >= K  # K tokens stand for at least K patches
        origins.append(origin)
        assert_same_generation(vllm_ids_and_tops(out), want, 1e-4, f"{pipeline}, prompt {i}")
    # The kept tokens: the engine encodes images in its own order, so compare them as a multiset.
    key = lambda o: tuple(o.tolist())  # noqa: E731
    assert sorted(map(key, (s.origin[0] for s in states))) == sorted(map(key, origins))
    for state in states:
        assert int(state.counts[0]) == K


def test_two_questions_on_one_image_keep_their_own_tokens(engines, toy, samples):
    model, processor = toy
    spec = planned("sparsevlm", model)
    sample = samples[0]
    # questions no earlier test asked about this image: nothing of them is in the engine's caches yet
    questions = ["is there a red circle ?", "how many stars are there ?"]
    llm = engines.get("sparsevlm", K)
    outs, states = generate(llm, [request(sample, q) for q in questions] * 2)
    refs = [apply_reference(model, processor, spec, sample, q) for q in questions]
    assert not torch.equal(refs[0][1], refs[1][1]), "the two questions should keep different tokens"
    for i, out in enumerate(outs):
        assert_same_generation(vllm_ids_and_tops(out), refs[i % 2][0], 1e-4, f"question {i % 2}")
    # One encoding per (image, question): the repeated prompts share theirs, the two questions do not.
    assert sorted(tuple(s.origin[0].tolist()) for s in states) == sorted(tuple(r[1].tolist()) for r in refs)


def test_query_aware_prompt_without_a_question_is_rejected(engines, samples):
    """Refused when the prompt is processed, before the engine: the engine goes on serving."""
    from PIL import Image
    from vllm import SamplingParams

    from arrcoc.errors import InputError

    llm = engines.get("sparsevlm", K)
    image = Image.fromarray(samples[0].image)
    with pytest.raises(InputError, match="query-aware and needs text after the last image"):
        llm.generate([{"prompt": "USER: <image>", "multi_modal_data": {"image": image}}], use_tqdm=False)
    out = llm.generate([request(samples[0])], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1

def test_mixed_batch_of_one_and_two_images_and_prompt_lengths(engines, toy, samples):
    """One batch: prompts of different lengths, with one or two images; each equals apply on its own."""
    from PIL import Image

    from arrcoc.integrations import hf

    model, processor = toy
    spec = planned("visionzip", model)  # no seed: a two-image prompt's images are treated alike by apply and vLLM
    a, b = samples[1], samples[2]
    prompts = [("USER: <image>\n" + a.question.text + " ASSISTANT:", [a.image]),
               ("USER: <image>\n<image>\nlook at both images . " + b.question.text + " ASSISTANT:", [a.image, b.image]),
               ("USER: <image>\n" + b.question.text + " ? ? ? ASSISTANT:", [b.image])]
    llm = engines.get("visionzip", K, images_per_prompt=2)
    outs, _ = generate(llm, [{"prompt": text, "multi_modal_data": {"image": [Image.fromarray(i) for i in images]}}
                             for text, images in prompts])
    for (text, images), out in zip(prompts, outs):
        inputs = processor(images=images, text=[text], return_tensors="pt")
        assert len(out.prompt_token_ids) == inputs["input_ids"].shape[1] - len(images) * (ALL - K)
        with hf.apply(model, spec), torch.inference_mode():
            ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        want_ids = ref.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        want_tops = [top5(logits[0]) for logits in ref.logits]
        assert_same_generation(vllm_ids_and_tops(out), (want_ids, want_tops), 1e-4, text)


def test_register_is_idempotent(monkeypatch):
    """vLLM calls the entry point in every process it starts; calling it again registers nothing again."""
    from vllm import ModelRegistry

    import arrcoc.vllm

    arrcoc.vllm.register()  # as vLLM's plugin loading does at an engine's start (a no-op if one has started)
    before = set(ModelRegistry.get_supported_archs())
    assert {name for name, _ in arrcoc.vllm.ARCHITECTURES.values()} <= before
    calls = []
    monkeypatch.setattr(ModelRegistry, "register_model", lambda *args, **kwargs: calls.append(args))
    arrcoc.vllm.register()
    arrcoc.vllm.register()
    assert calls == [] and set(ModelRegistry.get_supported_archs()) == before
