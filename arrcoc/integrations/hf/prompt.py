"""Prompt rebuilding: as many image placeholders per image as tokens were kept."""

from __future__ import annotations

import torch

from arrcoc.errors import InputError


def pack_end(select: torch.Tensor, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of ``select`` ``[B, M]`` sorted by ``key``, packed to the END of each row.

    Left padding for generation: the last real entry of every row is last.
    Returns ``(index [B, S], valid [B, S])``, ``S`` the largest count.
    """
    if key is None:
        key = torch.arange(select.shape[1], device=select.device).expand_as(select)
    order = torch.sort(torch.where(select, key, torch.full_like(key, -1)), dim=1, stable=True).indices
    S = int(select.sum(1).max()) if select.numel() else 0
    index = order[:, order.shape[1] - S:]
    return index, select.gather(1, index)


def image_slots(input_ids: torch.Tensor, image_token_id: int, num_images: int, tokens_per_image: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which image and which feature row each placeholder stands for (images in row-major prompt order).

    Returns ``(is_image [B, L], image [B, L], rank [B, L])``; a count that does
    not match ``num_images * tokens_per_image`` is an :class:`InputError`.
    """
    is_image = input_ids == image_token_id
    found = int(is_image.sum())
    if found != num_images * tokens_per_image:
        per_row = is_image.sum(1).tolist()
        raise InputError(
            f"arrcoc.hf: the prompts hold {found} image placeholders (per prompt: {per_row}), but {num_images} "
            f"image(s) of {tokens_per_image} tokens each need {num_images * tokens_per_image}; build the inputs with "
            "the model's processor (one <image> per image, expanded to one placeholder per feature)"
        )
    count = is_image.flatten().long().cumsum(0).view_as(input_ids) - 1  # row-major running count
    return is_image, torch.div(count, tokens_per_image, rounding_mode="floor"), count % tokens_per_image


def shrink_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int, pad_id: int,
                   tokens_per_image: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``kept[i]`` placeholders of image ``i``; every other token stays; rows left-padded.

    Returns ``(input_ids, attention_mask)`` of the shortened prompts.
    """
    is_image, image, rank = image_slots(input_ids, image_token_id, int(kept.numel()), tokens_per_image)
    real = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
    keep = real & (~is_image | (rank < kept.to(input_ids.device)[image.clamp(min=0)]))
    index, valid = pack_end(keep)
    ids = input_ids.gather(1, index).masked_fill(~valid, pad_id)
    return ids, valid.long()
