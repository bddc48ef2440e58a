"""Tiny VLMs built from configs (offline, seeded), one per supported family, and prompt helpers.

LLaVA-1.5: CLIP tower 112 px / patch 14 (64 image tokens, class token), 4-layer Llama of width 64.
LLaVA-NeXT: the same tower at 56 px (16 tokens per view), AnyRes pinpoints 1x2, 2x1, 2x2.
Qwen2-VL: a 2-block tower with 2x2 merging, 4-layer decoder with multimodal rotary positions.
No eos token: every generation runs its full length.
"""

from __future__ import annotations

import copy

import torch

IMAGE = 199  # LLaVA and LLaVA-NeXT placeholder id (vocabulary 200)
QWEN_IMAGE, QWEN_START, QWEN_END = 900, 902, 903
PAD, BOS = 0, 1
N0 = 64  # tiny_llava's image tokens per image: (112 / 14) ** 2
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=200, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None)


def _clip(image_size: int, tower: str = "clip"):
    """A 3-layer tower: CLIP (class token) or SigLIP (none, as LLaVA-OneVision / interleave towers)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    config = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[tower]
    return config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=image_size, patch_size=14)


def tiny_llava(dtype: torch.dtype = torch.float64, *, tower: str = "clip", strategy: str = "default",
               attn_implementation: str | None = None):
    """``strategy``: the config's ``vision_feature_select_strategy`` ("full" keeps a CLIP class token)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(vision_config=_clip(112, tower), text_config=LlamaConfig(**LLAMA), image_token_id=IMAGE,
                         vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(config).eval().to(dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def tiny_llava_next(dtype: torch.dtype = torch.float64, *, image_size: int = 56, pinpoints: list | None = None,
                    tower: str = "clip", strategy: str = "default", attn_implementation: str | None = None):
    """Views of ``image_size`` px (``image_size / 14`` patches per side); AnyRes ``pinpoints`` (default 1x2, 2x1,
    2x2 views of 56 px)."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaNextConfig(vision_config=_clip(image_size, tower), text_config=LlamaConfig(**LLAMA),
                             image_token_id=IMAGE, image_grid_pinpoints=pinpoints or NEXT_PINPOINTS,
                             vision_feature_select_strategy=strategy)
    model = LlavaNextForConditionalGeneration(config).eval().to(dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


#: The decoder and the special tokens both Qwen factories share.
QWEN_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
QWEN_TOKENS = dict(image_token_id=QWEN_IMAGE, video_token_id=901, vision_start_token_id=QWEN_START,
                   vision_end_token_id=QWEN_END)


def tiny_qwen2_vl(dtype: torch.dtype = torch.float64, **text: object):
    """``text``: decoder settings over ``QWEN_TEXT`` (e.g. ``use_sliding_window=True, sliding_window=6``)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config={**copy.deepcopy(QWEN_TEXT), **text}, **QWEN_TOKENS)
    return Qwen2VLForConditionalGeneration(config).eval().to(dtype)


def tiny_qwen2_5_vl(dtype: torch.dtype = torch.float64):
    """Qwen2.5-VL: the same decoder; a 2-block tower with window attention in block 0 (windows of 56 px: 2 x 2
    merged tokens, so every image of more than 2 x 2 tokens is reordered into windows and back) and full
    attention in block 1."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        text_config=copy.deepcopy(QWEN_TEXT), **QWEN_TOKENS)
    return Qwen2_5_VLForConditionalGeneration(config).eval().to(dtype)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ``(input_ids, attention_mask)``, left-padded with ``PAD``."""
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def llava_row(pre: int, post: int, n_image: int = N0) -> list[int]:
    """One LLaVA prompt ``bos, text, n_image x <image>, question`` with ``pre`` / ``post`` text tokens."""
    return [BOS, *range(5, 5 + pre), *[IMAGE] * n_image, *range(30, 30 + post)]


#: (text before, text after the image) of the three LLaVA prompts of test_hf_llava and test_hf_llm_methods:
#: prompt lengths 73, 76, 72 (the third has a single text token after the image).
ROWS = [(3, 5), (2, 9), (6, 1)]


