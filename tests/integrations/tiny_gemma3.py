"""A tiny Gemma 3 (``Gemma3ForConditionalGeneration``) built from configs (offline, seeded), and its prompts.

SigLIP tower (no class token, no head) at 112 px / patch 14: 8 x 8 patches, average-pooled 2 x 2 by the
projector into ``mm_tokens_per_image = 16`` tokens (a 4 x 4 grid), as Gemma 3 pools 64 x 64 into 16 x 16.
Decoder: 4 layers alternating sliding-window (window 6, shorter than an image's 16 tokens, so the window and the
image block overlap as they compose in the model) and full attention, each type with its own rotary base (local
10 000, global 1 000 000), query/key norms, the embedding scaled by sqrt(width).  No eos token: every
generation runs its full length.

A prompt is ``bos, text, <start_of_image>, 16 x <image>, <end_of_image>, ...``; pan-and-scan crops are more
images of the same size, so a prompt's images differ in number, not size.  ``token_type_ids`` is 1 on the image
tokens (what the processor returns): the model attends bidirectionally within each image's block.
"""

from __future__ import annotations

import torch

PAD, BOS = 0, 2
BOI, EOI, IMAGE = 255, 256, 257
TOKENS = 16  # image tokens per image (4 x 4)
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None)


def tiny_gemma3(dtype: torch.dtype = torch.float64, **text: object):
    """``text``: decoder settings over ``TEXT``."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=112, patch_size=14, vision_use_head=False)
    config = Gemma3Config(vision_config=vision, text_config=Gemma3TextConfig(**{**TEXT, **text}),
                          mm_tokens_per_image=TOKENS, boi_token_index=BOI, eoi_token_index=EOI,
                          image_token_index=IMAGE)
    model = Gemma3ForConditionalGeneration(config).eval().to(dtype)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():  # the projector's weight and the norms start at 0 / identity: random, so nothing hides
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
    return model


def row(pre: int, post: int, images: int = 1, between: int = 2) -> list[int]:
    """``bos, pre text, (boi, 16 image, eoi, between text) per image, post text``."""
    out = [BOS, *range(5, 5 + pre)]
    for i in range(images):
        out += [BOI, *[IMAGE] * TOKENS, EOI]
        if i < images - 1:
            out += list(range(60, 60 + between))
    return out + list(range(30, 30 + post))


def batch(rows: list[tuple[int, int, int]], seed: int = 1, token_types: bool = True) -> dict:
    """Prompts :func:`row` (``rows``: text before, text after, images), left-padded, with seeded float64 pixels
    (one image each, prompts in order) and ``token_type_ids``."""
    prompts = [row(pre, post, images) for pre, post, images in rows]
    ids, mask = left_pad(prompts)
    images = sum(n for _, _, n in rows)
    pixels = torch.randn(images, 3, 112, 112, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    if token_types:
        out["token_type_ids"] = (ids == IMAGE).long()
    return out


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ``(input_ids, attention_mask)``, left-padded with ``PAD``."""
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def shortened(inputs: dict, counts: list[int]) -> dict:
    """The hand-built prompt a pre-LLM selection must equal: image ``i`` (over the prompts' images in order) keeps
    ``counts[i]`` of its 16 placeholders (which ones does not matter: they are all ``<image>``; the features say
    which tokens they are); each prompt keeps its own padding (only placeholders are dropped), shorter rows get
    more in front; ``token_type_ids`` 1 on the kept image tokens."""
    rows, image = [], 0
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b].tolist()
        out, i = [], 0
        while i < len(ids):
            if ids[i] == IMAGE:
                assert ids[i:i + TOKENS] == [IMAGE] * TOKENS
                out += [IMAGE] * counts[image]
                image, i = image + 1, i + TOKENS
            else:
                out.append(ids[i])
                i += 1
        rows.append(out)
    assert image == len(counts)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMAGE).long()}
