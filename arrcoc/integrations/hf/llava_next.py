"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes views, unpadding, newline tokens.

Each image is a base view plus ``rows x cols`` crops (``image_sizes`` and
``image_grid_pinpoints`` decide the grid), each a full CLIP view of
``S x S`` patches.  arrcoc compresses **per view, before packing**: the
pipeline's state holds one row per view (``[base, crop_1, ..., crop_K]`` per
image, crops in raster order; ``meta["views"]`` gives each image's crop grid,
which HiRED's budget split reads), so every compressor runs unchanged.

Packing (:meth:`LlavaNextAdapter.assemble`) then does what the model's own
``pack_image_features`` does, with the kept tokens only: the base view's
tokens first, then the crops stitched into one ``(rows S) x (cols S)`` grid,
unpadded to the image's aspect ratio (tokens in the padded border are
dropped, as the model drops them), row by row in raster order with one
``image_newline`` after every row that keeps a token.  A merged token sits at
the cell nearest its size-weighted centroid.  With nothing dropped this is
exactly the model's packing (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from arrcoc.errors import InputError, MissingImageInputError, ModelError
from arrcoc.state import TokenState

from .adapter import VisionOutput, register_adapter
from .llava import LlavaAdapter


def _unpadded_window(rows: int, cols: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the stitched grid the model keeps (``unpad_image``'s arithmetic)."""
    height, width = int(image_size[0]), int(image_size[1])
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        pad = (rows - new_height) // 2
        return pad, rows - pad, 0, cols
    new_width = int(round(width * (rows / height), 7))
    pad = (cols - new_width) // 2
    return 0, rows, pad, cols - pad


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    image_input_names = ("image_sizes",)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self._refuse_partial_grid()  # transformers' own packing fails there too: said before any work
        if self.features_keep_cls:
            # transformers' pack_image_features views each crop as side x side rows: a class token row more
            # breaks it (a RuntimeError inside the model); said here, before any work.
            raise ModelError(
                f"{self.family}: vision_feature_select_strategy 'full' keeps the class token of "
                f"{type(self.vision_tower).__name__} in every view, which the model's own packing of the crops "
                "cannot reshape to its patch grid; use 'default' with a tower that has a class token"
            )

    @property
    def side(self) -> int:
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def crop_grid(self, image_size: Any) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        size = image_size.tolist() if isinstance(image_size, torch.Tensor) else list(image_size)
        return tuple(get_anyres_image_grid_shape(size, self.model.config.image_grid_pinpoints,
                                                 self.model.config.vision_config.image_size))

    def _sizes(self, image_inputs: dict[str, Any]) -> torch.Tensor:
        sizes = image_inputs.get("image_sizes")
        if sizes is None:
            raise MissingImageInputError(
                f"{self.family}: pixel_values come with image_sizes (build inputs with the processor)")
        return torch.as_tensor(sizes)

    def tokens_per_image(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[int]:
        out = []
        S = self.side
        for size in self._sizes(image_inputs):
            rows, cols = self.crop_grid(size)
            top, bottom, left, right = _unpadded_window(rows * S, cols * S, size.tolist())
            out.append(S * S + (bottom - top) * (right - left + 1))
        return out

    def budget_context(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        # LLaVA-1.5's answer (one patch grid per image) would be wrong here: say so rather than inherit it.
        raise ModelError(
            f"{self.family}: an image is a base view plus rows x cols crops, unpadded, with newline tokens, not one "
            "feature grid, so the budget rules (one grid per image) have no context for it"
        )

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool
                      ) -> VisionOutput:
        sizes = self._sizes(image_inputs)
        grids = [self.crop_grid(s) for s in sizes]
        if pixel_values.dim() != 5:
            raise InputError(f"{self.family}: expected pixel_values [images, views, 3, H, W], got "
                             f"{list(pixel_values.shape)}")
        views = torch.cat([pixel_values[i, : 1 + r * c] for i, (r, c) in enumerate(grids)])
        out = super().encode_images(views, {}, keep_hidden)
        return out

    def view_layout(self, image_inputs: dict[str, Any]) -> list[tuple[int, int]]:
        """Each image's crop grid ``(rows, cols)``; its views are ``1 + rows * cols`` consecutive state rows."""
        return [self.crop_grid(s) for s in self._sizes(image_inputs)]

    def assemble(self, state: TokenState, image_inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image: kept base tokens, then kept crop tokens on the unpadded stitched grid with newlines."""
        sizes = self._sizes(image_inputs)
        newline = self.model.model.image_newline
        S = self.side
        out, row = [], 0
        for size, (rows, cols) in zip(sizes.tolist(), self.view_layout(image_inputs)):
            n_base = int(state.counts[row])
            parts = [state.tokens[row, :n_base]]
            top, bottom, left, right = _unpadded_window(rows * S, cols * S, size)
            tokens, ys, xs = [], [], []
            for k in range(rows * cols):  # one view at a time (a handful per image)
                v = row + 1 + k
                n = int(state.counts[v])
                cell = torch.floor(state.positions[v, :n] + 0.5).long().clamp(0, S - 1)
                ys.append(cell[:, 0] + (k // cols) * S)
                xs.append(cell[:, 1] + (k % cols) * S)
                tokens.append(state.tokens[v, :n])
            y, x, t = torch.cat(ys), torch.cat(xs), torch.cat(tokens)
            inside = (y >= top) & (y < bottom) & (x >= left) & (x < right)
            y, x, t = y[inside], x[inside], t[inside]
            order = torch.argsort(y * (cols * S + 1) + x, stable=True)
            y, t = y[order], t[order]
            if t.shape[0]:
                # One newline after the last kept token of every row that keeps one.
                last_of_row = torch.ones_like(y, dtype=torch.bool)
                last_of_row[:-1] = y[1:] != y[:-1]
                slots = torch.arange(t.shape[0], device=t.device) + torch.cumsum(last_of_row.long(), 0) - last_of_row.long()
                packed = newline.to(t.dtype).expand(t.shape[0] + int(last_of_row.sum()), -1).clone()
                packed[slots] = t
                parts.append(packed)
            out.append(torch.cat(parts))
            row += 1 + rows * cols
        if row != state.B:
            raise ModelError(f"{self.family}: the state holds {state.B} views, the images need {row}")
        return out
