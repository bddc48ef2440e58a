"""Prefill cost of a LLaVA-1.5-shaped model with arrcoc pipelines applied inside it.

Random weights (no download): the CLIP-L/14-336 tower (24 layers, width 1024,
576 image tokens) and a Llama decoder scaled to the CPU (``--layers 8
--width 1024`` by default; ``--real`` builds the LLaVA-1.5-7B decoder in
bf16 on a GPU).  For each visual budget (576 / 288 / 144 / 64) and method:

* ``hand-built``: the unmodified model on a prompt with the first k
  features at the placeholders (what an oracle selection would cost);
* pre-LLM methods (``random_keep``, ``hired``, ``pool`` where its stride
  gives k) and in-LLM ``fastv`` (layer 2) through ``arrcoc.hf.apply``.

Columns: LLM prefill ms (the decoder stack alone, from ``run.report``),
end-to-end prefill ms (vision tower + stages + LLM + the last position's
logits, ``logits_to_keep=1`` as in ``generate``), prefill GFLOPs (analytic, docs/hf.md), KV-cache MiB, ``generate`` of
32 tokens ms.  Ratios: LLM prefill speed-up against all 576 tokens, and the
method overhead = end-to-end prefill / the hand-built prompt's (same kept
length).  Medians over ``--repeats``.

    python benchmarks/llava_prefill.py --out out/llava_prefill.md
"""

from __future__ import annotations

import argparse
import statistics

import torch

import arrcoc
from _prefill import Minima, emit, measure_round, ratio_table
from _timing import time_ms

PROMPT_TEXT = 40  # text tokens around the image (system prompt + question), as in LLaVA-1.5's template


def build_model(layers: int, width: int, real: bool, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768)
    if real:  # LLaVA-1.5-7B's decoder
        tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, pad_token_id=0)
    else:
        tc = LlamaConfig(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=width // 64, num_key_value_heads=width // 64, vocab_size=32064,
                         pad_token_id=0)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=32000)
    return LlavaForConditionalGeneration(cfg).to(device=device, dtype=dtype).eval()


