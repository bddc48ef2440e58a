"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Visual tokens are the ``PatchMerger``'s 2x2-merged patches, already in the
LLM's space (the merger is the projector), on each image's own
``(h / 2, w / 2)`` grid: images of different sizes make a ragged batch.
Qwen2.5-VL's window attention is undone before ``pooler_output``, so the
tokens are in raster order for both.

Positions are multimodal (``[3, B, L]`` rotary ids, ``get_rope_index``).
A prompt shortened before the LLM keeps each kept token's ORIGINAL
positions: computed from the unshortened prompt, gathered per sample,
left-padded, with the text row ``cumsum(mask) - 1`` prepended (the
``[4, B, L']`` layout ``generate`` extends by ``last + 1`` per step; padding
at 0, as ``generate`` numbers it).  As the positions are given, the model's
own set-up of ``rope_deltas`` is skipped: the adapter sets them, counting the
dropped tokens, so a conversation continued from ``past_key_values`` numbers
its new text after the kept ones.
Inside the LLM the engine gathers ``(cos, sin)`` (``[B, L, head_dim]``)
with the kept index.  A compact renumbering is undefined for 3-D
positions and refused.  The tower has no class token: methods that need
CLS attention are refused (no replacement signal is offered).
"""

from __future__ import annotations

from typing import Any

import torch

from arrcoc.errors import InputError

from .adapter import Adapter, VisionOutput, register_adapter


def grid_budget_context(config: Any, grid: tuple[int, int]) -> dict[str, Any]:
    """The budget context (:meth:`Adapter.budget_context`) of one image whose merged grid is ``grid``, from the
    model's config alone: one token per merged cell, no class token, the decoder's depth, and every tower block
    (the attention signals are read after the last one)."""
    return {"original": int(grid[0]) * int(grid[1]), "grid": (int(grid[0]), int(grid[1])),
            "layers": int(config.text_config.num_hidden_layers), "has_cls": False,
            "encoder_layers": int(config.vision_config.depth)}


@register_adapter
class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    image_input_names = ("image_grid_thw",)
    projected = True
    multimodal_rope = True

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def num_vision_layers(self) -> int:
        return len(self.visual.blocks)

    def _grid_thw(self, image_inputs: dict[str, Any]) -> torch.Tensor:
        grid = image_inputs.get("image_grid_thw")
        if grid is None:
            raise InputError(f"{self.family}: pixel_values come with image_grid_thw (build inputs with the processor)")
        return torch.as_tensor(grid)

    def tokens_per_image(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[int]:
        merge = int(self.visual.spatial_merge_size)
        return (self._grid_thw(image_inputs).prod(-1) // merge**2).tolist()

    def budget_context(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        # The merged grid of each image, as encode_images gives it (frames stacked along the rows).
        merge = int(self.visual.spatial_merge_size)
        return [grid_budget_context(self.model.config, (t * h // merge, w // merge))
                for t, h, w in self._grid_thw(image_inputs).tolist()]

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool
                      ) -> VisionOutput:
        grid_thw = self._grid_thw(image_inputs).to(pixel_values.device)
        out = self.model.model.get_image_features(pixel_values, grid_thw)
        merge = int(self.visual.spatial_merge_size)
        grids = [(int(t) * int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
        return VisionOutput(list(out.pooler_output), grids, None, None)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def shortened_kwargs(self, kwargs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        mm = kwargs.get("mm_token_type_ids")
        if mm is None or mm.shape != ids.shape:
            # Absent, or the first turn's when a conversation goes on from past_key_values: the model reads the
            # new prompt's image tokens from the ids too.
            mm = (ids == self.image_token_id).int()
        rope_kwargs = {k: kwargs[k] for k in ("video_grid_thw", "second_per_grid_ts") if kwargs.get(k) is not None}
        positions, deltas = self.model.model.get_rope_index(
            ids, mm, image_grid_thw=self._grid_thw(kwargs), attention_mask=mask, **rope_kwargs)
        positions = positions.gather(2, index[None].expand(positions.shape[0], -1, -1))
        # The numbering generate gives the unshortened prompt: padding (the caller's, kept in place, and the
        # columns added in front of shorter rows) at 0, text row cumsum(mask) - 1 over the real columns.
        real = valid if mask is None else mask.gather(1, index).bool() & valid
        # What the model's own position set-up leaves for later calls (skipped, as the positions are given): a
        # conversation continued from past_key_values numbers its new text as text position + rope_deltas, over
        # the SHORT prompt in the cache, so the tokens dropped count into the offset.
        dropped = (torch.ones_like(ids) if mask is None else mask).sum(1, keepdim=True) - real.sum(1, keepdim=True)
        self.model.model.rope_deltas = deltas + dropped.to(deltas.device)
        positions = positions.masked_fill(~real[None], 0)
        text = (real.long().cumsum(1) - 1).masked_fill(~real, 0)
        return {"position_ids": torch.cat([text[None], positions], 0),
                "mm_token_type_ids": mm.gather(1, index).masked_fill(~valid, 0)}

    @property
    def position_state(self) -> Any:
        return self.model.model.rope_deltas

    @position_state.setter
    def position_state(self, value: Any) -> None:
        self.model.model.rope_deltas = value

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model
