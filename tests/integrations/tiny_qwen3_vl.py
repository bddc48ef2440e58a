"""A tiny Qwen3-VL built from its config (offline, seeded, float64, sdpa), and its prompts.

Tower: 3 blocks of width 32, 16 px patches, 2 x 2 merging, a learned 8 x 8 position grid resampled to each
image, and DeepStack: the output of every block (``deepstack_visual_indexes = [0, 1, 2]``) goes through its own
merger into a plane that the text model adds at the visual positions after decoder layers 0, 1 and 2 (as the
released checkpoints: three planes, the first three decoder layers).  Decoder: 4 layers of width 64, head_dim 16,
interleaved multimodal rotary positions (``mrope_section [2, 3, 3]``).  No eos token: every generation runs its
full length.
"""

from __future__ import annotations

import torch

from tiny_models import BOS, PAD, QWEN_END, QWEN_IMAGE, QWEN_START, left_pad

IMAGE, START, END = QWEN_IMAGE, QWEN_START, QWEN_END
PATCH_VALUES = 3 * 2 * 16 * 16  # channels x temporal patch x patch^2: one row of pixel_values
#: Image grids (t, h, w) in 16 px patches: 24, 9 and 8 merged tokens.
GRIDS = [[1, 8, 12], [1, 6, 6], [1, 4, 8]]
#: (text before, text after the image) of each prompt.
TEXTS = [(3, 5), (2, 8), (4, 2)]


def tiny_qwen3_vl(dtype: torch.dtype = torch.float64, deepstack: tuple[int, ...] = (0, 1, 2)):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=list(deepstack)),
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=BOS,
                         eos_token_id=None, pad_token_id=PAD,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True, "rope_theta": 10000.0}),
        image_token_id=IMAGE, video_token_id=901, vision_start_token_id=START, vision_end_token_id=END)
    model = Qwen3VLForConditionalGeneration(config).eval().to(dtype)
    model.set_attn_implementation("sdpa")
    return model


def qwen3_inputs(images=(0, 1, 2), texts=None, dtype: torch.dtype = torch.float64, grids=GRIDS) -> dict:
    """Left-padded prompts ``bos, text, <start>, n x <image>, <end>, question`` for images ``images`` (indices
    into ``grids``), seeded pixels of each image's grid."""
    texts = [TEXTS[i] for i in images] if texts is None else texts
    grid = torch.tensor([grids[i] for i in images])
    pixels = torch.cat([torch.randn(int(torch.tensor(grids[i]).prod()), PATCH_VALUES, dtype=dtype,
                                    generator=torch.Generator().manual_seed(i)) for i in images])
    rows = []
    for i, (pre, post) in zip(images, texts):
        n = grids[i][1] * grids[i][2] // 4
        rows.append([BOS, *range(10, 10 + pre), START, *[IMAGE] * n, END, *range(50, 50 + post)])
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == IMAGE).int()}
