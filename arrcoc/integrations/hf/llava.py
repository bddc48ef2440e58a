"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama decoder.

Features are ``projector(hidden_states[vision_feature_layer][:, 1:])`` with
the ``default`` select strategy (``-2`` for LLaVA-1.5); one placeholder
``image_token_id`` per feature row; features go to ``forward`` /
``generate`` through ``mm_encoder_outputs`` (transformers 5.x).
"""

from __future__ import annotations

from typing import Any

import torch

from arrcoc.errors import ModelError

from .adapter import Adapter, register_adapter


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ModelError(
                f"llava: vision_feature_layer={cfg.vision_feature_layer!r} (several layers concatenated) is not "
                "supported; arrcoc needs one feature layer"
            )
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ModelError(f"llava: unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
        self._encoder = self._find_encoder(self.vision_tower)

    @staticmethod
    def _find_encoder(tower: torch.nn.Module) -> torch.nn.Module:
        inner = getattr(tower, "vision_model", tower)
        encoder = getattr(inner, "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise ModelError(f"llava: vision tower {type(tower).__name__} has no encoder.layers")
        return encoder

    # ------------------------------------------------------------- vision
    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def feature_layer(self) -> int:
        return int(self.model.config.vision_feature_layer)

    @property
    def has_cls(self) -> bool:
        # CLIP towers prepend a class token; SigLIP towers have none.
        inner = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return hasattr(getattr(inner, "embeddings", None), "class_embedding")

    @property
    def drops_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "default"

    @property
    def num_vision_layers(self) -> int:
        return len(self._encoder.layers)

    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        return tuple(out.hidden_states)

    def vision_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        block = self._encoder.layers[layer]
        attn = block.self_attn
        h = block.layer_norm1(hidden)
        B, N, _ = h.shape
        heads = attn.num_heads
        q = attn.q_proj(h).view(B, N, heads, -1).transpose(1, 2)
        k = attn.k_proj(h).view(B, N, heads, -1).transpose(1, 2)
        return q, k, float(attn.scale)

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = int(self.model.config.vision_config.patch_size)
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    # ------------------------------------------------------------- prompt
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def feature_kwargs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}

    # ---------------------------------------------------------------- LLM
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

