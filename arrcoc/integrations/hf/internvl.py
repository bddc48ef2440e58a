"""InternVL3 (``InternVLForConditionalGeneration``, the HF-format checkpoints): InternViT tiles, pixel shuffle, Qwen2.

Dynamic tiling.  The processor cuts an image into up to ``max_patches`` tiles
of ``image_size`` pixels (448 for the released checkpoints) plus, when it cut
more than one, a thumbnail of the whole image **after** the tiles; it stacks
every tile of every image into one ``pixel_values [tiles, 3, S, S]`` in the
order of the prompts' images, writes ``<img>``, ``image_seq_length``
placeholders per tile, ``</img>`` for each image, and hands the model no tile
count (``num_patches`` is popped).  The model runs each tile through the
tower alone and scatters the features into the placeholders in order.  arrcoc
does the same: **one state row per tile** (thumbnail included), each on its
own ``g x g`` token grid, and each tile a separate "image" of
``tokens_per_image`` to the shared core; a tile's kept placeholders stay a
contiguous run inside its image's ``<img> ... </img>``.  Budgets, ``keep``
ratios and counts apply per tile, as LLaVA-NeXT's apply per view.

Pixel shuffle.  The tower (InternViT: a class token, absolute positions,
layer scale) gives ``p x p`` patches per tile (32 x 32 at 448 / 14); the
class row is dropped (``vision_feature_select_strategy="default"``) and
``pixel_shuffle(downsample_ratio=0.5)`` folds each 2 x 2 block of patches
into ONE token of four times the width, ``[top-left, top-right, bottom-left,
bottom-right]`` concatenated (``g = p / 2``: 16 x 16 = 256 tokens), before
the projector (LayerNorm, MLP).  The state's tokens are these shuffled
features, in the vision space (:attr:`feature_width` = 4 x the tower's
width); :meth:`project` is the model's projector.  A token's position is its
cell on the shuffled grid; ``pool`` / ``tome`` merge shuffled tokens by the
size-weighted mean of their concatenated features, which the projector then
maps as the model maps any token.

What does not survive the shuffle.  The tower's class-token attention and
its keys are per PATCH (``1 + p^2`` rows), while the LLM receives one token
per 2 x 2 block, and the class token itself (width ``D``) is not a token of
the shuffled space (width ``4 D``).  With
:meth:`~.adapter.Adapter.signal_per_token` arrcoc offers a documented **substitute**: ``cls_attn`` (and
``cls_attn@<i>``) and ``keys`` of a token are the **mean over its four
patches** of the per-patch values, computed from the InternViT block's own
``layernorm_before``, ``q_proj`` / ``k_proj`` and query / key norms (the CLS
row of the softmax over the tile's ``1 + p^2`` rows, then the mean of a
token's patches: the attention share of the block it folds, divided by 4);
the class token is not handed on (``state.cls`` is None; the stages keep no
class token apart).

Attention received: the attention each
token **receives** (:attr:`InternVLAdapter.attention_received_layer`,
per_token ``attn_received``; VisPruner's rule for towers without a usable
class token, as for the Qwen towers): in the block producing the feature layer,
every query's softmax row over the tile's ``1 + p^2`` rows (the class row
among them, as the block attends), averaged over the queries, then the heads,
then over the four patches the shuffle folds into the token.  ``vispruner``
(``signal: received, attention_map: null``) and ``scope`` (``score:
attn_received``) read it.

Decoder: Qwen2, 1-D rotary positions (``cumsum(mask) - 1``, as ``generate``
numbers them): a prompt shortened before the LLM is an ordinary shorter
prompt; inside the LLM ``original`` and ``compact`` positions both work.
"""

from __future__ import annotations

from typing import Any

import torch

from arrcoc.errors import InputError, ModelError

from .adapter import RECEIVED_CHUNK_ELEMENTS, Adapter, VisionOutput, register_adapter


