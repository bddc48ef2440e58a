"""Prefill cost of a Qwen2-VL-shaped model with arrcoc pipelines applied inside it.

Random weights (no download), scaled to the CPU: a Qwen2-VL vision tower of
``--vision-depth`` blocks (width 640, 2x2 merging) on a 448 x 448 image
(32 x 32 patches -> 256 merged visual tokens) and a decoder of ``--layers``
layers of width ``--width`` with multimodal rotary positions.  At 25% of
the visual tokens (64):

* ``hand-built``: the unmodified model on a prompt with 64 placeholders
  carrying the first 64 features (an 8 x 8 grid);
* ``random_keep`` / ``aim_merge`` (256 -> 128 -> 64) / ``sparsevlm``
  (``w_sal: 0``: Qwen's tower has no class token) before the LLM, with
  their original multimodal positions; ``fastv`` at layer 2 in the LLM.

Like ``llava_prefill.py --ratios``: interleaved rounds, the minimum of each
component (vision tower, pre-LLM stages, decoder stack); end to end =
vision + stages + LLM.

    python benchmarks/qwen2_vl_prefill.py --threads 1 --repeats 4
"""

from __future__ import annotations

import argparse

import torch

from _prefill import Minima, emit, measure_round, ratio_table
from _timing import time_ms

IMAGE, START, END = 151655, 151652, 151653


def build(layers: int, width: int, vision_depth: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    heads = width // 64
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=vision_depth, embed_dim=640, hidden_size=width, num_heads=10, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=151936, hidden_size=width, intermediate_size=int(width * 2.6875),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],  # head_dim 64 (Qwen2-VL: 128 -> [16, 24, 24])
                                          "rope_theta": 1000000.0}),
        image_token_id=IMAGE, video_token_id=151656, vision_start_token_id=START, vision_end_token_id=END)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def prompt(grid: list[int]) -> dict:
    n = grid[0] * grid[1] * grid[2] // 4
    pre, post = list(range(100, 114)), list(range(200, 224))  # system prompt + question: 40 text tokens
    ids = torch.tensor([[1, *pre, START, *[IMAGE] * n, END, *post]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": torch.tensor([grid]),
            "mm_token_type_ids": (ids == IMAGE).int()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vision-depth", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.layers, args.width, args.vision_depth)
    full = prompt([1, 32, 32])
    pixels = torch.randn(32 * 32, 3 * 2 * 14 * 14)
    k = 64
    methods = {"random_keep": {"compress": [{"use": "random_keep", "keep": k}]},
               "aim_merge": {"compress": [{"use": "aim_merge", "keep": [0.5, 0.5]}]},
               "sparsevlm (w_sal 0)": {"compress": [{"use": "sparsevlm", "keep": k, "w_sal": 0.0}]},
               "fastv (layer 2)": {"llm": [{"use": "fastv", "layer": 2, "keep": k}]}}
    minima = Minima()
    with torch.inference_mode():
        features = lambda: model.model.get_image_features(pixels, full["image_grid_thw"]).pooler_output[0]  # noqa: E731
        feats = features()
        vision = time_ms(features, args.repeats + 1, torch.device("cpu"), warmup=0, stat="min")
        for _ in range(args.repeats + 1):
            measure_round(minima, model, full, feats, prompt([1, 16, 16]), k, methods, {"pixel_values": pixels}, 256)
    table = ratio_table(minima, vision, k, 256) + (
        f"\n\nQwen2-VL shape: vision {args.vision_depth} blocks x 640, decoder {args.layers} x {args.width}, fp32, "
        f"256 visual + 40 text tokens; vision tower (min) {vision:.1f} ms; {torch.get_num_threads()} thread(s); "
        f"minima over {args.repeats + 1} interleaved rounds.\n")
    emit(table, args.out)


if __name__ == "__main__":
    main()
