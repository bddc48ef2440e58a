"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): AnyRes-max views, unpadding, bilinear pooling of
large grids, newline tokens; SigLIP tower (no class token), Qwen2 decoder.  Single images (no video).

An image is a base view plus ``rows x cols`` crops, as in LLaVA-NeXT, and
arrcoc compresses **per view, before packing**, with LLaVA-NeXT's state (one
row per view, ``meta["views"]``) and its encoding (:class:`LlavaNextAdapter`).
What the model's ``pack_image_features`` adds to LLaVA-NeXT's packing is the
``anyres_max_N`` rule (``config.vision_aspect_ratio``): when the unpadded
stitched crop grid of ``h x w`` cells exceeds ``N`` views (``ratio =
sqrt(h w / (N S^2)) > 1.1``), it is resized bilinearly (``align_corners=False``,
no antialias) to ``(int(h // ratio), int(w // ratio))`` after the projector,
before the newline tokens.

Packing (:meth:`LlavaOnevisionAdapter.assemble`) does that with the kept
tokens only:

* an image whose grid is not pooled is packed exactly as LLaVA-NeXT packs it
  (the same code);
* a pooled grid is resized by **normalised convolution** (Knutsson & Westin
  1993, interpolation from incomplete samples): each pooled cell is the
  model's bilinear blend of its (up to 4) source cells, renormalised over the
  sources that were kept, ``sum w_s m_s x_s / sum w_s m_s``; a cell whose
  sources were all kept is bit for bit the model's value.  A pooled cell
  reaches the LLM when the source cell nearest to its sampling point (the one
  ``nearest-exact`` resizing would take, ``floor((i + 1/2) in / out)``) was
  kept, so the pooled grid keeps about the fraction of cells the stages kept;
  a kept token elsewhere still flows into its neighbours' values.  Merged
  tokens sit at the cell nearest their centroid (tokens meeting in one cell
  are merged: their size-weighted mean).  One newline after every pooled
  row that keeps a cell.

With nothing dropped this is exactly the model's packing (tested against
``model.model.pack_image_features``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from arrcoc.errors import InputError, ModelError
from arrcoc.state import TokenState

from .adapter import VisionOutput, register_adapter
from .llava_next import LlavaNextAdapter, _unpadded_window


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    # pixel_values_videos is taken in (and so kept from the model) only to be refused by name before the LLM:
    # the model refuses videos beside the image features arrcoc hands it, with a message that names no reason.
    image_input_names = ("image_sizes", "batch_num_images", "pixel_values_videos")

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        _max_views(model.config)  # a vision_aspect_ratio the model's packing cannot read: said before any work

    @property
    def max_views(self) -> int:
        """``N`` of ``vision_aspect_ratio = "anyres_max_N"``: the crop grid the model keeps unpooled, in views."""
        return _max_views(self.model.config)

    def pooled_grid(self, size: list[int], rows: int, cols: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        """``((top, bottom, left, right), (out_rows, out_cols))``: the unpadded window of an image's stitched crop
        grid and the grid the model resizes it to (the window's own size when it is not pooled)."""
        S = self.side
        window = _unpadded_window(rows * S, cols * S, size)
        top, bottom, left, right = window
        height, width = bottom - top, right - left
        ratio = math.sqrt(height * width / (self.max_views * S ** 2))  # the model's arithmetic
        if ratio > 1.1:
            return window, (int(height // ratio), int(width // ratio))
        return window, (height, width)

    def _single_images(self, image_inputs: dict[str, Any]) -> None:
        if image_inputs.get("pixel_values_videos") is not None:
            raise InputError(
                "llava_onevision: this call gives pixel_values_videos beside pixel_values; arrcoc's pre-LLM stages "
                "compress images only (videos are not supported yet): call without the video, or use llm: stages only"
            )
        counts = image_inputs.get("batch_num_images")
        if counts is not None and any(int(n) != 1 for n in torch.as_tensor(counts).reshape(-1).tolist()):
            raise InputError(
                f"llava_onevision: batch_num_images={torch.as_tensor(counts).tolist()}: prompts with several images "
                "(each encoded as one base view and a newline, without crops) are not supported by arrcoc's pre-LLM "
                "stages (single images only); give one image per prompt, or use llm: stages only"
            )

    def tokens_per_image(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[int]:
        counts = image_inputs.get("batch_num_images")
        if counts is None:
            patched = [True] * len(self._sizes(image_inputs))
        else:  # the model's need_patching: an image of a prompt with several is one base view and a newline
            patched = [int(n) == 1 for n in torch.as_tensor(counts).reshape(-1).tolist() for _ in range(int(n))]
        out = []
        for size, crops in zip(self._sizes(image_inputs), patched):
            if not crops:
                out.append(self.side ** 2 + 1)
                continue
            rows, cols = self.crop_grid(size)
            _, (height, width) = self.pooled_grid(size.tolist(), rows, cols)
            out.append(self.side ** 2 + height * (width + 1))
        return out

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool
                      ) -> VisionOutput:
        self._single_images(image_inputs)
        return super().encode_images(pixel_values, image_inputs, keep_hidden)

    def assemble(self, state: TokenState, image_inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image: LLaVA-NeXT's packing of the kept tokens; a pooled grid resized from the kept tokens (module
        docstring)."""
        out = super().assemble(state, image_inputs)
        newline = self.model.model.image_newline
        row = 0
        for i, (size, (rows, cols)) in enumerate(zip(self._sizes(image_inputs).tolist(),
                                                      self.view_layout(image_inputs))):
            window, pooled = self.pooled_grid(size, rows, cols)
            if pooled != (window[1] - window[0], window[3] - window[2]):
                n_base = int(state.counts[row])
                grid = self._pool_kept(state, row + 1, rows, cols, window, pooled)
                out[i] = torch.cat([state.tokens[row, :n_base], _with_newlines(grid, newline)])
            row += 1 + rows * cols
        return out

    def _pool_kept(self, state: TokenState, first: int, rows: int, cols: int, window: tuple[int, int, int, int],
                   pooled: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [out_rows, out_cols, D], kept [out_rows, out_cols])`` of one image's pooled crop grid."""
        S = self.side
        H, W = rows * S, cols * S
        V = rows * cols
        real = state.mask[first:first + V]  # [V, N]
        cell = torch.floor(state.positions[first:first + V] + 0.5).long().clamp(0, S - 1)  # [V, N, 2]
        view = torch.arange(V, device=cell.device)[:, None]
        y, x = cell[..., 0] + (view // cols) * S, cell[..., 1] + (view % cols) * S
        index = torch.where(real, y * W + x, H * W).reshape(-1)  # padding slots go to a sink cell, cut below
        tokens = state.tokens[first:first + V].reshape(V * real.shape[1], -1)
        D = tokens.shape[-1]
        # Tokens meeting in one cell are merged as arrcoc.ops.merge merges (size-weighted mean); a cell of one
        # token keeps it exactly (a token of size 1 everywhere when nothing was merged: x * 1 / 1).
        size = (state.size[first:first + V] * real).reshape(-1).to(tokens.dtype)
        total = tokens.new_zeros(H * W + 1, D).index_add_(0, index, tokens * size[:, None])[:-1]
        hits = tokens.new_zeros(H * W + 1).index_add_(0, index, size)[:-1]
        dense = total / torch.where(hits > 0, hits, torch.ones_like(hits))[:, None]
        kept = (hits > 0).to(tokens.dtype)
        top, bottom, left, right = window
        # [D, H, W] then the window, as the model lays the stitched grid out before unpad_image and interpolate.
        grid = dense.view(H, W, D).permute(2, 0, 1).contiguous()[:, top:bottom, left:right]
        mask = kept.view(H, W)[top:bottom, left:right]

        def resize(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(x[None], list(pooled), mode="bilinear")[0]

        blend = resize(grid * mask)  # sum over sources w_s m_s x_s: the model's value where every source was kept
        weight = resize(mask[None])[0]  # sum w_s m_s
        missing = resize((1 - mask)[None])[0] > 0  # a source of nonzero weight was dropped
        values = torch.where(missing[None], blend / weight.clamp(min=torch.finfo(weight.dtype).tiny), blend)
        # The source cell nearest each pooled cell's sampling point decides whether the cell reaches the LLM.
        (h, w), (oh, ow) = mask.shape, pooled
        # floor((i + 1/2) in / out) in integers (no float rounding at a tie).
        def nearest(n_in: int, n_out: int) -> torch.Tensor:
            odd = 2 * torch.arange(n_out, device=mask.device) + 1
            return (odd * n_in).div(2 * n_out, rounding_mode="floor").clamp(max=n_in - 1)

        near_r, near_c = nearest(h, oh), nearest(w, ow)
        return values.permute(1, 2, 0), mask[near_r][:, near_c] > 0


def _max_views(config: Any) -> int:
    aspect = str(config.vision_aspect_ratio)
    try:  # the model's own parsing (pack_image_features: int(aspect.strip("anyres_max_")))
        views = int(aspect.strip("anyres_max_"))
    except ValueError:
        views = 0
    if views < 1 or not aspect.startswith("anyres_max_"):
        raise ModelError(f"llava_onevision: vision_aspect_ratio must be 'anyres_max_N' with N >= 1 (the model packs "
                         f"its crop grids by it), got {aspect!r}")
    return views


def _with_newlines(grid: tuple[torch.Tensor, torch.Tensor], newline: torch.Tensor) -> torch.Tensor:
    """The kept cells of a pooled grid in raster order, one ``newline`` after every row that keeps a cell."""
    values, kept = grid
    rows, cols, D = values.shape
    column = newline.to(values.dtype).expand(rows, 1, D)
    with_column = torch.cat([values, column], 1).reshape(rows * (cols + 1), D)
    return with_column[torch.cat([kept, kept.any(1, keepdim=True)], 1).reshape(-1)]
