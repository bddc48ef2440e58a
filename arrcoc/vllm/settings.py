"""What an arrcoc vLLM engine runs, and the checks made before any model loads (no vLLM import here).

A pipeline reaches vLLM's engine inside the model's Hugging Face config
(``hf_overrides``): :data:`PIPELINE_KEY` holds a pipeline name, a YAML path
or the JSON text of a spec, :data:`TOKENS_KEY` the visual tokens per image
``K``.  Both processes that need them (the one that tokenises prompts and
the one that runs the model) read them back with :func:`settings_from_config`.

vLLM fixes the number of placeholders of an image when the prompt is
processed, before the model runs, so ``K`` must be known then and every
image must come out of the pipeline with exactly ``K`` tokens:

* the pipeline is set to ``K`` by the budget rules every arrcoc method
  declares (:func:`arrcoc.budget.plan_budget`, as ``arrcoc eval`` does);
* a stage whose count still depends on the image once the budget rules set
  its params (``adaptive``: PruMerge+'s samples; PruMerge with its ``keep``
  set is fixed) is refused: its count cannot be fixed in advance;
* ``llm:`` stages are refused: vLLM's paged KV cache and scheduler allot a
  request's cache blocks from its prompt length, so tokens cannot leave the
  sequence between decoder layers;
* ``encoder.in_blocks`` is refused as in :mod:`arrcoc.integrations.hf`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arrcoc.errors import BudgetError, ModelError, SpecError
from arrcoc.spec import SECTIONS, PipelineSpec, resolve_spec

#: HF config attributes (set through vLLM's ``hf_overrides``) that carry arrcoc's settings into the engine.
PIPELINE_KEY = "arrcoc_pipeline"
TOKENS_KEY = "arrcoc_tokens_per_image"


@dataclass(frozen=True)
class Settings:
    """A pipeline and the visual tokens each image keeps (``K``)."""

    spec: PipelineSpec
    tokens_per_image: int


def pipeline_text(pipeline: Any) -> str:
    """A pipeline (name, path, dict or ``PipelineSpec``) as the string carried in the HF config.

    A name or a path stays as it is (the engine resolves it again, so a file
    must exist where the engine runs); a dict or a spec becomes its JSON text.
    """
    if isinstance(pipeline, PipelineSpec):
        return json.dumps(pipeline.as_yaml_dict())
    if isinstance(pipeline, dict):
        resolve_spec(pipeline)  # a malformed dict fails here, with its located message
        return json.dumps(pipeline)
    if isinstance(pipeline, (str, Path)):
        if Path(pipeline).is_file():  # the engine may run elsewhere (another node): carry the file's content
            return json.dumps(resolve_spec(pipeline).as_yaml_dict())
        return str(pipeline)
    raise SpecError(f"arrcoc.vllm: expected a pipeline name, YAML path, dict or PipelineSpec, got "
                    f"{type(pipeline).__name__}")


def spec_from_text(text: str) -> PipelineSpec:
    """The inverse of :func:`pipeline_text`."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"arrcoc.vllm: {PIPELINE_KEY} is not valid JSON ({exc})") from None
        return resolve_spec(data)
    return resolve_spec(text)


def check_tokens(tokens_per_image: Any) -> int:
    if isinstance(tokens_per_image, bool) or not isinstance(tokens_per_image, int) or tokens_per_image < 1:
        raise BudgetError(f"arrcoc.vllm: tokens_per_image must be a whole number of tokens >= 1, got "
                          f"{tokens_per_image!r}")
    return tokens_per_image


def check_spec(spec: PipelineSpec) -> PipelineSpec:
    """Refuse what cannot run in vLLM whatever the model (see the module docstring)."""
    if spec.llm:
        stages = ", ".join(f"llm[{i}] ({s.use})" for i, s in enumerate(spec.llm))
        raise SpecError(
            f"{spec.source}: pipeline {spec.name!r} has llm: stages ({stages}); they cannot run in vLLM, whose "
            "paged KV cache and scheduler reserve a request's cache blocks from its prompt length, so tokens "
            "cannot leave the sequence between decoder layers; use the pre-LLM stages only (or arrcoc.hf.apply)"
        )
    if spec.encoder.params.get("in_blocks"):
        raise SpecError(
            f"{spec.source}: encoder.in_blocks (compression inside the ViT blocks) cannot run inside the model's "
            "tower; move the compressor to `compress:`"
        )
    return spec


def settings_from_config(config: Any) -> Settings:
    """The settings an engine's HF config carries; a clear error when they are missing or wrong."""
    text = getattr(config, PIPELINE_KEY, None)
    tokens = getattr(config, TOKENS_KEY, None)
    if text is None or tokens is None:
        raise ModelError(
            f"arrcoc.vllm: the model config lacks {PIPELINE_KEY!r} / {TOKENS_KEY!r}; start the engine with "
            "**arrcoc.vllm.engine_args(pipeline, tokens_per_image=K) (or `arrcoc serve`)"
        )
    return Settings(check_spec(spec_from_text(str(text))), check_tokens(tokens))


def stage_plugins(spec: PipelineSpec) -> list[tuple[str, Any]]:
    """The pre-LLM stages of ``spec``, built (cheap: no model is loaded for a stage)."""
    from arrcoc.registry import get_registry

    registry = get_registry()
    out = []
    for label, section, stage in spec.stages():
        if section in ("encoder", "query_encoder", "llm"):
            continue
        out.append((label, registry.create(SECTIONS[section][0], stage.use, **stage.params)))
    return out


def query_aware(spec: PipelineSpec) -> bool:
    """Whether a pre-LLM stage reads the query (the prompt's text): then the selection depends on the prompt."""
    return any("query" in plugin.requirements() for _, plugin in stage_plugins(spec))


def plan_for_model(spec: PipelineSpec, tokens_per_image: int, *, original: int, grid: tuple[int, int],
                   layers: int, has_cls: bool, encoder_layers: int) -> PipelineSpec:
    """``spec`` set to hand on exactly ``tokens_per_image`` tokens of ``original`` per image.

    The budget rules are those of ``arrcoc eval`` (:func:`arrcoc.budget.plan_budget`).
    """
    from arrcoc.budget import plan_budget

    if tokens_per_image > original:
        raise BudgetError(
            f"arrcoc.vllm: tokens_per_image={tokens_per_image} is above the {original} visual tokens the model "
            f"gives an image; pass 1..{original}"
        )
    planned = plan_budget(spec, tokens_per_image / original, original=original, grid=grid, layers=layers,
                          has_cls=has_cls, encoder_layers=encoder_layers).spec
    for label, plugin in stage_plugins(planned):
        if getattr(plugin, "adaptive", False):
            raise BudgetError(
                f"{spec.source}: {label} ({plugin.name}) hands on a number of tokens that depends on the image "
                f"(adaptive), but vLLM fixes each image's placeholders before the model runs; use a method with "
                f"a fixed count, or arrcoc.hf.apply"
            )
    return planned
