"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower, pooling projector, Gemma 3 decoder.

Visual tokens are the projector's output: the SigLIP tower's last hidden
states (``patches x patches``, no class token) average-pooled to a fixed
``mm_tokens_per_image`` (256: a 16 x 16 grid of 4 x 4 patches at 896 px),
RMS-normed and projected (``get_image_features``).  Like Qwen's merger, the
pooling is part of the projector, so the adapter hands the pooled tokens
(``projected``): every stage runs on them, each image on the same square
grid; a pan-and-scan crop is one more image of the same size.  The tower has
no class token: methods that need CLS attention or keys are refused by the
tower's ``how_to_provide``, which names the substitutes.  What it gives
instead is the attention each token *receives* (need ``attention_received``,
per-token ``attn_received``): VisPruner's official rule for SigLIP towers, the
last block's attention averaged over the queries, then the heads
(:func:`siglip_attention_received`, recomputed from the block's input taken by
a pre-hook during the model's own tower forward), a pooled token the mean of
its patches; VisPruner reads it with ``signal: received, attention_map:
null``, SCOPE with ``score: attn_received``.

Prompt.  Each image is ``<start_of_image>``, its placeholders,
``<end_of_image>``; ``token_type_ids`` (1 on the placeholders, as the
processor returns them) make the decoder attend **bidirectionally within each
image's block** (a run of image tokens; ``get_block_sequence_ids_for_mask``)
on top of the causal mask (sliding layers: ``window AND (causal OR block)``).
A prompt shortened before the LLM carries the gathered ``token_type_ids``
(:meth:`Gemma3Adapter.shortened_kwargs`): the kept tokens of an image are
again one block; without ``token_type_ids`` the model is causal, and so is the
short prompt.  Positions are 1-D (``cumsum(mask) - 1``, as ``generate``
numbers them); the image features are not scaled, the text embeddings are
(``sqrt(hidden_size)``, inside the model's embedding: :meth:`Adapter.embed`
returns them scaled, as the queries of query-aware stages should be).

Inside the LLM two things differ from Llama-like decoders, and the adapter
tells the engine both: the layer types use different rotary bases
(``rotary_emb(x, positions, layer_type)``: :meth:`Gemma3Adapter.rotary`
returns ``{layer type: (cos, sin)}``, ``rotary_per_layer_type``), and the
image blocks (:meth:`Gemma3Adapter.attention_blocks`), which the engine keeps
in every mask it rebuilds: the kept tokens of an image stay one bidirectional
block, on sliding layers cut by the window as the model cuts it.  Positions
after in-LLM removal are the stage's rule (FastV: the original ones; compact
renumbering is defined, the positions being 1-D).

Soft-capping: ``Gemma3ForConditionalGeneration`` applies no final-logit
soft-capping (only the text-only ``Gemma3ForCausalLM`` does) and its attention
passes no ``softcap`` to the kernel, so the scores arrcoc records in the
decoder are the model's own softmax (released Gemma 3 configs set both caps to
``null``).
"""

from __future__ import annotations

from typing import Any

import torch

from arrcoc.errors import InputError, ModelError

from .adapter import Adapter, VisionOutput, received_sums, register_adapter


def block_ids(token_type_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: the image block of each column (0, 1, ... per prompt, one per run of image tokens) or -1 for
    text: Gemma 3's ``get_block_sequence_ids_for_mask`` (a block starts at an image token after a non-image)."""
    image = token_type_ids == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0), value=False)[:, :-1]
    return torch.where(image, starts.long().cumsum(1) - 1, -1)