@register_adapter
class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    config_only_inputs = ("vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "default":
            # 'full' keeps the class row: 1 + p^2 rows do not fold into a square grid, and the model's own
            # get_image_features fails on it too (reshape); said here, before any work.
            raise ModelError(
                f"{self.family}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} keeps the "
                "InternViT class token among the patches, which the pixel shuffle cannot fold into its 2 x 2 grid "
                "(the model's own get_image_features fails on it); use 'default' (what the checkpoints use)"
            )
        if isinstance(config.vision_feature_layer, (list, tuple)):
            raise ModelError(f"{self.family}: vision_feature_layer must be one layer (the model indexes the tower's "
                             f"hidden states with it), got {config.vision_feature_layer}")
        factor = 1 / float(config.downsample_ratio)
        if factor != int(factor) or self.patches_per_side % int(factor):
            raise ModelError(
                f"{self.family}: downsample_ratio {config.downsample_ratio} must fold the {self.patches_per_side} x "
                f"{self.patches_per_side} patches of a tile into whole blocks (1 / ratio an integer dividing it)")

    # ------------------------------------------------------------- vision
    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def num_vision_layers(self) -> int:
        return len(self.vision_tower.encoder.layer)

    @property
    def has_cls(self) -> bool:
        # InternViT has a class token: the tower wrapper asks for its signals, which come per token
        # (signal_per_token: the mean over a token's patches).
        return True

    @property
    def _fold(self) -> int:
        """Patches per side of one shuffled token (2 at downsample_ratio 0.5)."""
        return int(round(1 / float(self.model.config.downsample_ratio)))

    @property
    def patches_per_side(self) -> int:
        vc = self.model.config.vision_config
        size = vc.image_size if isinstance(vc.image_size, (list, tuple)) else (vc.image_size, vc.image_size)
        patch = vc.patch_size if isinstance(vc.patch_size, (list, tuple)) else (vc.patch_size, vc.patch_size)
        if size[0] != size[1] or patch[0] != patch[1]:
            raise ModelError(f"{self.family}: square tiles and patches expected (the model folds each tile's "
                             f"patches into a square), got image_size {size}, patch_size {patch}")
        return int(size[0]) // int(patch[0])

    @property
    def grid_side(self) -> int:
        """Tokens per side of one tile after the pixel shuffle (16 for 448 px tiles)."""
        return self.patches_per_side // self._fold

    @property
    def feature_width(self) -> int:
        """A shuffled token concatenates ``fold^2`` patches of the tower's width."""
        return int(self.model.config.vision_config.hidden_size) * self._fold ** 2

    @property
    def default_attention_layer(self) -> int:
        """The block producing the feature layer (its CLS attention and keys; the last block for ``-1``; block 0,
        the nearest, for features read from the embeddings)."""
        block = self.attention_received_layer
        return 0 if block is None else block

    def vision_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-head ``(q, k, scale)`` of InternViT block ``layer`` on its input ``hidden`` (its own
        ``layernorm_before``, projections and query / key norms, as the block's attention computes them)."""
        block = self.vision_tower.encoder.layer[layer]
        attn = block.attention
        h = block.layernorm_before(hidden)
        B, N, _ = h.shape
        heads = int(attn.num_heads)
        q = attn.q_norm(attn.q_proj(h)).reshape(B, N, heads, -1).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h)).reshape(B, N, heads, -1).transpose(1, 2)
        return q, k, float(attn.scale)

    def signal_per_token(self, values: torch.Tensor) -> torch.Tensor:
        """``[tiles, p^2, ...]`` per patch -> ``[tiles, g^2, ...]``: the mean over the fold x fold block of patches
        each shuffled token concatenates (rows fold r.., columns fold c..: the model's pixel_shuffle)."""
        tiles, side, fold = values.shape[0], self.grid_side, self._fold
        rest = values.shape[2:]
        blocks = values.reshape(tiles, side, fold, side, fold, *rest)
        return blocks.mean((2, 4)).reshape(tiles, side * side, *rest)

    def tokens_per_image(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[int]:
        # Every tile (a thumbnail too) is one "image" of grid_side^2 placeholders: the prompt gives each tile its
        # own run, and the model fills the runs in order.
        return [self.grid_side ** 2] * int(pixel_values.shape[0])

    def budget_context(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        # Per tile, from the config; no class token is handed on, so the budget rules count none.
        tokens = self.tokens_per_image(pixel_values, image_inputs)
        side = self.grid_side
        return [{**c, "has_cls": False} for c in self._budget_contexts(tokens, [(side, side)] * len(tokens))]

    @property
    def attention_received_layer(self) -> int | None:
        """The block whose output is the feature layer (``hidden_states[i]`` is block ``i - 1``'s output; ``-1``
        the last block's, through the tower's final norm); ``None`` for the embeddings (no block's attention)."""
        n = self.num_vision_layers
        layer = int(self.model.config.vision_feature_layer)
        if layer == -1:
            return n - 1
        block = layer % (n + 1) - 1
        return block if block >= 0 else None

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool,
                      received: bool = False) -> VisionOutput:
        """``pixel_values [tiles, 3, S, S]`` -> per tile the shuffled features ``[g^2, fold^2 D]`` before the
        projector, as ``InternVLModel.get_image_features`` computes them (the model's own ``pixel_shuffle``);
        ``received``: per tile the attention each token receives (see the module docstring)."""
        if pixel_values.dim() != 4:
            raise InputError(f"{self.family}: expected pixel_values [tiles, 3, H, W] (every tile of every image, "
                             f"as the processor stacks them), got {list(pixel_values.shape)}")
        inner = self.model.model
        layer = self.model.config.vision_feature_layer
        seen: dict[str, torch.Tensor] = {}
        handle = None
        if received:
            block = self.attention_received_layer
            if block is None:
                raise ModelError(f"{self.family}: vision_feature_layer {layer} is the tower's embeddings, which no "
                                 "block's attention produced, so no token has an attention received")

            def grab(module: torch.nn.Module, args: tuple) -> None:
                seen["hidden"] = args[0]

            handle = self.vision_tower.encoder.layer[block].register_forward_pre_hook(grab)
        try:
            out = self.vision_tower(pixel_values=pixel_values.to(dtype=inner.dtype), return_dict=True,
                                    output_hidden_states=keep_hidden or layer != -1)
        finally:
            if handle is not None:
                handle.remove()
        x = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        x = x[:, 1:, :]  # the class row ('default')
        tiles, p = x.shape[0], self.patches_per_side
        if x.shape[1] != p * p:
            raise InputError(f"{self.family}: a tile gives {x.shape[1]} patches, the config {p} x {p}; give tiles of "
                             "the config's image_size")
        shuffled = inner.pixel_shuffle(x.reshape(tiles, p, p, -1), scale_factor=self.model.config.downsample_ratio)
        shuffled = shuffled.reshape(tiles, -1, shuffled.shape[-1])
        side = self.grid_side
        per_token = None
        if received:
            if "hidden" not in seen:
                raise ModelError(f"{self.family}: vision block {self.attention_received_layer} was not called with "
                                 "its input as the first argument (another transformers layout), so its attention "
                                 "cannot be read")
            per_patch = self._received(self.attention_received_layer, seen["hidden"])[:, 1:]  # the patches' columns
            per_token = list(InternVLAdapter.signal_per_token(self, per_patch))  # the mean of a token's patches
        # hidden_states[i] is the input of block i (the embeddings first), as the tower wrapper reads them.
        hidden = tuple(out.hidden_states) if keep_hidden else None
        return VisionOutput(list(shuffled), [(side, side)] * tiles, None, hidden, per_token)

    def _received(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        """``[tiles, 1 + p^2]``: the attention each row of InternViT block ``block``'s input ``hidden`` receives,
        every query's softmax row (over the tile's rows, as the block attends: no mask) averaged over the queries,
        then over the heads (:meth:`vision_qk`); float32 (or the input's dtype if wider), tiles taken in chunks of at
        most :data:`~.adapter.RECEIVED_CHUNK_ELEMENTS` logits."""
        q, k, scale = self.vision_qk(block, hidden)
        tiles, heads, N, _ = q.shape
        dtype = torch.promote_types(q.dtype, torch.float32)
        chunk = max(1, RECEIVED_CHUNK_ELEMENTS // max(1, heads * N * N))
        out = []
        for start in range(0, tiles, chunk):
            qs, ks = q[start:start + chunk].to(dtype), k[start:start + chunk].to(dtype)
            probs = ((qs @ ks.transpose(-1, -2)) * scale).softmax(-1)  # [chunk, heads, N, N]
            out.append(probs.mean(2).mean(1))  # query mean, then head mean
        return torch.cat(out)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def feature_kwargs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        # InternVL's forward reads pooler_output as one tensor (``.to``) and scatters its rows into the
        # placeholders in order: every tile's kept rows, concatenated, as one [1, total, D] tensor.
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])}}

    # ------------------------------------------------------------- prompt
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # ---------------------------------------------------------------- LLM
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model
