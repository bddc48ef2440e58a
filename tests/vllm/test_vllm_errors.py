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
def next_dir(tmp_path_factory):
    """A LLaVA-NeXT config (no weights: the refusal comes before any are read)."""
    from transformers import LlavaNextConfig

    path = tmp_path_factory.mktemp("llava_next")
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=999, image_grid_pinpoints=[[56, 112], [112, 56]])
    config.architectures = ["LlavaNextForConditionalGeneration"]
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


def test_model_without_an_arrcoc_class(next_dir):
    import arrcoc.vllm

    with pytest.raises(ModelError, match="LlavaNextForConditionalGeneration; arrcoc has vLLM classes for "
                                         "LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration"):
        arrcoc.vllm.engine_args("random_keep", tokens_per_image=K, model=next_dir)
    # not told the model: the engine finds out from the model's config when it starts
    with pytest.raises(ModelError, match="LlavaNextForConditionalGeneration; arrcoc has vLLM classes for Llava"):
        start(next_dir, **arrcoc.vllm.engine_args("random_keep", tokens_per_image=K))


def test_a_budget_rule_that_misses_k_is_refused_when_the_engine_starts(toy_dir):
    """pool's output grid gives 9 tokens (3x3) for K=10 on the 16x16 grid of every LLaVA image.  Before, the
    engine started, the first request raised StateError inside the model, and every later request failed
    (vLLM's 'Encoder cache miss'): the whole engine was down."""
    import arrcoc.vllm

    with pytest.raises(BudgetError, match=r"pipeline 'pool' set to tokens_per_image=10 hands on 9 tokens"):
        start(toy_dir, **arrcoc.vllm.engine_args("pool", tokens_per_image=10, model="arrcoc:toyvqa"))


@pytest.mark.parametrize("name", ["random_keep", "visionzip", "hired", "prumerge", "sparsevlm", "aim"])
def test_the_dry_run_counts_methods_that_read_tower_signals(name):
    """The count check runs the stages on stand-in signals (CLS attention, keys): before, every method that
    reads them returned no count, so its count went unchecked until the model raised mid-step."""
    from arrcoc.spec import resolve_spec
    from arrcoc.vllm.selection import count_on_zero_image
    from arrcoc.vllm.settings import plan_for_model

    planned = plan_for_model(resolve_spec(name), K, original=ALL, grid=(16, 16), layers=3, has_cls=True,
                             encoder_layers=4)
    assert count_on_zero_image(planned, (16, 16), has_cls=True) == K


def test_the_dry_run_under_the_model_dtype_as_default():
    """vLLM builds the model (and so runs the dry run) with torch's default dtype set to the model's: a bf16
    engine then failed to start with visionzip (its scratch tensors took bf16, scatter_add of float32)."""
    import torch

    from arrcoc.spec import resolve_spec
    from arrcoc.vllm.selection import count_on_zero_image
    from arrcoc.vllm.settings import plan_for_model

    planned = plan_for_model(resolve_spec("visionzip"), K, original=ALL, grid=(16, 16), layers=3, has_cls=True,
                             encoder_layers=4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert count_on_zero_image(planned, (16, 16), has_cls=True) == K
        assert torch.get_default_dtype() == torch.bfloat16  # left as it was
    finally:
        torch.set_default_dtype(default)
