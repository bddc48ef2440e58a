"""The pre-LLM stages inside a vLLM model: the model's own tower
(:class:`arrcoc.integrations.hf.vision.VisionTower`) and :class:`arrcoc.pipeline.Pipeline`, exactly ``K``
tokens out per image.

What runs is what :mod:`arrcoc.integrations.hf` runs inside a Hugging Face
model: the same :class:`~arrcoc.integrations.hf.vision.VisionTower` around the live tower (features of
``vision_feature_layer``, CLS attention and keys read from the tower's own
layers where a stage needs them), the stages before the projector, the
projector, the stages after it; a query-aware stage gets the prompt's text
after the image, embedded by the LLM's own input embeddings.

The tower runs once on the whole batch; the stages run image by image,
because vLLM batches whatever requests its scheduler puts together, and an
image's selection must not depend on them (e.g. ``random_keep`` seeds image
``b`` of a batch with ``seed + b``: here every image is image 0 of its own
batch, as in a one-image ``arrcoc.hf.apply`` call).
"""

from __future__ import annotations

from typing import Sequence

import torch

from arrcoc.errors import ArrcocError, InputError, StateError
from arrcoc.pipeline import Pipeline
from arrcoc.registry import get_registry
from arrcoc.spec import PipelineSpec
from arrcoc.state import TokenState


def count_on_zero_image(planned: PipelineSpec, grid: tuple[int, int], has_cls: bool) -> int | None:
    """How many tokens the stages of ``planned`` (already set to a budget) hand on for an image of ``grid``.

    A dry run of the stages on a zero image of that grid: the count of a stage that is not ``adaptive``
    depends on the grid alone, but a budget rule need not reach the budget exactly on every grid (e.g. pool's
    output grid: 9 tokens for K=10 on 16x16).  The tower's signals are stand-ins (see below); ``None`` where
    the stages still cannot run.  vLLM fixes an image's placeholders before the model runs, and a count that
    differs there stops the engine for every request: callers refuse such a K before that.
    """
    import warnings

    from arrcoc.spec import SECTIONS

    n = grid[0] * grid[1]
    # Stand-ins for the tower's signals (a class token, CLS attention of every layer a stage may read, keys):
    # a non-adaptive stage's count does not depend on their values.  Distinct values: no ties to break.
    # float32 throughout: vLLM builds the model (and calls this) with the model's dtype as torch's default
    ramp = torch.linspace(1.0, 2.0, n, dtype=torch.float32)[None]
    per_token = {"cls_attn": ramp / ramp.sum(), "keys": torch.stack([ramp[0], ramp[0].flip(0), ramp[0] ** 2,
                                                                      ramp[0].cos()], -1)[None]}
    for layer in range(-64, 64):  # extra_attention_layers, by index
        per_token[f"cls_attn@{layer}"] = per_token["cls_attn"]
    cls = torch.ones(1, 4, dtype=torch.float32) if has_cls else None
    state = TokenState.from_patches(per_token["keys"], grid, cls_token=cls, per_token=per_token)
    # a one-word query for query-aware stages (their count does not depend on it either)
    query = torch.zeros(1, 1, 4, dtype=torch.float32)
    state = state.replace(query=query, query_mask=torch.ones(1, 1, dtype=torch.bool))
    registry = get_registry()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # restored below: the stages' own scratch tensors take it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pool's "the nearest grid gives n": the caller says it
            for _, section, stage in planned.stages():
                if section in ("encoder", "query_encoder", "llm"):
                    continue
                state = registry.create(SECTIONS[section][0], stage.use, **stage.params)(state)
    except ArrcocError:
        return None
    finally:
        torch.set_default_dtype(default)
    return int(state.counts[0])


class PreLLMSelection:
    """``spec`` (already set to ``tokens_per_image``) around a model with an arrcoc adapter."""

    def __init__(self, model: torch.nn.Module, spec: PipelineSpec, tokens_per_image: int) -> None:
        from arrcoc.integrations.hf.shorten import split_stages
        from arrcoc.integrations.hf.vision import VisionTower, tower_options

        # The projector runs between the stages before it and those after it (run_image), as in arrcoc.hf.
        self.encoder = VisionTower.for_model(model, project=False, **tower_options(spec.encoder.params))
        self.adapter = self.encoder.adapter
        device = next(model.parameters()).device
        # Inside a model the query is the prompt's own text (see the module docstring), never a query encoder.
        self.pipeline = Pipeline(spec.model_copy(update={"query_encoder": None}), device=device, encoder=self.encoder)
        self.vision_stages, self.projector_stages = split_stages(self.pipeline.stages, "auto")
        self.tokens_per_image = tokens_per_image
        self.query_aware = any("query" in p.requirements() for _, p in self.pipeline.stages)
        #: Set to a list to collect each image's final state (provenance in ``origin``), e.g. to inspect which
        #: tokens were kept; ``None`` (the default) keeps nothing, so a server's memory does not grow.
        self.record: list[TokenState] | None = None

    def check_queries(self, queries: Sequence[torch.Tensor] | None, images: int) -> None:
        if self.query_aware and (queries is None or len(queries) != images):
            got = "none" if queries is None else len(queries)
            raise InputError(f"arrcoc.vllm: a query-aware pipeline needs one query per image; got {got} for "
                             f"{images} images")

    @staticmethod
    def with_query(one: TokenState, query: torch.Tensor) -> TokenState:
        """``one`` (an image alone) with its prompt's query embeddings ``[T, D]``."""
        query = query.to(device=one.device, dtype=one.dtype)
        return one.replace(query=query[None], query_mask=torch.ones(1, query.shape[0], dtype=torch.bool,
                                                                    device=one.device))

    def __call__(self, pixel_values: torch.Tensor, queries: Sequence[torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
        """Pixels ``[B, 3, H, W]`` (and, when query-aware, each image's query embeddings ``[T_i, D]``) ->
        per image ``[K, D]`` tokens in the LLM's input space."""
        self.check_queries(queries, pixel_values.shape[0])
        state = self.encoder.encode_inputs(pixel_values, {})
        return [self.run_image(state.image(b), None if queries is None else queries[b], self.vision_stages,
                               self.projector_stages)[0]
                for b in range(state.B)]  # one image per run: see the module docstring

    def run_image(self, one: TokenState, query: torch.Tensor | None, vision_stages: list, projector_stages: list
                  ) -> tuple[torch.Tensor, TokenState]:
        """One image's state (and its query) through the stages and the projector -> its ``[K, D]`` tokens and
        final state; a count other than ``K`` raises (callers refuse such settings before the model runs)."""
        if self.query_aware:
            one = self.with_query(one, query)
        one = self.pipeline.run_stages(one, vision_stages)
        one = self.encoder.project(one)
        one = self.pipeline.run_stages(one, projector_stages)
        (features,) = self.adapter.assemble(one, {})
        if features.shape[0] != self.tokens_per_image:
            raise StateError(
                f"arrcoc.vllm: pipeline {self.pipeline.spec.name!r} handed on {features.shape[0]} tokens for an "
                f"image, but vLLM reserved {self.tokens_per_image} placeholders for it"
            )
        if self.record is not None:
            self.record.append(one)
        return features, one