def siglip_attention_received(block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[images, P]``: the attention each patch receives in a SigLIP encoder block on its input ``hidden``
    ``[images, P, D]``: every query's softmax row (all patches, no mask), averaged over the queries, then over the
    heads (VisPruner's rule for towers without a class token, ``attentions[-1].mean(dim=-2)`` then the head mean).

    Recomputed from the block's ``layer_norm1`` and ``q_proj`` / ``k_proj`` (the block's attention computes its
    scores so), in float32 or the hidden states' dtype if wider, the queries in chunks of at most
    :data:`~.adapter.RECEIVED_CHUNK_ELEMENTS` logits (a 896 px image has 4096 patches).
    """
    attn = block.self_attn
    images, P, _ = hidden.shape
    h = block.layer_norm1(hidden)
    dtype = torch.promote_types(h.dtype, torch.float32)
    q = attn.q_proj(h).view(images, P, attn.num_heads, -1).transpose(1, 2).to(dtype)  # [images, heads, P, hd]
    k = attn.k_proj(h).view(images, P, attn.num_heads, -1).transpose(1, 2).to(dtype)
    return (received_sums(q, k, attn.scale) / P).mean(1)


@register_adapter
class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    projected = True
    rotary_per_layer_type = True

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def num_vision_layers(self) -> int:
        return len(self._encoder_layers)

    @property
    def _side(self) -> int:
        """Tokens per side of each image's pooled grid."""
        side = round(int(self.model.config.mm_tokens_per_image) ** 0.5)
        if side * side != int(self.model.config.mm_tokens_per_image):
            raise ModelError(f"{self.family}: mm_tokens_per_image must be a square (the projector pools to a square "
                             f"grid), got {self.model.config.mm_tokens_per_image}")
        return side

    def tokens_per_image(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[int]:
        return [self._side ** 2] * int(pixel_values.shape[0])

    def budget_context(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        # Every image (a crop too) is pooled to the same square grid: the config says it, no forward needed.
        tokens = self.tokens_per_image(pixel_values, image_inputs)
        return self._budget_contexts(tokens, [(self._side, self._side)] * len(tokens))

    @property
    def _encoder_layers(self) -> Any:
        inner = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return inner.encoder.layers

    @property
    def attention_received_layer(self) -> int | None:
        """The tower's last block: SigLIP attends over the whole image in every block, and VisPruner's official
        rule for SigLIP towers reads the last one (``attentions[-1]``)."""
        return self.num_vision_layers - 1

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool,
                      received: bool = False) -> VisionOutput:
        if pixel_values.dim() != 4:
            raise InputError(f"{self.family}: expected pixel_values [images, 3, H, W], got {list(pixel_values.shape)}")
        dtype = next(self.vision_tower.parameters()).dtype
        side = self._side
        if not received:
            pooled = self.model.model.get_image_features(pixel_values.to(dtype)).pooler_output  # [images, n, D]
            return VisionOutput(list(pooled), [(side, side)] * pooled.shape[0], None, None)
        block = self._encoder_layers[self.attention_received_layer]
        seen: dict[str, torch.Tensor] = {}

        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]

        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            pooled = self.model.model.get_image_features(pixel_values.to(dtype)).pooler_output
        finally:
            handle.remove()
        per_patch = siglip_attention_received(block, seen["hidden"])  # [images, patches], raster order
        # A pooled token is the mean of its kernel x kernel patches (the projector's AvgPool2d over the raster grid):
        # it receives their mean attention (arrcoc's choice, as for Qwen's merged tokens; no official code).
        patches = round(per_patch.shape[1] ** 0.5)
        per_token = torch.nn.functional.avg_pool2d(per_patch.view(-1, 1, patches, patches), patches // side)
        return VisionOutput(list(pooled), [(side, side)] * pooled.shape[0], None, None, list(per_token.flatten(1)))

    def feature_kwargs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        # Gemma 3's forward reads pooler_output as one tensor (``.to``) and scatters its rows into the
        # placeholders in order: the images' kept rows, concatenated, as one [1, total, D] tensor.
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])}}

    # ------------------------------------------------------------- prompt
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def shortened_kwargs(self, kwargs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        """The ``token_type_ids`` of the short prompt: the original ones at the kept columns (1 on every kept
        image token, so each image's kept tokens form one block again), 0 on the padding added in front."""
        types = kwargs.get("token_type_ids")
        if types is None:
            return {}  # the model attends causally; so does the short prompt
        prompt = kwargs.get("input_ids")
        prompt = kwargs.get("inputs_embeds") if prompt is None else prompt
        if prompt is not None and tuple(types.shape) != tuple(prompt.shape[:2]):
            raise InputError(f"{self.family}: token_type_ids must have the prompt's shape {tuple(prompt.shape[:2])} "
                             f"(one per column), got {tuple(types.shape)}")
        return {"token_type_ids": types.to(index.device).gather(1, index).masked_fill(~valid, 0)}

    def attention_blocks(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Per column of the prompt the LLM gets (a forward's inputs), the bidirectional block it belongs to
        (:func:`block_ids`), -1 for causal columns; ``None`` without ``token_type_ids`` (the model is causal)."""
        types = inputs.get("token_type_ids")
        return None if types is None else block_ids(types)

    # ---------------------------------------------------------------- LLM
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer type: (cos, sin)}``: each type of layer has its own rotary base (local / global)."""
        rotary = self.language_model.rotary_emb
        return {kind: rotary(hidden, position_ids, kind) for kind in dict.fromkeys(self.text_config.layer_types)}

