"""Prompt rebuilding: as many image placeholders per image as tokens were kept."""

from __future__ import annotations

from typing import Any, Callable

import torch

from arrcoc import ops
from arrcoc.errors import InputError, PlaceholderMismatchError


def placeholder_mask(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, image_token_id: int,
                     embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[B, L]`` bool: the image placeholders of a prompt given as ids or as embeddings.

    Found as transformers' ``get_placeholder_mask`` finds them: the image
    token's id, or (``inputs_embeds``) every entry equal to the image token's
    embedding (``embed``: the LLM's input embeddings).
    """
    if input_ids is not None:
        return input_ids == image_token_id
    if inputs_embeds is None:
        raise InputError("arrcoc.hf: expected input_ids or inputs_embeds in the model's inputs, got neither")
    image = embed(torch.tensor(image_token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
    return (inputs_embeds == image).all(-1)


def image_slots(input_ids: torch.Tensor | None, image_token_id: int, tokens_per_image: list[int], *,
                placeholders: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which image and which feature row each placeholder stands for (images in row-major prompt order).

    ``tokens_per_image[i]`` is image ``i``'s placeholder count; the
    placeholders are ``input_ids == image_token_id``, or ``placeholders``
    (:func:`placeholder_mask`) for a prompt given as embeddings.  Returns
    ``(is_image [B, L], image [B, L], rank [B, L])``; counts that do not add
    up are an :class:`InputError`.
    """
    is_image = input_ids == image_token_id if placeholders is None else placeholders
    found, wanted = int(is_image.sum()), int(sum(tokens_per_image))
    if found != wanted:
        per_row = is_image.sum(1).tolist()
        raise PlaceholderMismatchError(
            f"arrcoc.hf: the prompts hold {found} image placeholders (per prompt: {per_row}), but "
            f"{len(tokens_per_image)} image(s) of {sorted(set(tokens_per_image))} tokens need {wanted}; build the "
            "inputs with the model's processor (one <image> per image, expanded to one placeholder per feature)"
        )
    count = is_image.flatten().long().cumsum(0).view_as(is_image) - 1  # row-major running count
    ends = torch.tensor(tokens_per_image, device=is_image.device).cumsum(0)
    image = torch.searchsorted(ends, count.clamp(min=0), right=True)
    starts = ends - torch.tensor(tokens_per_image, device=is_image.device)
    rank = count - starts[image.clamp(max=len(tokens_per_image) - 1)]
    return is_image, image, rank


def shrink_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int, pad_id: int,
                   tokens_per_image: list[int], kept: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``kept[i]`` placeholders of image ``i``; every other column stays; rows left-padded.

    Columns the caller masked (padding, a pad id inside a prompt) stay where
    they are, still masked: dropping them would shorten a prompt that keeps
    every image token (a token fewer in the cache, other positions, other
    shapes than the model's own) and turn right padding into left padding.
    Returns ``(input_ids, attention_mask, index, valid)``: the shortened
    prompts and, per new column, the original column it came from
    (``valid``: False on the padding added in front of shorter rows).
    """
    is_image, image, rank = image_slots(input_ids, image_token_id, tokens_per_image)
    keep = ~is_image | (rank < kept.to(input_ids.device)[image.clamp(max=len(tokens_per_image) - 1)])
    index, valid = ops.pack(keep, end=True)
    ids = input_ids.gather(1, index).masked_fill(~valid, pad_id)
    mask = valid.long() if attention_mask is None else attention_mask.gather(1, index).masked_fill(~valid, 0)
    return ids, mask, index, valid


def shrink_embeds(inputs_embeds: torch.Tensor, placeholders: torch.Tensor, attention_mask: torch.Tensor | None,
                  pad_embedding: torch.Tensor, tokens_per_image: list[int], kept: torch.Tensor,
                  image_embedding: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`shrink_prompts` for a prompt given as embeddings ``[B, L, D]`` (``placeholders``: its image slots).

    The padding added in front of shorter rows is ``pad_embedding``, never a
    copy of another column nor ``image_embedding`` (the image token's): the
    model finds image slots by comparing embeddings with the image token's,
    so such padding would count as placeholders.  A pad embedding equal to
    the image token's (added tokens initialised alike) gives way to zeros, or
    to ones where the image token's embedding is zero.
    """
    ids = torch.where(placeholders, 1, 0)  # stands in for the ids: only the placeholder pattern is read
    _, mask, index, valid = shrink_prompts(ids, attention_mask, 1, 0, tokens_per_image, kept)
    D = inputs_embeds.shape[-1]
    embeds = inputs_embeds.gather(1, index[..., None].expand(-1, -1, D))
    pad = pad_embedding.to(embeds.dtype)
    if image_embedding is not None and not bool(valid.all()):
        for filler in (pad, torch.zeros_like(pad), torch.ones_like(pad)):
            if not bool((filler == image_embedding).all()):  # compared as the model compares them
                pad = filler
                break
    embeds = torch.where(valid[..., None], embeds, pad.expand_as(embeds))
    return embeds, mask, index, valid


def padding_mask(attention_mask: Any, past: int = 0) -> torch.Tensor | None:
    """The 2-D ``[B, past + q]`` key mask (1 = a real token) behind any attention mask a model forward gets.

    ``generate`` with a static cache (and compiled forwards) hands the model
    a dict of prepared 4-D masks per attention type instead of the 2-D mask:
    the keys the LAST query row may attend to are the real columns up to it
    (causal), over the first ``past + q`` key columns (a static cache's mask
    spans its whole capacity).  ``None`` stays ``None`` (no padding).

    The full-attention mask is read when the dict has one.  A model whose
    every layer attends in a window (``sliding_attention`` only) hides the
    columns before the window from the last row, so there each of the ``q``
    new columns is read from its own row (a real column attends to itself,
    padding to nothing); cached columns outside the window cannot be told
    apart from padding and read as padding (that window's layers never see
    them).
    """
    windowed = False
    if isinstance(attention_mask, dict):
        if not attention_mask:
            return None
        windowed = "full_attention" not in attention_mask
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values())))
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(
            f"arrcoc.hf: expected the attention mask as a tensor [batch, length], a 4-D tensor or a dict of them per "
            f"attention type, got {type(attention_mask).__name__} (flex attention's BlockMask cannot be read back; "
            "use attn_implementation 'sdpa' or 'eager')"
        )
    if attention_mask.ndim == 2:
        return attention_mask
    if attention_mask.ndim != 4:
        raise InputError(
            f"arrcoc.hf: expected a 2-D [batch, length] or 4-D [batch, heads, queries, keys] attention mask, got "
            f"shape {tuple(attention_mask.shape)}"
        )
    last = attention_mask[:, 0, -1, : past + attention_mask.shape[2]]
    if windowed:
        if attention_mask.shape[-1] < past + attention_mask.shape[2]:
            raise InputError(
                f"arrcoc.hf: a windowed attention mask of {attention_mask.shape[-1]} key columns after {past} cached "
                "tokens (a static window cache rolls its columns): the padding behind it cannot be read"
            )
        own = attention_mask[:, 0].diagonal(offset=past, dim1=-2, dim2=-1)  # column past + i from query row i
        last = torch.cat([last[:, :past], own], 1)
    allowed = last if last.dtype == torch.bool else last == 0  # eager masks: 0 where allowed, min float elsewhere
    return allowed.long()


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
