"""Per-decode-step Python overhead of ``arrcoc.hf.apply``: ms per generated token, bare model vs inside ``apply``.

A tiny LLaVA-1.5 built from configs (random weights, seeded, no download; the
shape of ``tests/integrations/tiny_models.py``: CLIP tower 112 px / patch 14,
64 image tokens, 3 layers of width 32; Llama decoder of ``--layers`` layers,
``--width`` wide, vocabulary 200, no eos token so every generation runs its
full length), fp32, batch 1, greedy ``generate``.  The decoder is tiny on
purpose: a decode step then costs little arithmetic, so what ``apply`` adds per
step (its hooks, clocks and bookkeeping) shows.

Pipelines that keep every token (``apply`` then computes what the bare model
computes, so the generated tokens must be equal: the ``same tokens`` column):

* ``keep_all (pre-LLM)``: ``encoder: hf_vision, compress: [random_keep, keep: 1.0]``;
* ``fastv keep 1.0 (in-LLM)``: ``llm: [fastv, layer: 2, keep: 1.0]`` (the
  engine's hooks run between decoder layers at every step).

Decode time is measured the same way, from outside, for the bare model and for
``apply``: one ``generate`` of ``--new-tokens`` tokens and one of a single
token (prefill plus the first token), decode ms per token = (t_N - t_1) /
(N - 1).  Each round times every path in turn (bare, then each pipeline, the
order rotating per round), so a drift in machine load hits all alike; the
table gives min / median / max over ``--rounds`` rounds, each round's time the
median of ``--repeats`` calls.  Overhead = apply's median - bare's median
(ms per token), and the same of the minima (on a busy machine load only ever
inflates a time, so the minima are the cleaner pair); paired ratio = the
median over rounds of apply's time / bare's time in the same round.

    python benchmarks/hf_decode_overhead.py                  # 1 thread, 64 new tokens, 11 rounds
    python benchmarks/hf_decode_overhead.py --rounds 15 --repeats 5 --out out/hf_decode_overhead.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from _timing import time_ms

import arrcoc

IMAGE, PAD, BOS = 199, 0, 1  # as tests/integrations/tiny_models.py
PIPELINES = {
    "keep_all (pre-LLM)": {"name": "keep_all", "encoder": {"use": "hf_vision"},
                           "compress": [{"use": "random_keep", "keep": 1.0}]},
    "fastv keep 1.0 (in-LLM)": {"name": "fastv_keep_all", "encoder": {"use": "hf_vision"},
                                "llm": [{"use": "fastv", "layer": 2, "keep": 1.0}]},
}


def tiny_llava(layers: int, width: int):
    """The tiny LLaVA-1.5 of ``tests/integrations/tiny_models.py`` (decoder ``layers`` x ``width``), fp32."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=112, patch_size=14)
    text = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                       num_attention_heads=max(1, width // 16), num_key_value_heads=max(1, width // 32),
                       vocab_size=200, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE)
    return LlavaForConditionalGeneration(config).eval().to(torch.float32)


def prompt(pre: int = 5, post: int = 10) -> dict:
    """``bos, pre text tokens, 64 x <image>, post question tokens``, batch 1, with seeded pixels."""
    ids = torch.tensor([[BOS, *range(5, 5 + pre), *[IMAGE] * 64, *range(30, 30 + post)]])
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (tiny_models.py: 4)")
    parser.add_argument("--width", type=int, default=64, help="decoder width (tiny_models.py: 64)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (min / median / max over them)")
    parser.add_argument("--repeats", type=int, default=3, help="generate calls per path and round (their median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="Write the table (markdown) here too.")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode = the tokens after the first)")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = tiny_llava(args.layers, args.width)
    inputs = prompt()

    def generate(n: int) -> torch.Tensor:
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def decode_ms_per_token() -> float:
        long = time_ms(lambda: generate(args.new_tokens), args.repeats, device)
        short = time_ms(lambda: generate(1), args.repeats, device)
        return (long - short) / (args.new_tokens - 1)

    paths = ["bare", *PIPELINES]
    per_token: dict[str, list[float]] = {path: [] for path in paths}
    with torch.inference_mode():
        reference = generate(args.new_tokens)
        same = {}
        for name, spec in PIPELINES.items():
            with arrcoc.hf.apply(model, spec):
                same[name] = torch.equal(generate(args.new_tokens), reference)
        for round_index in range(args.rounds):
            shift = round_index % len(paths)
            for path in paths[shift:] + paths[:shift]:
                if path == "bare":
                    per_token[path].append(decode_ms_per_token())
                else:
                    with arrcoc.hf.apply(model, PIPELINES[path]):
                        per_token[path].append(decode_ms_per_token())

    bare = statistics.median(per_token["bare"])
    title = (f"decode overhead of arrcoc.hf.apply: tiny LLaVA ({args.layers} layers x {args.width}), batch 1, "
             f"greedy, {args.new_tokens} new tokens, cpu, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), arrcoc from {Path(arrcoc.__file__).resolve().parent}")
    bare_min = min(per_token["bare"])
    columns = ["path", "ms/token min", "ms/token median", "ms/token max", "overhead median",
               "overhead min", "paired ratio", "same tokens"]
    rows = []
    for path in paths:
        times = per_token[path]
        median = statistics.median(times)
        paired = statistics.median(t / b for t, b in zip(times, per_token["bare"]))
        rows.append([path, f"{min(times):.3f}", f"{median:.3f}", f"{max(times):.3f}",
                     "-" if path == "bare" else f"{median - bare:+.3f}",
                     "-" if path == "bare" else f"{min(times) - bare_min:+.3f}",
                     "-" if path == "bare" else f"{paired:.3f}",
                     "-" if path == "bare" else ("yes" if same[path] else "no")])
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 150)).print(table)
    note = (f"Overheads in ms / token; decode ms / token = (generate {args.new_tokens} - generate 1) / "
            f"{args.new_tokens - 1}, each the median of {args.repeats} calls; min / median / max over {args.rounds} "
            "interleaved rounds.")
    print(note)
    if args.out:
        lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + f"\n\n{note}\n")


if __name__ == "__main__":
    main()
