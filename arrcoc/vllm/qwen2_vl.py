"""Qwen2-VL and Qwen2.5-VL in vLLM with arrcoc's pre-LLM stages: ``ArrcocQwen2VLForConditionalGeneration``,
``ArrcocQwen2_5_VLForConditionalGeneration``.

vLLM's own classes (the vision transformer with its ``PatchMerger``, and
Qwen2) with these changes, shared by both (:class:`ArrcocQwenModel`):

* the processor gives every image ``K`` ``<|image_pad|>`` placeholders
  instead of one per merged patch (``_get_prompt_updates``); an image with
  fewer than ``K`` merged patches is refused when its prompt is processed;
* ``embed_multimodal`` runs the pipeline on the merger's output (the model's
  own visual tokens, already in the LLM's space, on each image's own
  ``(h / 2, w / 2)`` grid) and returns the ``K`` tokens kept of each image;
  the pipeline is set to ``K`` with the budget rules for that image's own
  token count and grid (Qwen's images differ in size);
* every kept token keeps its ORIGINAL 3-D rotary position ``(t, h, w)``, and
  the text after an image keeps its original position too, as
  :mod:`arrcoc.integrations.hf.qwen2_vl` does in transformers;
* query-aware pipelines get the prompt's text after its last image, as in
  LLaVA's class (:mod:`arrcoc.vllm.processing`).

Positions.  vLLM computes a request's multimodal rotary positions when the
request arrives (``get_mrope_input_positions``), before the tower has run,
so the kept cells are not known yet.  They are placed in two steps:

1. ``get_mrope_input_positions`` numbers the text as the unshortened prompt
   would (text after an image continues at ``base + max(h, w)`` of the
   image's FULL grid; decoding continues after the full prompt's last
   position) and puts every placeholder at its image's base ``(b, b, b)``;
2. ``embed_multimodal`` appends each kept token's grid cell to its
   embedding (extra channels); ``embed_input_ids``, which merges a step's
   image embeddings into the batch, strips them and keeps each placeholder's
   ``(row, col)``, and the same step's ``forward`` adds ``(0, row, col)`` to
   those placeholders' positions.

vLLM's own hook for this (``SupportsMultiModalPruning.recompute_mrope_positions``,
used by EVS for videos) is not used: vLLM 0.32 calls it only when video
pruning is configured, and its CPU model runner never sets the flag.
Because the positions are added where the embeddings are merged (the first
pipeline stage), pipeline parallelism is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from arrcoc.errors import BudgetError, InputError, ModelError, StateError
from arrcoc.integrations.hf.adapter import VisionOutput, register_adapter
from arrcoc.integrations.hf.prompt import source_cells
from arrcoc.integrations.hf.qwen2_vl import Qwen2VLAdapter, grid_budget_context
from arrcoc.pipeline import Pipeline

from .processing import QUERY_FIELD, ArrcocMultiModalProcessor, ArrcocProcessingInfo, embed_queries
from .selection import PreLLMSelection, count_on_zero_image
from .settings import plan_for_model, settings_from_config

ARCHITECTURES = ("ArrcocQwen2VLForConditionalGeneration", "ArrcocQwen2_5_VLForConditionalGeneration")
#: Extra channels appended to each kept token's embedding: its grid row and column, each as two base-64
#: digits (whole numbers below 64 are exact in every float type a model runs in, bfloat16 included).
CELL_CHANNELS = 4
DIGIT = 64


# ------------------------------------------------------------------ adapter
@register_adapter
class VllmQwen2VLAdapter(Qwen2VLAdapter):
    """vLLM's Qwen2-VL modules seen through arrcoc's adapter contract (the transformers adapter's code)."""

    family = "qwen2_vl (vLLM)"
    model_classes = ARCHITECTURES

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool
                      ) -> VisionOutput:
        grid_thw = self._grid_thw(image_inputs)
        merge = int(self.visual.spatial_merge_size)
        features = self.visual(pixel_values, grid_thw=grid_thw.tolist())
        sizes = (grid_thw.prod(-1) // merge**2).tolist()
        grids = [(int(t) * int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
        return VisionOutput(list(features.split(sizes)), grids, None, None)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.language_model.model

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_input_ids(input_ids)


# ------------------------------------------------------------------ selection
def tokens_handed_on(spec: Any, tokens: int, config: Any, grid: tuple[int, int]) -> int | None:
    """How many tokens ``spec``, set to ``tokens`` for an image of ``grid`` by the budget rules, hands on for it.

    A dry run of the stages on a zero image of that grid: the count of a stage that is not ``adaptive`` depends
    on the grid alone, but a budget rule need not reach ``tokens`` exactly on every grid (e.g. pool's output
    grid: 9 tokens for K=10 on 4x6).  ``None`` where the stages cannot run on the dry run's stand-in signals.
    """
    context = grid_budget_context(config, grid)
    return count_on_zero_image(plan_for_model(spec, tokens, **context), grid, context["has_cls"])


class QwenSelection(PreLLMSelection):
    """The pipeline around vLLM's Qwen2-VL, set to ``K`` per image by the budget rules for each image's grid
    (the merged token count differs between images); returns each image's ``K`` tokens and their grid cells."""

    def __init__(self, model: torch.nn.Module, spec: Any, tokens_per_image: int, first: tuple[int, int]) -> None:
        self.config = model.config
        self.unplanned = spec
        probe = VllmQwen2VLAdapter(model)
        super().__init__(model, self._plan(spec, tokens_per_image, probe, first), tokens_per_image)
        self.device = next(model.parameters()).device
        self.plans: dict[tuple[int, int], tuple[list, list]] = {first: (self.vision_stages, self.projector_stages)}

    @staticmethod
    def _plan(spec: Any, tokens: int, adapter: Qwen2VLAdapter, grid: tuple[int, int]) -> Any:
        return plan_for_model(spec, tokens, **grid_budget_context(adapter.model.config, grid))

    def stages_for(self, grid: tuple[int, int]) -> tuple[list, list]:
        from arrcoc.integrations.hf.shorten import split_stages

        if grid not in self.plans:
            spec = self._plan(self.unplanned, self.tokens_per_image, self.adapter, grid)
            pipeline = Pipeline(spec.model_copy(update={"query_encoder": None}), device=self.device,
                                encoder=self.encoder)
            self.plans[grid] = split_stages(pipeline.stages, "auto")
        return self.plans[grid]

    def select(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
               queries: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Flattened patches and ``image_grid_thw`` (and, when query-aware, each image's query embeddings
        ``[T_i, D]``) -> per image its ``[K, D]`` tokens and ``[K]`` grid cells."""
        self.check_queries(queries, int(grid_thw.shape[0]))
        state = self.encoder.encode_inputs(pixel_values, {"image_grid_thw": grid_thw})
        grids = state.meta["grids"]
        out = []
        for b in range(state.B):  # one image per run, as in PreLLMSelection
            vision_stages, projector_stages = self.stages_for(tuple(grids[b]))
            features, one = self.run_image(state.image(b), None if queries is None else queries[b], vision_stages,
                                           projector_stages)
            out.append((features, source_cells(one.positions, one.mask, [tuple(grids[b])])[0]))
        return out


def encode_cells(cells: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Grid cells ``[K]`` -> ``[K, CELL_CHANNELS]``: row and column, two base-``DIGIT`` digits each."""
    row, col = cells // cols, cells % cols
    return torch.stack([row // DIGIT, row % DIGIT, col // DIGIT, col % DIGIT], -1).to(dtype)


def decode_cells(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`encode_cells`: ``(rows, cols)``."""
    digits = channels.round().long()
    return digits[:, 0] * DIGIT + digits[:, 1], digits[:, 2] * DIGIT + digits[:, 3]


# --------------------------------------------------------------- processing
class ArrcocQwenProcessingInfo(ArrcocProcessingInfo):
    """What the processing info of both families changes (a mixin before vLLM's class)."""

    def arrcoc_count(self, grid: tuple[int, int]) -> int | None:
        """:func:`tokens_handed_on` for this engine's pipeline and K, once per grid."""
        counts = self.__dict__.setdefault("_arrcoc_counts", {})
        if grid not in counts:
            settings = self.arrcoc_settings
            counts[grid] = tokens_handed_on(settings.spec, settings.tokens_per_image, self.get_hf_config(), grid)
        return counts[grid]

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # Images only: the pipelines and the fixed K are per image (a video's frames are not budgeted).
        return {"image": None}

    def get_max_image_tokens(self) -> int:
        full = super().get_max_image_tokens()
        tokens = self.arrcoc_settings.tokens_per_image
        if tokens > full:
            width, height = self.get_image_size_with_most_features()
            raise BudgetError(
                f"arrcoc.vllm: tokens_per_image={tokens} is above the {full} visual tokens this model gives even its "
                f"largest image ({width}x{height} px, the processor's max_pixels); pass 1..{full}"
            )
        return tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


class ArrcocQwenMultiModalProcessor(ArrcocMultiModalProcessor):
    """What the processor of both families changes (a mixin before vLLM's class)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
                            ) -> Sequence[PromptReplacement]:
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        placeholder = self.info.get_tokenizer().get_vocab()[hf_processor.image_token]
        tokens = self.info.arrcoc_settings.tokens_per_image

        def replacement(item_idx: int) -> list[int]:
            t, h, w = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            full = t * h * w // merge**2
            if tokens > full:
                raise BudgetError(
                    f"arrcoc.vllm: image {item_idx} of the prompt gives {full} visual tokens (a grid of "
                    f"{h // merge}x{w // merge} merged patches after the processor's resizing), fewer than "
                    f"tokens_per_image={tokens}; send a larger image (at least {tokens} merged patches) or start "
                    "the engine with a smaller K"
                )
            # Checked here, per request: in the model, a wrong count would stop the whole engine.
            count = self.info.arrcoc_count((t * h // merge, w // merge))
            if count is not None and count != tokens:
                spec = self.info.arrcoc_settings.spec
                raise BudgetError(
                    f"arrcoc.vllm: pipeline {spec.name!r} set to tokens_per_image={tokens} hands on {count} tokens "
                    f"for image {item_idx} of the prompt (a grid of {h // merge}x{w // merge} merged patches): its "
                    "budget rule cannot reach K exactly on that grid; send an image of another size, or use a "
                    "method whose count is exact (random_keep, aim)"
                )
            return [placeholder] * tokens

        return [PromptReplacement(modality="image", target=[placeholder], replacement=replacement)]


class ArrcocQwen2VLProcessingInfo(ArrcocQwenProcessingInfo, Qwen2VLProcessingInfo):
    pass


class ArrcocQwen2_5_VLProcessingInfo(ArrcocQwenProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class ArrcocQwen2VLMultiModalProcessor(ArrcocQwenMultiModalProcessor, Qwen2VLMultiModalProcessor):
    pass


class ArrcocQwen2_5_VLMultiModalProcessor(ArrcocQwenMultiModalProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


# -------------------------------------------------------------------- model
class ArrcocQwenModel:
    """vLLM's Qwen2-VL / Qwen2.5-VL running an arrcoc pipeline on each image's merged tokens: ``K`` tokens per
    image, each at its original 3-D rotary position (a mixin before vLLM's class)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_from_config(self.config)
        # The smallest square grid that holds K tokens: planned once here to refuse at start what cannot run at
        # all (adaptive counts, signals the tower lacks); each image is planned for its own grid when it comes.
        side = math.isqrt(settings.tokens_per_image - 1) + 1
        self.arrcoc = QwenSelection(self, settings.spec, settings.tokens_per_image, (side, side))
        self.arrcoc_tokens = settings.tokens_per_image
        self._kept_cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        multimodal = vllm_config.model_config.multimodal_config
        if multimodal is not None and multimodal.is_multimodal_pruning_enabled():
            raise ModelError("arrcoc.vllm: video pruning (--video-pruning-rate) is for videos, which arrcoc's Qwen "
                             "classes do not serve; leave it unset")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ModelError(
                "arrcoc.vllm: Qwen2-VL with pipeline parallelism is not supported: the kept tokens' rotary positions "
                "are set where the image embeddings are merged (the first stage), later stages would not see them; "
                "use tensor or data parallelism"
            )

    def get_encoder_cudagraph_config(self) -> Any:
        # vLLM's encoder CUDA graphs (opt-in: compilation_config.cudagraph_mm_encoder) replay the tower alone,
        # without embed_multimodal, so they would hand the LLM every token: no modality goes through them.
        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])

    # ---------------------------------------------------------------- images
    def embed_multimodal(self, **kwargs: object) -> Any:
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise InputError("arrcoc.vllm: videos are not supported by arrcoc's Qwen2-VL class; send images")
        queries = kwargs.pop(QUERY_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise InputError("arrcoc.vllm: image embeddings cannot be reduced by arrcoc; send the images themselves")
        grid_thw = image_input["image_grid_thw"]
        pixels = image_input["pixel_values"]
        embedded = embed_queries(self, queries, pixels.device, reads_query=self.arrcoc.query_aware)
        merge = int(self.config.vision_config.spatial_merge_size)
        out = []
        for (features, cells), (t, h, w) in zip(self.arrcoc.select(pixels, grid_thw, embedded), grid_thw.tolist()):
            out.append(torch.cat([features, encode_cells(cells, w // merge, features.dtype)], -1))
        return tuple(out)

    # ------------------------------------------------------------- positions
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Positions of the prompt with ``K`` placeholders per image: text numbered as in the unshortened prompt,
        each placeholder at its image's base (:meth:`forward` adds the kept cells)."""
        parts: list[np.ndarray] = []
        start, next_position = 0, 0
        for offset, grid_t, grid_h, grid_w, _ in self.iter_mm_grid_thw(mm_features):
            text = offset - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            base = next_position + text
            parts.append(np.full((3, self.arrcoc_tokens), base))
            # The original numbering goes on after the image's FULL grid, whatever was kept of it.
            next_position = base + max(grid_t, grid_h, grid_w)
            start = offset + self.arrcoc_tokens
        text = len(input_tokens) - start
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(parts, axis=1)
        return torch.from_numpy(np.ascontiguousarray(positions)), int(next_position + text - len(input_tokens))

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's input embeddings; keeps the kept tokens' grid cells (the extra channels of the image
        embeddings, in the order of ``is_multimodal``) for the :meth:`forward` of the same step."""
        self._kept_cells = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            cells = torch.cat([e[:, -CELL_CHANNELS:] for e in multimodal_embeddings])
            slots = is_multimodal.nonzero()[:, 0]
            if slots.numel() != cells.shape[0]:
                raise StateError(f"arrcoc.vllm: {cells.shape[0]} image tokens for {slots.numel()} placeholders")
            self._kept_cells = (slots, *decode_cells(cells))
            multimodal_embeddings = [e[:, :-CELL_CHANNELS] for e in multimodal_embeddings]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> Any:
        kept, self._kept_cells = getattr(self, "_kept_cells", None), None
        if kept is not None:
            # Each placeholder stands at its image's base in all three rows (get_mrope_input_positions): its
            # kept token's original position is base + (0, row, col).  A copy: the runner's buffer stays as is.
            slots, rows, cols = kept
            positions = positions.clone()
            positions[1, slots] += rows.to(positions.dtype)
            positions[2, slots] += cols.to(positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    ArrcocQwen2VLMultiModalProcessor, info=ArrcocQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder)
class ArrcocQwen2VLForConditionalGeneration(ArrcocQwenModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with arrcoc (:class:`ArrcocQwenModel`)."""


@MULTIMODAL_REGISTRY.register_processor(
    ArrcocQwen2_5_VLMultiModalProcessor, info=ArrcocQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class ArrcocQwen2_5_VLForConditionalGeneration(ArrcocQwenModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with arrcoc (:class:`ArrcocQwenModel`): its tower's window attention is undone before
    the merger's output, so the tokens are in raster order as Qwen2-VL's."""
