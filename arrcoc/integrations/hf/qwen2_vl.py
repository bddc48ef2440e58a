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
positions and refused.

The tower has no class token: methods that need CLS attention are refused.
What it gives instead is the attention each token *receives* (VisPruner's
official rule for towers without one, ``siglip_encoder.py``:
``attentions[-1].mean(dim=-2)`` then the head mean), per image: the softmax
of every query row within the image (``cu_seqlens``: the tower attends within
each image, and each frame), averaged over the image's queries and the heads,
for every patch; a merged token (the ``PatchMerger``'s 2x2 patches,
consecutive rows of the tower's sequence) takes the mean of its 4 patches
(arrcoc's choice; no official code for this tower).  The block read is the
LAST one whose attention spans each whole image: Qwen2-VL's last block;
Qwen2.5-VL's last of ``fullatt_block_indexes`` (every released checkpoint lists
its last block, ``[7, 15, 23, 31]`` of 32, so this is the official last
layer; a windowed block would give each token the attention of its window
only, a different signal, so a config whose last block is windowed reads its
last full one instead, and one with none gives no signal).  Its input is
taken, with the block's own ``cu_seqlens`` and rotary embedding, by a pre-hook
during the model's own tower forward (one forward, no eager attention), and
the scores are recomputed from the block's ``norm1`` / ``qkv`` / rotary;
Qwen2.5-VL's window order is undone as the model undoes it
(``argsort(window_index)`` over the merged tokens).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from arrcoc.errors import InputError, ModelError

from .adapter import Adapter, VisionOutput, received_sums, register_adapter


def grid_budget_context(config: Any, grid: tuple[int, int]) -> dict[str, Any]:
    """The budget context (:meth:`Adapter.budget_context`) of one image whose merged grid is ``grid``, from the
    model's config alone: one token per merged cell, no class token, the decoder's depth, and every tower block
    (the attention signals are read after the last one)."""
    return {"original": int(grid[0]) * int(grid[1]), "grid": (int(grid[0]), int(grid[1])),
            "layers": int(config.text_config.num_hidden_layers), "has_cls": False,
            "encoder_layers": int(config.vision_config.depth)}




def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _vision_rope(block: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's own rotary step (``apply_rotary_pos_emb_vision`` of the block's modeling file, which
    rounds through float32); the same arithmetic written out where a version has none."""
    rope = getattr(sys.modules.get(type(block.attn).__module__), "apply_rotary_pos_emb_vision", None)
    if rope is not None:
        return rope(q, k, cos, sin)
    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((q.float() * c + _rotate_half(q.float()) * s).to(q.dtype),
            (k.float() * c + _rotate_half(k.float()) * s).to(k.dtype))


def attention_received(block: torch.nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[S]``: the attention each row of a Qwen vision block's packed input ``hidden`` ``[S, D]`` receives
    from the rows of its own segment (``cu_seqlens``: an image, or a frame), averaged over those queries, then
    over the heads.

    Recomputed from the block's ``norm1``, ``qkv`` and rotary embedding (as the block's attention computes its
    scores); the segments are padded to one batch ``[segments, heads, L, L]`` (padded keys at -inf, padded
    queries not counted) and the queries taken in chunks of at most :data:`~.adapter.RECEIVED_CHUNK_ELEMENTS` logits.
    Float32, or the hidden states' dtype if wider.
    """
    attn = block.attn
    S = hidden.shape[0]
    h = block.norm1(hidden)
    heads = int(attn.num_heads)
    q, k, _ = attn.qkv(h).reshape(S, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, heads, hd]
    q, k = _vision_rope(block, q, k, *position_embeddings)
    dtype = torch.promote_types(q.dtype, torch.float32)
    device = hidden.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    L = int(lengths.max()) if lengths.numel() else 0  # the one host read: the padded length
    pos = torch.arange(L, device=device)
    real = pos[None] < lengths[:, None]  # [segments, L]
    index = (cu_seqlens[:-1].to(device)[:, None] + pos).clamp(max=max(S - 1, 0))
    qs = q[index].to(dtype).transpose(1, 2)  # [segments, heads, L, hd]
    ks = k[index].to(dtype).transpose(1, 2)
    key_bias = torch.zeros(real.shape, dtype=dtype, device=device).masked_fill(~real, float("-inf"))[:, None, None]
    received = received_sums(qs, ks, attn.scaling, key_bias, real)  # [segments, heads, L] summed over queries
    received = (received / lengths[:, None, None].to(dtype)).mean(1)  # query mean, then head mean
    return received[real]  # the segments' rows in packed order


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

    @property
    def attention_received_layer(self) -> int | None:
        """The last block whose attention spans each whole image (see the module docstring): Qwen2-VL's last,
        Qwen2.5-VL's last of ``fullatt_block_indexes``; ``None`` when every block attends in windows, and for a
        subclass that runs the tower its own way (arrcoc.vllm's: its ``encode_images`` takes no ``received``)."""
        if type(self).encode_images is not Qwen2VLAdapter.encode_images:
            return None
        n = self.num_vision_layers
        full = getattr(self.visual, "fullatt_block_indexes", None)
        if full is None:
            return n - 1
        # The model's own test is ``layer_num in fullatt_block_indexes``: a negative entry names no block.
        spanning = sorted({int(i) for i in full if 0 <= int(i) < n})
        return spanning[-1] if spanning else None

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool,
                      received: bool = False) -> VisionOutput:
        grid_thw = self._grid_thw(image_inputs).to(pixel_values.device)
        merge = int(self.visual.spatial_merge_size)
        grids = [(int(t) * int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
        if not received:
            out = self.model.model.get_image_features(pixel_values, grid_thw)
            return VisionOutput(list(out.pooler_output), grids, None, None)
        layer = self.attention_received_layer
        if layer is None:
            raise ModelError(f"{self.family}: every block of this vision tower attends within windows, so no block "
                             "gives the attention a token receives from its whole image")
        block = self.visual.blocks[layer]
        seen: dict[str, Any] = {}

        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            seen["cu_seqlens"] = kwargs.get("cu_seqlens")
            seen["position_embeddings"] = kwargs.get("position_embeddings")

        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.model.model.get_image_features(pixel_values, grid_thw)
        finally:
            handle.remove()
        if seen.get("cu_seqlens") is None or seen.get("position_embeddings") is None:
            raise ModelError(f"{self.family}: vision block {layer} was not called with cu_seqlens and "
                             "position_embeddings (another transformers layout), so its attention cannot be read")
        per_patch = attention_received(block, seen["hidden"], seen["cu_seqlens"], seen["position_embeddings"])
        # A merged token is 2 x 2 patches, consecutive rows of the tower's sequence (the merger's view(-1, 4 D)).
        per_token = per_patch.view(-1, merge * merge).mean(-1)
        window_index = self._window_index(grid_thw)
        if window_index is not None:  # Qwen2.5-VL: back from window order to raster order, as the model does
            per_token = per_token[torch.argsort(window_index.to(per_token.device))]
        counts = [f.shape[0] for f in out.pooler_output]
        return VisionOutput(list(out.pooler_output), grids, None, None, list(per_token.split(counts)))

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL's window order of the merged tokens (the model's own helper), ``None`` for Qwen2-VL."""
        visual = self.visual
        if getattr(visual, "fullatt_block_indexes", None) is None:
            return None
        if hasattr(visual, "get_window_index"):  # transformers versions with the helper on the model
            return visual.get_window_index(grid_thw)[0]
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:
            raise ModelError(f"{self.family}: this transformers version exposes no window index of the vision "
                             "tower, so the attention signal cannot be put back in raster order") from None
        return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)[0]

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
