"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama decoder.

Features are ``projector(hidden_states[vision_feature_layer][:, 1:])`` with
the ``default`` select strategy (``-2`` for LLaVA-1.5; a list of layers is
concatenated along the width, as the model does); one placeholder
``image_token_id`` per feature row; features go to ``forward`` /
``generate`` through ``mm_encoder_outputs`` (transformers 5.x).
"""

from __future__ import annotations

from typing import Any

import torch

from arrcoc.errors import ModelError
from arrcoc.state import TokenState

from .adapter import Adapter, VisionOutput, register_adapter


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    config_only_inputs = ("vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        layers = cfg.vision_feature_layer
        if not isinstance(layers, int) and not (
                isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) for i in layers)):
            raise ModelError(f"llava: vision_feature_layer must be an int or a non-empty list of ints, got {layers!r}")
        strategy = cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ModelError(f"{self.family}: vision_feature_select_strategy must be 'default' or 'full' (as in "
                             f"transformers), got {strategy!r}")
        inner = getattr(self.vision_tower, "vision_model", self.vision_tower)
        self._encoder = getattr(inner, "encoder", None)
        if self._encoder is None or not hasattr(self._encoder, "layers"):
            raise ModelError(f"llava: vision tower {type(self.vision_tower).__name__} has no encoder.layers")

    # ------------------------------------------------------------- vision
    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def feature_layers(self) -> list[int]:
        """Indices into the tower's hidden states (``num_layers + 1`` entries) of the features, in the config's
        order: one for LLaVA-1.5 (``-2``); several are concatenated along the width, as the model does."""
        layers = self.model.config.vision_feature_layer
        return [int(i) % (self.num_vision_layers + 1) for i in ([layers] if isinstance(layers, int) else layers)]

    @property
    def feature_layer(self) -> int:
        """The deepest feature layer: the official methods read the attention of the layer producing LLaVA-1.5's
        one feature layer (``-2``); with several, the deepest plays that role."""
        return max(self.feature_layers)

    @property
    def feature_width(self) -> int:
        return int(self.model.config.vision_config.hidden_size) * len(self.feature_layers)

    @property
    def has_cls(self) -> bool:
        # CLIP towers prepend a class token; SigLIP towers have none.
        inner = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return hasattr(getattr(inner, "embeddings", None), "class_embedding")

    @property
    def num_vision_layers(self) -> int:
        return len(self._encoder.layers)

    @property
    def default_attention_layer(self) -> int:
        # The layer whose output is the (deepest) feature layer (LLaVA-1.5: 22 of 24), as timm_vit's `layer: -2`.
        return self.feature_layer - 1

    def _grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = int(self.model.config.vision_config.patch_size)
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    @property
    def features_keep_cls(self) -> bool:
        """``vision_feature_select_strategy="full"`` on a tower with a class token: the model's features are the
        class token, then the patches.  arrcoc keeps the class token apart (never dropped) and puts it first."""
        return self.model.config.vision_feature_select_strategy == "full" and self.has_cls

    def tokens_per_image(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[int]:
        rows, cols = self._grid(pixel_values)
        return [rows * cols + int(self.features_keep_cls) - int(self.drops_first_patch)] * pixel_values.shape[0]

    def budget_context(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        # Every image has the tower's one patch grid (the CLS token, when the features keep it, is counted in
        # ``original`` as the prompt counts it, not in the grid).  A tower that loses its first patch has no grid
        # its placeholders cover: refused with encode_images's error, as the eval's forward refused it before.
        self._refuse_partial_grid()
        grid = self._grid(pixel_values)
        tokens = self.tokens_per_image(pixel_values, image_inputs)
        return self._budget_contexts(tokens, [grid] * len(tokens))

    @property
    def drops_first_patch(self) -> bool:
        """``default`` on a tower without a class token: transformers drops the first row whatever it is, here the
        first image patch, so the features no longer cover the patch grid."""
        return self.model.config.vision_feature_select_strategy == "default" and not self.has_cls

    def _refuse_partial_grid(self) -> None:
        if self.drops_first_patch:
            raise ModelError(
                f"{self.family}: vision_feature_select_strategy 'default' drops the first row of the tower's output, "
                f"and {type(self.vision_tower).__name__} has no class token, so the model drops the first image "
                "patch and its features no longer cover the patch grid pre-LLM stages compress; set "
                "vision_feature_select_strategy='full' (what checkpoints with such towers use), or use llm: stages only"
            )

    def assemble(self, state: TokenState, image_inputs: dict[str, Any]) -> list[torch.Tensor]:
        rows = super().assemble(state, image_inputs)
        if not self.features_keep_cls:
            return rows
        return [torch.cat([state.cls[i, None].to(row.dtype), row]) for i, row in enumerate(rows)]

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool
                      ) -> VisionOutput:
        self._refuse_partial_grid()
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        hidden = tuple(out.hidden_states)
        # Several feature layers: concatenated along the width, class token included (the class token handed on
        # is then the concatenation too, so that the projector takes it like any feature row).
        x = torch.cat([hidden[i] for i in self.feature_layers], -1)
        P = 1 if self.has_cls else 0
        grid = self._grid(pixel_values)
        return VisionOutput(list(x[:, P:]), [grid] * x.shape[0], x[:, 0] if P else None,
                            hidden if keep_hidden else None)

    def downsampling(self, processor: Any, tokens: int) -> tuple[dict[str, Any], Any, tuple[int, int]]:
        """A square image of ``side = round(sqrt(tokens))`` patches: the processor resizes (shortest edge) and
        crops to ``side * patch`` pixels, and counts its placeholders from that size; the CLIP tower
        interpolates its position embeddings to the smaller grid (``interpolate_pos_encoding``, set on every
        call of the tower inside the context).  At full size this is exactly the model's own input."""
        import inspect
        from contextlib import contextmanager

        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None or not hasattr(image_processor, "crop_size"):
            raise ModelError(
                f"llava: downsampling needs a CLIP-style image processor (size / crop_size), got "
                f"{type(image_processor).__name__}"
            )
        if "interpolate_pos_encoding" not in inspect.signature(self.vision_tower.forward).parameters:
            raise ModelError(f"llava: the vision tower {type(self.vision_tower).__name__} cannot interpolate its "
                             "position embeddings (no interpolate_pos_encoding), so it cannot take a smaller image")
        cfg = self.model.config.vision_config
        patch, full = int(cfg.patch_size), int(cfg.image_size) // int(cfg.patch_size)
        side = min(max(round(tokens ** 0.5), 1), full)
        pixels = side * patch
        kwargs = {"size": {"shortest_edge": pixels}, "crop_size": {"height": pixels, "width": pixels}}

        @contextmanager
        def interpolating():
            def pre_hook(module, args, kwargs):
                return args, {**kwargs, "interpolate_pos_encoding": True}

            handle = self.vision_tower.register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

        return kwargs, interpolating(), (side, side)

    def vision_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        block = self._encoder.layers[layer]
        attn = block.self_attn
        h = block.layer_norm1(hidden)
        B, N, _ = h.shape
        q = attn.q_proj(h).view(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h).view(B, N, attn.num_heads, -1).transpose(1, 2)
        return q, k, float(attn.scale)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    # ------------------------------------------------------------- prompt
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # ---------------------------------------------------------------- LLM
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model
