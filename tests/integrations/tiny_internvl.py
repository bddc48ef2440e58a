"""A tiny InternVL3 (``InternVLForConditionalGeneration``) built from configs (offline, seeded), and its prompts.

InternViT tower (class token, absolute positions, layer scale) of 2 blocks of width 32 at 112 px / patch 14:
8 x 8 patches per tile, folded 2 x 2 by the pixel shuffle (``downsample_ratio=0.5``) into ``TOKENS = 16`` tokens
(a 4 x 4 grid) of width 128 before the projector, as the checkpoints fold 32 x 32 into 16 x 16.  Decoder: Qwen2, 4
layers of width 64, sdpa, vocabulary 200.  The class token, position embeddings and norms start at zero / identity
in a fresh model: they are drawn at random here, so nothing hides behind a zero, and the tower's query / key
weights are large enough that its attention is far from uniform.  No eos token: every generation
runs its full length.

A prompt is ``bos, text, <img>, TOKENS x <IMG_CONTEXT> per tile, </img>, question, 9``; an image of ``k`` tiles
is what the processor makes of it (``k - 1`` tiles and the thumbnail last, or one tile alone), and
``pixel_values`` stacks every tile of every prompt in order, as the processor does.
"""

from __future__ import annotations

import torch

from tiny_models import BOS, PAD, left_pad

IMAGE, IMG_START, IMG_END = 199, 197, 198
TOKENS = 16  # tokens per tile after the pixel shuffle (4 x 4)
SIDE, PATCHES = 4, 8  # tokens / patches per side of a tile
QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=200, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None,
             max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def tiny_internvl(dtype: torch.dtype = torch.float64, attn_implementation: str = "sdpa"):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    torch.manual_seed(0)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=112, patch_size=14)
    config = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**QWEN2), image_token_id=IMAGE,
                            image_seq_length=TOKENS, downsample_ratio=0.5)
    model = InternVLForConditionalGeneration(config).eval().to(dtype)
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(0, 1.0)
        embeddings.position_embeddings.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            elif "vision_tower" in name and ("q_proj" in name or "k_proj" in name):
                p.normal_(0, 0.4)  # attention far from uniform, so the signals read from it rank tokens
    return model


def row(pre: int, post: int, tiles: list[int]) -> list[int]:
    """``bos, pre text, (<img>, TOKENS placeholders per tile, </img>, 2 text) per image, post text, 9``."""
    out = [BOS, *range(5, 5 + pre)]
    for k in tiles:
        out += [IMG_START, *[IMAGE] * (TOKENS * k), IMG_END, 60, 61]
    return out + list(range(20, 20 + post)) + [9]


def batch(rows: list[tuple[int, int, list[int]]], seed: int = 1, dtype: torch.dtype = torch.float64) -> dict:
    """Prompts :func:`row` (``rows``: text before, text after, tiles of each image), left-padded, with seeded
    pixels: every tile of every image in prompt order, ``[tiles, 3, 112, 112]``."""
    ids, mask = left_pad([row(pre, post, tiles) for pre, post, tiles in rows])
    tiles = sum(sum(t) for _, _, t in rows)
    pixels = torch.randn(tiles, 3, 112, 112, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def shortened(inputs: dict, counts: list[int]) -> dict:
    """The hand-built prompt a pre-LLM selection must equal: tile ``i`` (over the prompts' tiles in order) keeps
    ``counts[i]`` of its TOKENS placeholders (which ones does not matter: the features say which tokens they are);
    each prompt keeps its own padding, shorter rows get more in front."""
    rows, tile = [], 0
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b].tolist()
        out, i = [], 0
        while i < len(ids):
            if ids[i] == IMAGE:
                assert ids[i:i + TOKENS] == [IMAGE] * TOKENS
                out += [IMAGE] * counts[tile]
                tile, i = tile + 1, i + TOKENS
            else:
                out.append(ids[i])
                i += 1
        rows.append(out)
    assert tile == len(counts)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask}
