"""LLaVA-1.5 in vLLM with arrcoc's pre-LLM stages: ``ArrcocLlavaForConditionalGeneration``.

vLLM's own ``LlavaForConditionalGeneration`` (its CLIP tower, projector and
Llama) with three changes:

* the processor gives every image ``K`` placeholders instead of one per
  patch (``get_num_image_tokens``), so prompts are compact: text + ``K`` per
  image, numbered contiguously (as the official pre-LLM methods do);
* ``embed_multimodal`` returns the ``K`` tokens the pipeline keeps of each
  image (:class:`~arrcoc.vllm.selection.PreLLMSelection`);
* for a query-aware pipeline the processor adds each prompt's text after its
  last image to every image of it and keys the image's hash by it
  (:mod:`arrcoc.vllm.processing`, shared with the Qwen classes).

An adapter (:class:`VllmLlavaAdapter`) exposes vLLM's modules to arrcoc's
tower wrapper (:class:`arrcoc.integrations.hf.vision.VisionTower`) exactly as :class:`arrcoc.integrations.hf.llava.LlavaAdapter`
exposes transformers' (whose code it reuses).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from arrcoc.errors import BudgetError, InputError, ModelError
from arrcoc.integrations.hf.adapter import VisionOutput, register_adapter
from arrcoc.integrations.hf.llava import LlavaAdapter

from .processing import QUERY_FIELD, ArrcocMultiModalProcessor, ArrcocProcessingInfo, embed_queries
from .selection import PreLLMSelection, count_on_zero_image
from .settings import plan_for_model, settings_from_config, stage_plugins

ARCHITECTURE = "ArrcocLlavaForConditionalGeneration"


# ------------------------------------------------------------------ adapter
@register_adapter
class VllmLlavaAdapter(LlavaAdapter):
    """vLLM's LLaVA modules seen through arrcoc's adapter contract (``arrcoc.integrations.hf.adapter``)."""

    family = "llava (vLLM)"
    model_classes = (ARCHITECTURE,)

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_tower

    @property
    def num_vision_layers(self) -> int:
        # vLLM builds the tower only up to the feature layer; layer indices keep the checkpoint's depth.
        return int(self.model.config.vision_config.num_hidden_layers)

    def _check_built(self, layer: int, what: str, hint: str = "") -> None:
        built = len(self._encoder.layers)
        if layer >= built:
            raise ModelError(
                f"llava (vLLM): {what} needs vision layer {layer}, but vLLM builds the tower only up to the feature "
                f"layer ({built} of {self.num_vision_layers} layers); read attention from layers 0..{built - 1}{hint}"
            )

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool
                      ) -> VisionOutput:
        inner = self.vision_tower.vision_model
        self._check_built(self.feature_layer - 1, "the feature layer")
        x = inner.pre_layrnorm(inner.embeddings(pixel_values.to(inner.dtype)))
        hidden = tuple(inner.encoder(inputs_embeds=x, return_all_hidden_states=True))
        features = hidden[self.feature_layer]
        grid = self._grid(pixel_values)
        return VisionOutput(list(features[:, 1:]), [grid] * features.shape[0], features[:, 0],
                            hidden if keep_hidden else None)

    def check_signals(self, encoder: Any, pipeline: str) -> None:
        """Refuse at engine start what :meth:`vision_qk` would refuse at the first request (which stops
        vLLM's engine for every request): attention read from a layer vLLM does not build, or from heads split
        across tensor-parallel ranks."""
        if not encoder.outputs & {"cls_attention", "keys"}:
            return
        layers = [encoder.attn_layer] + (encoder.extra_layers if "cls_attention" in encoder.outputs else [])
        for layer in dict.fromkeys(layers):
            self._check_built(layer, f"pipeline {pipeline!r} (an attention signal: CLS attention or keys)",
                              hint="; set the pipeline's encoder attention_layer (or extra_attention_layers) "
                                   "to one of them")
        self._check_heads(self._encoder.layers[0].self_attn)

    @staticmethod
    def _check_heads(attn: torch.nn.Module) -> None:
        if attn.num_heads_per_partition != attn.num_heads:
            raise ModelError(
                "llava (vLLM): the vision tower's heads are split across tensor-parallel ranks, so no rank sees the "
                "whole CLS attention; start the engine with mm_encoder_tp_mode='data' (--mm-encoder-tp-mode data)"
            )

    def vision_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        self._check_built(layer, "an attention signal (CLS attention or keys)")
        block = self._encoder.layers[layer]
        attn = block.self_attn
        self._check_heads(attn)
        h = block.layer_norm1(hidden)
        qkv, _ = attn.qkv_proj(h)
        q, k, _ = qkv.chunk(3, dim=-1)
        B, N, _ = h.shape
        q = q.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = k.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        return q, k, float(attn.scale)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.multi_modal_projector(features)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.language_model.model

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_input_ids(input_ids)


# ------------------------------------------------------------------ helpers
def tower_context(config: Any) -> dict[str, Any]:
    """The budget context of a LLaVA-1.5 config: tokens per image, grid, depths, class token."""
    vision = config.vision_config
    if getattr(vision, "model_type", "") != "clip_vision_model":
        raise ModelError(f"arrcoc.vllm: LLaVA with a {getattr(vision, 'model_type', type(vision).__name__)!r} "
                         "tower is not supported; arrcoc's vLLM LLaVA class runs CLIP towers (LLaVA-1.5)")
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise ModelError(
            f"arrcoc.vllm: LLaVA with vision_feature_layer={config.vision_feature_layer!r} and select strategy "
            f"{config.vision_feature_select_strategy!r} is not supported; arrcoc needs one feature layer and the "
            "'default' strategy (LLaVA-1.5)"
        )
    side = int(vision.image_size) // int(vision.patch_size)
    depth = int(vision.num_hidden_layers)
    return {"original": side * side, "grid": (side, side), "layers": int(config.text_config.num_hidden_layers),
            "has_cls": True, "encoder_layers": int(config.vision_feature_layer) % (depth + 1)}


# --------------------------------------------------------------- processing
class ArrcocLlavaProcessingInfo(ArrcocProcessingInfo, LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        tokens = self.arrcoc_settings.tokens_per_image
        if tokens > full:
            raise BudgetError(
                f"arrcoc.vllm: tokens_per_image={tokens} is above the {full} visual tokens this model gives an image; "
                f"pass 1..{full}"
            )
        return tokens


class ArrcocLlavaMultiModalProcessor(ArrcocMultiModalProcessor, LlavaMultiModalProcessor):
    pass


# -------------------------------------------------------------------- model
@MULTIMODAL_REGISTRY.register_processor(
    ArrcocLlavaMultiModalProcessor, info=ArrcocLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder)
class ArrcocLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA running an arrcoc pipeline on each image's features: ``K`` tokens per image."""

    # transformers 5 saves the CLIP tower flat (`vision_tower.embeddings...`); vLLM's tower nests it in
    # `vision_model`.  Older checkpoints (`vision_tower.vision_model...`) are left as they are.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."}
    ) | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        settings = settings_from_config(config)
        feature_layer = config.vision_feature_layer
        if any(plugin.requirements() & {"cls_attention", "keys"} for _, plugin in stage_plugins(settings.spec)):
            # vLLM builds the tower only up to the feature layer (-2 on LLaVA-1.5), but a stage may read the
            # attention of a later one (PruMerge: the last): build every layer (their weights are in the
            # checkpoint); the features are still read at the feature layer (the adapter's encode_images).
            config.vision_feature_layer = int(config.vision_config.num_hidden_layers)
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            config.vision_feature_layer = feature_layer
        context = tower_context(self.config)
        spec = plan_for_model(settings.spec, settings.tokens_per_image, **context)
        # Every image has the same grid: a budget rule that cannot reach K exactly on it (pool: 9 tokens for
        # K=10 on 16x16) is refused here; in the model it would raise mid-step and stop the engine for everyone.
        count = count_on_zero_image(spec, context["grid"], context["has_cls"])
        if count is not None and count != settings.tokens_per_image:
            raise BudgetError(
                f"arrcoc.vllm: pipeline {settings.spec.name!r} set to tokens_per_image={settings.tokens_per_image} "
                f"hands on {count} tokens for an image (a grid of {context['grid'][0]}x{context['grid'][1]}): its "
                "budget rule cannot reach K exactly on that grid; pick another K, or a method whose count is exact "
                "(random_keep, visionzip)"
            )
        self.arrcoc = PreLLMSelection(self, spec, settings.tokens_per_image)
        self.arrcoc.adapter.check_signals(self.arrcoc.encoder, settings.spec.name)

    def embed_multimodal(self, **kwargs: object) -> Any:
        queries = kwargs.pop(QUERY_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise InputError("arrcoc.vllm: image embeddings cannot be reduced by arrcoc; send the images themselves")
        pixels = image_input["pixel_values"]
        embedded = embed_queries(self, queries, pixels.device, reads_query=self.arrcoc.query_aware)
        return tuple(self.arrcoc(pixels, embedded))