def prompt(n_image: int, device: str) -> dict:
    pre = list(range(100, 100 + 35))  # "A chat between ... USER:" (35 tokens, as LLaVA-1.5's system prompt)
    post = list(range(200, 200 + PROMPT_TEXT - len(pre)))
    ids = torch.tensor([[1, *pre, *([32000] * n_image), *post]], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timed(fn, repeats: int, device: str) -> float:
    """Median ms of ``repeats`` runs after one warm-up."""
    return time_ms(fn, repeats, torch.device(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--real", action="store_true", help="LLaVA-1.5-7B decoder shape (needs a GPU), bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="576,288,144,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ratios", type=int, default=None, metavar="K",
                        help="Only the two decisive ratios at K visual tokens, interleaved runs, minima")
    parser.add_argument("--out", default=None, help="Write the table (markdown) here too.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.real else torch.float32
    model = build_model(args.layers, args.width, args.real, args.device, dtype)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixels = torch.rand(1, 3, 336, 336, device=args.device, dtype=dtype)
    full = prompt(576, args.device)
    if args.ratios:
        return ratios(model, pixels, full, args)
    rows, base_llm = [], None
    for k in [int(b) for b in args.budgets.split(",")]:
        methods = {"hand-built": None, "random_keep": {"compress": [{"use": "random_keep", "keep": k}]},
                   "hired": {"compress": [{"use": "hired", "keep": k}]},
                   "fastv (layer 2)": {"llm": [{"use": "fastv", "layer": 2, "keep": k}]}}
        if 576 % k == 0 and int((576 // k) ** 0.5) ** 2 == 576 // k:
            methods["pool"] = {"compress": [{"use": "pool", "stride": int((576 // k) ** 0.5)}]}
        hand_e2e = hand_llm = None
        for name, stages in methods.items():
            with torch.inference_mode():
                if stages is None:
                    feats = model.model.get_image_features(pixel_values=pixels).pooler_output[0][:k]
                    short = prompt(k, args.device)
                    extra = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[feats])}}

                    def e2e():
                        f = model.model.get_image_features(pixel_values=pixels).pooler_output[0][:k]
                        model(**short, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[f])},
                              logits_to_keep=1)

                    with arrcoc.hf.apply(model, {"encoder": {"use": "timm_vit"}}) as run:
                        llms = []
                        timed(lambda: llms.append(model(**short, **extra, logits_to_keep=1) and
                                                  run.report.llm_prefill_ms), args.repeats, args.device)
                        llm_ms = statistics.median(llms[1:])
                        report = run.report
                        e2e_ms = timed(e2e, args.repeats, args.device)
                        gen_ms = timed(lambda: model.generate(**short, **extra, max_new_tokens=args.new_tokens,
                                                              min_new_tokens=args.new_tokens, do_sample=False),
                                       1, args.device)
                    hand_e2e, hand_llm = e2e_ms, llm_ms
                else:
                    spec = {"encoder": {"use": "timm_vit"}, **stages}
                    with arrcoc.hf.apply(model, spec) as run:
                        def once():
                            model(**full, pixel_values=pixels, logits_to_keep=1)
                            return run.report
                        llms = []
                        e2e_ms = timed(lambda: llms.append(once().llm_prefill_ms), args.repeats, args.device)
                        llm_ms = statistics.median(llms[1:])
                        report = run.report
                        gen_ms = timed(lambda: model.generate(**full, pixel_values=pixels,
                                                              max_new_tokens=args.new_tokens,
                                                              min_new_tokens=args.new_tokens, do_sample=False),
                                       1, args.device)
            if k == 576 and name == "hand-built":
                base_llm = llm_ms
            rows.append({
                "visual": k, "method": name, "llm_ms": llm_ms, "e2e_ms": e2e_ms,
                "gflops": report.prefill_flops / 1e9, "kv_mib": report.kv_cache_bytes / 2**20, "gen_ms": gen_ms,
                "speedup": (base_llm / llm_ms) if base_llm else float("nan"),
                "overhead": e2e_ms / hand_e2e if hand_e2e else float("nan"),
                "llm_overhead": llm_ms / hand_llm if hand_llm else float("nan"),
            })
            print(f"{k:4d} {name:16s} LLM {llm_ms:8.1f} ms  e2e {e2e_ms:8.1f} ms", flush=True)
    head = ("| visual tokens | method | LLM prefill ms | LLM speed-up vs 576 | LLM overhead vs hand-built "
            f"| e2e prefill ms | e2e overhead vs hand-built | prefill GFLOPs | KV MiB | generate {args.new_tokens} ms |"
            "\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {r['visual']} | {r['method']} | {r['llm_ms']:.1f} | {r['speedup']:.2f}x | {r['llm_overhead']:.3f} | "
        f"{r['e2e_ms']:.1f} | {r['overhead']:.3f} | {r['gflops']:.1f} | {r['kv_mib']:.2f} | {r['gen_ms']:.0f} |"
        for r in rows
    ]
    machine = (f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"{'LLaVA-1.5-7B decoder bf16' if args.real else f'{args.layers} layers x {args.width} fp32'}")
    table = "\n".join(lines) + f"\n\n{machine}; medians of {args.repeats} runs after one warm-up.\n"
    emit(table, args.out)


def ratios(model, pixels, full, args) -> None:
    """LLM speed-up at K of 576 and method overhead against a hand-built prompt of K (see ``_prefill``)."""
    k = args.ratios
    methods = {"random_keep": {"compress": [{"use": "random_keep", "keep": k}]},
               "hired": {"compress": [{"use": "hired", "keep": k}]},
               "fastv (layer 2)": {"llm": [{"use": "fastv", "layer": 2, "keep": k}]}}
    minima = Minima()
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        vision = time_ms(lambda: model.model.get_image_features(pixel_values=pixels), args.repeats + 1,
                         torch.device(args.device), warmup=0, stat="min")
        for _ in range(args.repeats + 1):
            measure_round(minima, model, full, feats, prompt(k, args.device), k, methods,
                          {"pixel_values": pixels}, 576)
    table = ratio_table(minima, vision, k, 576) + (
        f"\n\nvision tower (min) {vision:.1f} ms; {torch.get_num_threads()} thread(s); minima over "
        f"{args.repeats + 1} interleaved rounds.\n")
    emit(table, args.out)


if __name__ == "__main__":
    main()
