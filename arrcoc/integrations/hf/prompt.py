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


def image_slots(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which image and which feature row each placeholder stands for (images in row-major prompt order).

    ``tokens_per_image[i]`` is image ``i``'s placeholder count.  Returns
    ``(is_image [B, L], image [B, L], rank [B, L])``; counts that do not add
    up are an :class:`InputError`.
    """
    is_image = input_ids == image_token_id
    found, wanted = int(is_image.sum()), int(sum(tokens_per_image))
    if found != wanted:
        per_row = is_image.sum(1).tolist()
        raise InputError(
            f"arrcoc.hf: the prompts hold {found} image placeholders (per prompt: {per_row}), but "
            f"{len(tokens_per_image)} image(s) of {sorted(set(tokens_per_image))} tokens need {wanted}; build the "
            "inputs with the model's processor (one <image> per image, expanded to one placeholder per feature)"
        )
    count = is_image.flatten().long().cumsum(0).view_as(input_ids) - 1  # row-major running count
    ends = torch.tensor(tokens_per_image, device=input_ids.device).cumsum(0)
    image = torch.searchsorted(ends, count.clamp(min=0), right=True)
    starts = ends - torch.tensor(tokens_per_image, device=input_ids.device)
    rank = count - starts[image.clamp(max=len(tokens_per_image) - 1)]
    return is_image, image, rank


def shrink_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int, pad_id: int,
                   tokens_per_image: list[int], kept: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``kept[i]`` placeholders of image ``i``; every other token stays; rows left-padded.

    Returns ``(input_ids, attention_mask, index, valid)``: the shortened
    prompts and, per new column, the original column it came from.
    """
    is_image, image, rank = image_slots(input_ids, image_token_id, tokens_per_image)
    real = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
    keep = real & (~is_image | (rank < kept.to(input_ids.device)[image.clamp(max=len(tokens_per_image) - 1)]))
    index, valid = pack_end(keep)
    ids = input_ids.gather(1, index).masked_fill(~valid, pad_id)
    return ids, valid.long(), index, valid


def source_cells(positions: torch.Tensor, mask: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """Each token's original grid cell (raster index on its image's own grid), ``[B, N]`` (0 on padding).

    A kept patch is its own cell; a merged token takes the cell nearest its
    size-weighted centroid (rounded half up).
    """
    rows = torch.tensor([g[0] for g in grids], device=positions.device)[:, None]
    cols = torch.tensor([g[1] for g in grids], device=positions.device)[:, None]
    cell = torch.floor(positions + 0.5).long()
    r = torch.minimum(cell[..., 0].clamp(min=0), rows - 1)
    c = torch.minimum(cell[..., 1].clamp(min=0), cols - 1)
    return (r * cols + c).masked_fill(~mask, 0)


def source_columns(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: list[int], index: torch.Tensor,
                   valid: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """For each column of a shortened prompt, the ORIGINAL column whose position it should take.

    Text columns keep theirs (``index``); the ``j``-th placeholder kept for
    image ``i`` holds that image's ``j``-th kept token, whose own cell is
    ``cells[i, j]``: it takes the original column of placeholder ``cells[i, j]``.
    """
    is_image, image, rank = image_slots(input_ids, image_token_id, tokens_per_image)
    B, L = input_ids.shape
    column = torch.zeros(len(tokens_per_image), max(tokens_per_image), dtype=torch.long, device=input_ids.device)
    where = torch.arange(L, device=input_ids.device).expand(B, L)
    column[image[is_image], rank[is_image]] = where[is_image]
    new_is_image = is_image.gather(1, index) & valid
    img = image.gather(1, index).clamp(max=len(tokens_per_image) - 1)
    j = rank.gather(1, index).clamp(min=0, max=cells.shape[1] - 1)
    moved = column[img, cells[img, j]]
    return torch.where(new_is_image, moved, index)
