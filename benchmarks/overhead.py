"""Framework overhead and ToMe throughput on a timm ViT (random weights, CPU or GPU).

1. Bare ``model.forward_features(x)`` vs the same model through
   ``arrcoc.load_pipeline(...)(pixels)`` with no compressor (``layer: -1,
   norm: true``, so both compute the same thing): the framework overhead in %.
2. ToMe inside the encoder (``in_blocks: {use: tome, r: R}``) for several r:
   images per second and speed-up over r = 0.

    python benchmarks/overhead.py                  # vit_base_patch16_224, batch 8
    python benchmarks/overhead.py --model vit_small_patch16_224 --batch 16 --repeats 5
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from _timing import time_ms

import arrcoc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, nargs="+", default=[0, 4, 8, 13])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    console = Console()

    encoder = {"use": "timm_vit", "model": args.model, "layer": -1, "norm": True}
    bare_pipe = arrcoc.load_pipeline({"name": "bare", "encoder": encoder}, device=device)
    model = bare_pipe.encoder.model
    pixels = torch.rand(args.batch, 3, *bare_pipe.encoder.input_size, device=device)
    model_input = bare_pipe.encoder.preprocess(pixels)

    with torch.inference_mode():
        reference = model.forward_features(model_input)
        ours = bare_pipe(pixels)
    max_diff = (reference[:, 1:] - ours.tokens).abs().max().item() if ours.cls is not None else \
        (reference - ours.tokens).abs().max().item()

    def bare_plain() -> None:
        with torch.inference_mode():
            model.forward_features(model_input)

    # Interleave the two measurements so that drift in machine load hits both alike.
    t_bare, t_pipe = [], []
    for _ in range(3):
        t_bare.append(time_ms(bare_plain, args.repeats, device, warmup=args.warmup) / 1e3)
        t_pipe.append(time_ms(lambda: bare_pipe(pixels), args.repeats, device, warmup=args.warmup) / 1e3)
    tb, tp = min(t_bare), min(t_pipe)
    table = Table(title=f"framework overhead: {args.model}, batch {args.batch}, {device} "
                        f"({torch.get_num_threads()} threads)")
    table.add_column("path")
    table.add_column("ms / batch", justify="right")
    table.add_column("images / s", justify="right")
    table.add_column("overhead", justify="right")
    table.add_row("timm forward_features", f"{tb * 1e3:.1f}", f"{args.batch / tb:.1f}", "-")
    table.add_row("arrcoc run (no compressor)", f"{tp * 1e3:.1f}", f"{args.batch / tp:.1f}", f"{(tp / tb - 1) * 100:+.2f}%")
    console.print(table)
    console.print(f"max |timm - arrcoc| = {max_diff:.2e}  (pixels -> normalise -> encode, trace, TokenState)")

    table = Table(title=f"ToMe inside {args.model}: batch {args.batch}, {device}")
    for column in ("r", "tokens out", "ms / batch", "images / s", "speed-up"):
        table.add_column(column, justify="right")
    base = None
    for r in args.r:
        spec = {"name": f"tome_r{r}", "encoder": {**encoder, "in_blocks": {"use": "tome", "r": r}}}
        pipe = arrcoc.load_pipeline(spec, device=device)
        out = pipe(pixels)
        t = time_ms(lambda: pipe(pixels), args.repeats, device, warmup=args.warmup) / 1e3
        base = base or t
        table.add_row(str(r), str(out.token_counts()[0]), f"{t * 1e3:.1f}", f"{args.batch / t:.1f}", f"{base / t:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
