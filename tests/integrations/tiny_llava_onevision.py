"""A tiny LLaVA-OneVision built from configs (offline, seeded), and its prompts.

SigLIP tower (no class token) at 56 px, patch 14: ``S = 4`` patches per view side, 16 tokens per view;
3 blocks of width 32.  Qwen2 decoder: 4 layers of width 64, sdpa, vocabulary 200.  AnyRes pinpoints give
crop grids 1x2, 2x1, 2x2 and 3x3; ``vision_aspect_ratio="anyres_max_2"`` makes the model pool (bilinear) every
unpadded crop grid of more than ``2 * 16 * 1.1 ** 2`` cells, so the 2x2 and 3x3 grids of most images are pooled
and the 1x2 / 2x1 ones are not.  No eos token: every generation runs its full length.
"""

from __future__ import annotations

import torch

from tiny_models import BOS, PAD, left_pad

IMAGE = 199
S = 4
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 168]]
QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=200, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None,
             max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
#: (height, width) of the test images and the crop grid each gets: wide 1x2 and tall 2x1 (not pooled), square
#: 2x2 (unpadded 8x8, pooled to 5x5), wide 3x3 (unpadded 8x12 of 12x12, pooled to 4x6 at scale 2).
SIZES = {"wide": [50, 100], "tall": [90, 40], "square": [100, 100], "big": [110, 165]}


def tiny_llava_onevision(dtype: torch.dtype = torch.float64, *, aspect: str = "anyres_max_2",
                         attn_implementation: str | None = "sdpa"):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    from transformers import SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=S * 14, patch_size=14, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**QWEN2), image_token_id=IMAGE,
                                  video_token_id=198, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = LlavaOnevisionForConditionalGeneration(config).eval().to(dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def views_of(size: list[int]) -> int:
    """Base view plus crops of an image of ``size`` (what the processor stacks, padded to the largest)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return image_size_to_num_patches(size, PINPOINTS, S * 14)


def ov_batch(model, images: list[str], texts: list[tuple[int, int]], seed: int = 0,
             dtype: torch.dtype = torch.float64) -> dict:
    """Left-padded prompts ``bos, text, <image> x n, question, 9`` (``texts``: text lengths before / after), one
    image each, pixel_values ``[images, max views, 3, 56, 56]`` seeded per image (zeros past an image's views, as
    the processor pads), ``image_sizes``, and ``batch_num_images`` (all 1), which the processor always gives."""
    import arrcoc

    sizes = torch.tensor([SIZES[name] for name in images])
    views = max(views_of(s) for s in sizes.tolist())
    pixels = torch.zeros(len(images), views, 3, S * 14, S * 14, dtype=dtype)
    for i, size in enumerate(sizes.tolist()):
        n = views_of(size)
        g = torch.Generator().manual_seed(seed * 100 + list(SIZES).index(images[i]))
        pixels[i, :n] = torch.randn(n, 3, S * 14, S * 14, generator=g, dtype=dtype)
    per = arrcoc.hf.adapter_for(model).tokens_per_image(pixels, {"image_sizes": sizes})
    rows = [[BOS, *range(5, 5 + pre), *[IMAGE] * n, *range(20, 20 + post), 9] for n, (pre, post) in zip(per, texts)]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes,
            "batch_num_images": torch.ones(len(images), dtype=torch.long)}
