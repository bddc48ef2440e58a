"""arrcoc as a vLLM plugin: pre-LLM visual-token reduction with a fixed budget of ``K`` tokens per image.

::

    from vllm import LLM
    import arrcoc.vllm

    llm = LLM("path/to/llava-1.5-7b-hf", **arrcoc.vllm.engine_args("visionzip", tokens_per_image=64))

or ``arrcoc serve path/to/llava-1.5-7b-hf --pipeline visionzip --tokens 64``
(vLLM's OpenAI-compatible server).  vLLM finds the plugin through the
``vllm.general_plugins`` entry point (:func:`register`).  See docs/vllm.md.

Importing this module imports nothing of vLLM (torch comes with the ``arrcoc``
package itself, as in any process vLLM starts): the model classes live in
:mod:`arrcoc.vllm.llava` and :mod:`arrcoc.vllm.qwen2_vl` and vLLM imports them when an engine needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The package to install for vLLM (the CPU build arrcoc's tests run on; a CUDA machine installs `vllm`).
VLLM_REQUIREMENT = 'pip install "arrcoc[vllm]"'

#: Hugging Face architecture -> arrcoc's vLLM class that serves it ("module:Class", imported lazily by vLLM).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlavaForConditionalGeneration": ("ArrcocLlavaForConditionalGeneration",
                                      "arrcoc.vllm.llava:ArrcocLlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("ArrcocQwen2VLForConditionalGeneration",
                                        "arrcoc.vllm.qwen2_vl:ArrcocQwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("ArrcocQwen2_5_VLForConditionalGeneration",
                                           "arrcoc.vllm.qwen2_vl:ArrcocQwen2_5_VLForConditionalGeneration"),
}

#: Hugging Face ``model_type`` -> the architecture of :data:`ARCHITECTURES` that serves it.
MODEL_TYPES: dict[str, str] = {"llava": "LlavaForConditionalGeneration",
                               "qwen2_vl": "Qwen2VLForConditionalGeneration",
                               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make vLLM know arrcoc's model classes.

    vLLM calls it in every process it starts; it registers each class once
    (by name: vLLM imports the module only when an engine uses the class).
    """
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for name, target in ARCHITECTURES.values():
        if name not in supported:
            ModelRegistry.register_model(name, target)


def _architecture(model: str | Path) -> str:
    """The arrcoc class name for a model directory (or ``arrcoc:toyvqa``), from its ``config.json``."""
    from arrcoc.errors import ModelError
    from arrcoc.models import resolve_model

    config = Path(resolve_model(model)) / "config.json"
    if not config.is_file():
        raise ModelError(f"arrcoc.vllm: {str(model)!r} is not a model directory with a config.json (looked for "
                         f"{config})")
    names = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return arrcoc_architecture(names, where=str(model))


def arrcoc_architecture(names: list[str], where: str) -> str:
    from arrcoc.errors import ModelError

    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name][0]
        if name in (target for target, _ in ARCHITECTURES.values()):
            return name
    raise ModelError(
        f"arrcoc.vllm: {where} is a {', '.join(names) or 'model of an architecture arrcoc does not know'}; arrcoc "
        f"has vLLM classes for {', '.join(sorted(ARCHITECTURES))}"
    )


class ArrcocOverrides:
    """``hf_overrides`` as a function of the model's config: picks arrcoc's class for the model's
    architecture (used when :func:`engine_args` is not told the model) and sets arrcoc's settings."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = dict(settings)

    def __call__(self, config: Any) -> Any:
        names = [name for name in getattr(config, "architectures", None) or [] if name]
        model_type = getattr(config, "model_type", None)
        if not names and model_type in MODEL_TYPES:  # a config without `architectures`: its type names the family
            names = [MODEL_TYPES[model_type]]
        if not names:
            # Nothing to map. vLLM also calls the function on a blank probe config (architectures [""],
            # model_type "dummy_<type>") only to see whether it changes the model type: leave it as it came.
            return config
        config.architectures = [arrcoc_architecture(names, where=f"the model ({model_type or 'no model_type'})")]
        for key, value in self.settings.items():
            setattr(config, key, value)
        return config

    def __repr__(self) -> str:
        return f"ArrcocOverrides({self.settings!r})"


def engine_args(pipeline: Any, tokens_per_image: int, *, model: str | Path | None = None) -> dict[str, Any]:
    """vLLM engine keyword arguments that run ``pipeline`` with ``tokens_per_image`` tokens per image.

    Returns ``hf_overrides`` (arrcoc's class for the model, the pipeline and
    ``K``; a dict when ``model`` is given, a function of the model's config
    otherwise) and, for a query-aware pipeline, ``mm_processor_cache_gb=0``.
    Everything that can be checked without the model is checked here; the
    rest (``K`` against the model's tokens, the budget rules) when the engine
    starts.
    """
    from arrcoc.spec import resolve_spec

    from .settings import PIPELINE_KEY, TOKENS_KEY, check_spec, check_tokens, pipeline_text, query_aware

    spec = check_spec(resolve_spec(pipeline))
    tokens = check_tokens(tokens_per_image)
    # A stage whose count depends on the image is refused when the engine starts (settings.plan_for_model): only
    # after its budget rule has set its params is it known whether it has a fixed count (PruMerge's ``keep``).
    settings = {PIPELINE_KEY: pipeline_text(pipeline), TOKENS_KEY: tokens}
    overrides: Any
    if model is not None:
        overrides = {"architectures": [_architecture(model)], **settings}
    else:
        overrides = ArrcocOverrides(settings)
    args: dict[str, Any] = {"hf_overrides": overrides}
    if query_aware(spec):
        # An image's processed inputs then carry its prompt's text: the processor cache would share them.
        args["mm_processor_cache_gb"] = 0
    return args


__all__ = ["ARCHITECTURES", "ArrcocOverrides", "VLLM_REQUIREMENT", "engine_args", "register"]