def llava_batch(rows: list[tuple[int, int]], seed: int = 1) -> dict:
    """LLaVA prompts :func:`llava_row` (``rows``: text lengths before / after), left-padded, with seeded float64
    pixels."""
    ids, mask = left_pad([llava_row(pre, post) for pre, post in rows])
    pixels = torch.randn(len(rows), 3, 112, 112, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def hook_counts(model) -> dict[str, tuple[int, int]]:
    """Forward pre-hooks and forward hooks per module: what a model carries before and after arrcoc."""
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


def sample(inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded LLaVA batch, unpadded, as a batch of one."""
    real = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b, real][None], "attention_mask": inputs["attention_mask"][b, real][None],
            "pixel_values": inputs["pixel_values"][b:b + 1]}


# ------------------------------------------------------------- reference computations (written from the papers /
# transformers' Llama, not from arrcoc's code): the oracles the integration tests compare against
def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` numbers a left-padded prompt: real tokens 0, 1, ...; padding 1."""
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's rotary helper: ``(x1, x2) -> (-x2, x1)`` over the last dimension's halves."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def reference_attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor):
    """One Llama attention block computed by hand, in the dtype of ``x`` (float64 in the tests).

    ``x`` ``[B, S, D]``, ``cos`` / ``sin`` ``[B, S, head_dim]`` (the model's rotary embedding), ``allowed``
    ``[B, S, S]`` (which keys each query may see) -> ``(output [B, S, D], probabilities [B, H, S, S], masked
    pre-softmax logits [B, H, S, S])``.  The model's eager kernel is not usable as the reference: Llama's
    ``eager_attention_forward`` takes the softmax in float32 (see test_hf_llava's FastV section).
    """
    B, S, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, S, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, -1, hd).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = ((q @ k.transpose(-1, -2)) * hd ** -0.5).masked_fill(~allowed[:, None], float("-inf"))
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, S, -1)
    return attn.o_proj(out), probs, logits


def prompt_with_features(inputs: dict, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA prompts (:func:`llava_batch`) with ``counts[b]`` image placeholders in place of the ``N0``,
    left-padded again: the hand-built prompt a pre-LLM selection must equal.

    Each prompt keeps its own padding (arrcoc drops only placeholders: a prompt that keeps every one is left as
    it came), shorter rows get more in front.
    """
    rows = []
    for b, k in enumerate(counts):
        ids = inputs["input_ids"][b].tolist()
        first = ids.index(IMAGE)
        assert ids[first:first + N0] == [IMAGE] * N0
        rows.append(ids[:first] + [IMAGE] * k + ids[first + N0:])
    return left_pad(rows)



def qwen_received_reference(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Per image ``[merged tokens]``, raster order: the attention each token receives in the last vision block of a
    tiny Qwen2-VL / Qwen2.5-VL (whose last block attends over the whole image), recomputed here in plain torch
    from the block's ``norm1`` / ``qkv`` on its input (the model's ``hidden_states[-2]``): the rotary angles from
    each row's patch (row, col) written out (Qwen2-VL: 2 x 2 merge blocks in raster order; Qwen2.5-VL: those
    blocks grouped in windows of ``window_size / merge / patch`` blocks, raster inside and between windows), the
    rotation rounded through float32 as the model's ``apply_rotary_pos_emb_vision``, the softmax of every query
    row over the image's keys, the mean over queries, then over heads; a merged token the mean of its 4 patches.
    """
    visual = model.model.visual
    with torch.no_grad():
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, output_hidden_states=True)
    x = out.hidden_states[-2]
    block = visual.blocks[-1]
    attn = block.attn
    merge = int(visual.spatial_merge_size)
    window = getattr(visual, "window_size", None)
    inv_freq = visual.rotary_pos_emb.inv_freq.float()
    result, start = [], 0
    for t, h, w in grid_thw.tolist():
        assert t == 1
        n, gh, gw = h * w, h // merge, w // merge
        units = list(range(gh * gw))
        if window is not None:
            ws = int(window) // merge // int(visual.patch_size)
            units.sort(key=lambda u: ((u // gw) // ws, (u % gw) // ws, (u // gw) % ws, (u % gw) % ws))
        cells = [((u // gw) * merge + dr, (u % gw) * merge + dc) for u in units for dr in range(merge)
                 for dc in range(merge)]
        pos = torch.tensor(cells, dtype=torch.float32)
        angles = torch.cat([pos[:, 0, None] * inv_freq, pos[:, 1, None] * inv_freq], -1)
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        with torch.no_grad():
            rows = block.norm1(x[start:start + n])
            q, k, _ = attn.qkv(rows).view(n, 3, attn.num_heads, -1).unbind(1)  # [n, heads, hd]
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
            probs = (torch.einsum("qhd,khd->hqk", q, k) * attn.head_dim ** -0.5).softmax(-1)
        per_patch = probs.mean(1).mean(0)  # over queries, then heads: [n]
        per_unit = per_patch.view(-1, merge * merge).mean(-1)
        raster = torch.empty_like(per_unit)
        raster[torch.tensor(units)] = per_unit
        result.append(raster)
        start += n
    return result
