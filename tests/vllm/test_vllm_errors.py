"""Bad input to arrcoc's vLLM plugin: each a clear ArrcocError when the engine starts (or before)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm.entrypoints")  # not just "vllm": tests/vllm itself imports as a namespace package

from vllm_helpers import ALL, ENGINE, K  # noqa: E402

from arrcoc.errors import ArrcocError, BudgetError, ModelError, SpecError, UnknownPipelineError  # noqa: E402


def start(model_dir: str, **args):
    from vllm import LLM

    return LLM(model=model_dir, **ENGINE, **args)


@pytest.fixture(scope="module")
def toy_dir():
    from arrcoc.models import resolve_model

    return resolve_model("arrcoc:toyvqa")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A Qwen2-VL config (no weights: the refusal comes before any are read)."""
    from transformers import Qwen2VLConfig

    path = tmp_path_factory.mktemp("qwen2_vl")
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903)
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.save_pretrained(path)
    return str(path)


def test_unknown_pipeline():
    import arrcoc.vllm

    with pytest.raises(UnknownPipelineError, match="random_kep.*did you mean 'random_keep'"):
        arrcoc.vllm.engine_args("random_kep", tokens_per_image=K)


def test_unknown_pipeline_in_hand_written_overrides(toy_dir):
    """`vllm serve --hf-overrides '{...}'` written by hand: the engine refuses the name when it starts."""
    import arrcoc.vllm

    overrides = {"architectures": ["ArrcocLlavaForConditionalGeneration"], "arrcoc_pipeline": "no_such_pipeline",
                 "arrcoc_tokens_per_image": K}
    with pytest.raises(ArrcocError, match="no_such_pipeline"):
        start(toy_dir, hf_overrides=json.loads(json.dumps(overrides)))
    assert arrcoc.vllm.ARCHITECTURES["LlavaForConditionalGeneration"][0] == overrides["architectures"][0]


def test_tokens_above_the_tokens_per_image(toy_dir):
    import arrcoc.vllm

    with pytest.raises(BudgetError, match=f"tokens_per_image={ALL + 1} is above the {ALL} visual tokens"):
        start(toy_dir, **arrcoc.vllm.engine_args("random_keep", tokens_per_image=ALL + 1, model="arrcoc:toyvqa"))


@pytest.mark.parametrize("tokens", [0, -3, 2.5, True])
def test_tokens_not_a_count(tokens):
    import arrcoc.vllm

    with pytest.raises(BudgetError, match="tokens_per_image must be a whole number of tokens >= 1"):
        arrcoc.vllm.engine_args("random_keep", tokens_per_image=tokens)


def test_llm_stages_are_refused():
    import arrcoc.vllm

    with pytest.raises(SpecError, match=r"llm: stages \(llm\[0\] \(fastv\)\).*paged KV cache"):
        arrcoc.vllm.engine_args("fastv", tokens_per_image=K)


def test_a_count_that_depends_on_the_image_is_refused_when_the_engine_starts(toy_dir):
    """PruMerge+'s uniform samples skip its outliers: no keep fixes its count, and vLLM needs K in advance."""
    import arrcoc.vllm

    with pytest.raises(BudgetError, match=r"compress\[0\] \(prumerge_plus\).*depends on the image"):
        start(toy_dir, **arrcoc.vllm.engine_args("prumerge_plus", tokens_per_image=K, model="arrcoc:toyvqa"))


def test_prumerge_runs_in_its_fixed_count_mode():
    """PruMerge's adaptive count is replaced by the fixed keep its budget rule derives: keep + 1 = K tokens."""
    from arrcoc.spec import resolve_spec
    from arrcoc.vllm.settings import plan_for_model, stage_plugins

    planned = plan_for_model(resolve_spec("prumerge"), K, original=ALL, grid=(16, 16), layers=3, has_cls=True,
                             encoder_layers=4)
    ((_, stage),) = stage_plugins(planned)
    assert stage.params.keep == K - 1 and not stage.adaptive


def test_model_without_an_arrcoc_class(qwen_dir):
    import arrcoc.vllm

    with pytest.raises(ModelError, match="Qwen2VLForConditionalGeneration; arrcoc has vLLM classes for "
                                         "LlavaForConditionalGeneration"):
        arrcoc.vllm.engine_args("random_keep", tokens_per_image=K, model=qwen_dir)
    # not told the model: the engine finds out from the model's config when it starts
    with pytest.raises(ModelError, match="Qwen2VLForConditionalGeneration; arrcoc has vLLM classes for Llava"):
        start(qwen_dir, **arrcoc.vllm.engine_args("random_keep", tokens_per_image=K))
