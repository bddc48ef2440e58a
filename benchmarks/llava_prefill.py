"""Prefill cost of a LLaVA-1.5-shaped model with arrcoc pipelines applied inside it.

Random weights (no download): the CLIP-L/14-336 tower (24 layers, width 1024,
576 image tokens) and a Llama decoder scaled to the CPU (``--layers 8
--width 1024`` by default; ``--real`` builds the LLaVA-1.5-7B decoder in
bf16 on a GPU).  For each visual budget (576 / 288 / 144 / 64) and method:

* ``hand-built``: the unmodified model on a prompt with the first k
  features at the placeholders (what an oracle selection would cost);
* pre-LLM methods (``random_keep``, ``hired``, ``pool`` where its stride
  gives k, and issue 18's ``cdpruner``, ``divprune``, ``vispruner``,
  ``scope``, ``dart_pre`` keeping k) and in-LLM ``fastv`` (layer 2),
  ``dart`` (layer 2, k kept: ``count: exact``) and ``pyramiddrop`` (three
  stages at L/4, L/2, 3L/4, the official spacing, with the ratio whose last
  stage keeps k: 0.48 for 64, the official 0.5 gives 72) through
  ``arrcoc.hf.apply``; and, where the plugin's budget rule reaches it, the
  in-LLM methods set by ``budget_params`` for a **mean** of k visual tokens
  over the decoder layers (``(mean k)`` rows; on 8 layers a mean of 64 is out
  of reach for a method acting after layer 1).

``selection share``: the method's own stage time (the pre-LLM stages of
``run.report`` plus its in-LLM stage calls, ``run.report.llm_stage_ms``;
not the engine's work to compute the in-LLM signals) divided by the LLM
prefill time the reduction saves, all 576 tokens minus the hand-built prompt
of k (issue 18: under 2 % at 576 -> 64).

Columns: LLM prefill ms (the decoder stack alone, from ``run.report``),
end-to-end prefill ms (vision tower + stages + LLM + the last position's
logits, ``logits_to_keep=1`` as in ``generate``), prefill GFLOPs (analytic, docs/hf.md), KV-cache MiB, ``generate`` of
32 tokens ms.  Ratios: LLM prefill speed-up against all 576 tokens, and the
method overhead = end-to-end prefill / the hand-built prompt's (same kept
length).  Medians over ``--repeats``.

    python benchmarks/llava_prefill.py --out out/llava_prefill.md
    python benchmarks/llava_prefill.py --threads 1 --clock thread --ratios 64,144 --repeats 2   # interleaved, minima
    python benchmarks/llava_prefill.py --ratios 64 --methods cdpruner,scope,dart
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import arrcoc
from _prefill import Minima, emit, measure_round, ratio_table
from _timing import time_ms

import arrcoc.plugin

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


def pyramid_to(k: int, total: int, layers: int) -> dict:
    """PyramidDrop's official schedule scaled to ``layers``: stages before layers L/4, L/2, 3L/4 (8, 16, 24 of
    32), with the ratio whose third stage keeps ``k`` of ``total`` (``int(total * ratio**3) == k``)."""
    ratio = (k / total) ** (1 / 3)
    while int(total * ratio ** 3) < k:  # the cube root's rounding can land just under k
        ratio = math.nextafter(ratio, 2.0)
    stages = sorted({max(1, round(layers * s / 4)) for s in (1, 2, 3)})
    return {"use": "pyramiddrop", "layers": stages, "ratio": ratio}


def mean_budget(name: str, k: int, total: int, layers: int, params: dict | None = None) -> dict | None:
    """The in-LLM stage ``name`` set by its own budget rule for a mean of ``k`` visual tokens over ``layers``
    decoder layers (``budget_params``), or None where ``budget_bounds`` says the mean is out of reach."""
    cls = arrcoc.get_registry().get("compressor", name)
    context = arrcoc.plugin.BudgetContext(tokens=total, original=total, grid=(24, 24), layers=layers)
    params = dict(params or {})
    low, high = cls.budget_bounds(params, context)
    if not low - 1e-9 <= k <= high + 1e-9:
        print(f"{name}: a mean of {k} visual tokens over {layers} layers is out of reach ({low:.1f} .. {high:.1f})")
        return None
    return {"use": name, **cls.budget_params(params, float(k), context)}


def method_specs(k: int, layers: int, total: int = 576, only: str = "") -> dict[str, dict]:
    """Every method row at ``k`` visual tokens: name -> its stages (``compress:`` / ``llm:``)."""
    registered = {i.name for i in arrcoc.get_registry().list("compressor")}
    methods = {"random_keep": {"compress": [{"use": "random_keep", "keep": k}]},
               "hired": {"compress": [{"use": "hired", "keep": k}]},
               "fastv (layer 2)": {"llm": [{"use": "fastv", "layer": 2, "keep": k}]}}
    if total % k == 0 and int((total // k) ** 0.5) ** 2 == total // k:
        methods["pool"] = {"compress": [{"use": "pool", "stride": int((total // k) ** 0.5)}]}
    # Issue 18: the pre-LLM methods keep k (their official budgets are counts); VisPruner at its README share
    # of important tokens (0.75 at 64, the loader's 0.5 otherwise); DART keeps exactly k (count: exact; the
    # official count keeps 4 + 8 floor(k / 8), 68 for 64) so that the hand-built prompt of k is its equal.
    new = {
        "cdpruner": {"compress": [{"use": "cdpruner", "keep": k}]},
        "divprune": {"compress": [{"use": "divprune", "keep": k}]},
        "vispruner": {"compress": [{"use": "vispruner", "keep": k, "important_ratio": 0.75 if k <= 64 else 0.5}]},
        "scope": {"compress": [{"use": "scope", "keep": k}]},
        "dart_pre": {"compress": [{"use": "dart_pre", "keep": k, "count": "exact"}]},
        "dart (layer 2)": {"llm": [{"use": "dart", "layer": 2, "keep": k, "count": "exact"}]},
    }
    if "pyramiddrop" in registered:
        pyramid = pyramid_to(k, total, layers)
        new[f"pyramiddrop (layers {','.join(map(str, pyramid['layers']))}, ratio {pyramid['ratio']:.3f})"] = {
            "llm": [pyramid]}
    for name in ("dart", "pyramiddrop"):
        if name in registered:
            stage = mean_budget(name, k, total, layers)
            if stage is not None:
                new[f"{name} (mean {k}: {', '.join(f'{p}={v}' for p, v in stage.items() if p != 'use')})"] = {
                    "llm": [stage]}
    for name, stages in new.items():
        uses = {s["use"] for section in stages.values() for s in section}
        if uses <= registered:
            methods[name] = stages
        else:
            print(f"{name}: not registered, skipped")
    if only:
        wanted = only.split(",")
        methods = {name: stages for name, stages in methods.items() if name.split(" ")[0] in wanted}
    return methods


def use_thread_clock(args) -> None:
    """Make arrcoc's clock (``arrcoc.timing.clock``, behind every time in ``run.report``) and this script's read
    the calling thread's CPU time."""
    import time
    import types

    import arrcoc.timing

    if args.device != "cpu" or torch.get_num_threads() != 1:
        raise SystemExit("--clock thread: only on the CPU with --threads 1 (other threads' work would not count)")
    arrcoc.timing.time = types.SimpleNamespace(perf_counter=time.thread_time)
    global CLOCK
    CLOCK = time.thread_time


CLOCK = None  # set by --clock thread: the clock of this script's own timings (None: wall time)


def share_text(select_ms: float, share: float) -> str:
    """``"1.23 %"``, or empty for a row with no selection stage or no saving to divide by."""
    return "" if not select_ms or math.isnan(share) else f"{100 * share:.2f} %"


def timed(fn, repeats: int, device: str) -> float:
    """Median ms of ``repeats`` runs after one warm-up."""
    return time_ms(fn, repeats, torch.device(device), **({"clock": CLOCK} if CLOCK else {}))


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
    parser.add_argument("--ratios", default=None, metavar="K[,K]",
                        help="Only the decisive ratios (and the selection share) at K visual tokens, interleaved runs, "
                        "minima; several K comma-separated")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: every row)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: every time (run.report's stages and LLM prefill, the vision tower) is the calling "
                        "thread's CPU time, not wall time (CPU with --threads 1 only: all the work runs on that thread, "
                        "and other processes on a shared machine do not count)")
    parser.add_argument("--no-generate", action="store_true", help="skip the generate column (full table)")
    parser.add_argument("--out", default=None, help="Write the table (markdown) here too.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        use_thread_clock(args)
    dtype = torch.bfloat16 if args.real else torch.float32
    model = build_model(args.layers, args.width, args.real, args.device, dtype)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixels = torch.rand(1, 3, 336, 336, device=args.device, dtype=dtype)
    full = prompt(576, args.device)
    if args.ratios:
        return ratios(model, pixels, full, args)
    rows, base_llm = [], None
    for k in [int(b) for b in args.budgets.split(",")]:
        methods = {"hand-built": None, **method_specs(k, model.config.text_config.num_hidden_layers, 576,
                                                       args.methods)}
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
                        gen_ms = float("nan") if args.no_generate else timed(
                            lambda: model.generate(**short, **extra, max_new_tokens=args.new_tokens,
                                                   min_new_tokens=args.new_tokens, do_sample=False), 1, args.device)
                    hand_e2e, hand_llm, select_ms = e2e_ms, llm_ms, 0.0
                else:
                    spec = {"encoder": {"use": "timm_vit"}, **stages}
                    with arrcoc.hf.apply(model, spec) as run:
                        def once():
                            model(**full, pixel_values=pixels, logits_to_keep=1)
                            return run.report
                        llms, selects = [], []

                        def record():
                            report = once()
                            llms.append(report.llm_prefill_ms)
                            selects.append(report.stages_ms + sum(report.llm_stage_ms.values()))

                        e2e_ms = timed(record, args.repeats, args.device)
                        llm_ms, select_ms = statistics.median(llms[1:]), statistics.median(selects[1:])
                        report = run.report
                        gen_ms = float("nan") if args.no_generate else timed(
                            lambda: model.generate(**full, pixel_values=pixels, max_new_tokens=args.new_tokens,
                                                   min_new_tokens=args.new_tokens, do_sample=False), 1, args.device)
            if k == 576 and name == "hand-built":
                base_llm = llm_ms
            rows.append({
                "visual": k, "method": name, "llm_ms": llm_ms, "e2e_ms": e2e_ms,
                "gflops": report.prefill_flops / 1e9, "kv_mib": report.kv_cache_bytes / 2**20, "gen_ms": gen_ms,
                "speedup": (base_llm / llm_ms) if base_llm else float("nan"),
                "overhead": e2e_ms / hand_e2e if hand_e2e else float("nan"),
                "llm_overhead": llm_ms / hand_llm if hand_llm else float("nan"),
                "select_ms": select_ms,
                # the stage time over the LLM prefill time cutting 576 -> k saves (hand-built prompts)
                "share": select_ms / (base_llm - hand_llm) if base_llm and hand_llm and base_llm > hand_llm
                else float("nan"),
                "seen": f"{report.layer_visual[-1][0]} / {report.visual_tokens_mean:.1f}",
            })
            print(f"{k:4d} {name:16s} LLM {llm_ms:8.1f} ms  e2e {e2e_ms:8.1f} ms  selection {select_ms:8.2f} ms",
                  flush=True)
    head = ("| visual tokens | method | visual tokens (last layer / mean) | LLM prefill ms | LLM speed-up vs 576 | "
            "LLM overhead vs hand-built | e2e prefill ms | e2e overhead vs hand-built | selection ms | selection share "
            f"| prefill GFLOPs | KV MiB | generate {args.new_tokens} ms |"
            "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {r['visual']} | {r['method']} | {r['seen']} | {r['llm_ms']:.1f} | {r['speedup']:.2f}x | "
        f"{r['llm_overhead']:.3f} | {r['e2e_ms']:.1f} | {r['overhead']:.3f} | {r['select_ms']:.2f} | "
        f"{share_text(r['select_ms'], r['share'])} | "
        f"{r['gflops']:.1f} | {r['kv_mib']:.2f} | {r['gen_ms']:.0f} |"
        for r in rows
    ]
    machine = (f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"{'LLaVA-1.5-7B decoder bf16' if args.real else f'{args.layers} layers x {args.width} fp32'}")
    table = "\n".join(lines) + f"\n\n{machine}; medians of {args.repeats} runs after one warm-up.\n"
    emit(table, args.out)


def ratios(model, pixels, full, args) -> None:
    """LLM speed-up at K of 576, method overhead against a hand-built prompt of K and the selection share (see
    ``_prefill``), for each K of ``--ratios``."""
    layers = model.config.text_config.num_hidden_layers
    tables = []
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        vision = time_ms(lambda: model.model.get_image_features(pixel_values=pixels), args.repeats + 1,
                         torch.device(args.device), warmup=0, stat="min", **({"clock": CLOCK} if CLOCK else {}))
        for k in [int(v) for v in str(args.ratios).split(",")]:
            methods = method_specs(k, layers, 576, args.methods)
            minima = Minima()
            for round_ in range(args.repeats + 1):
                measure_round(minima, model, full, feats, prompt(k, args.device), k, methods,
                              {"pixel_values": pixels}, 576)
                print(f"K={k}: round {round_ + 1} of {args.repeats + 1} done", flush=True)
            tables.append(f"### 576 -> {k} visual tokens\n\n" + ratio_table(minima, vision, k, 576))
            emit("\n\n".join(tables), args.out)  # what is measured so far, in case the run is stopped
    table = "\n\n".join(tables) + (
        f"\n\nvision tower (min) {vision:.1f} ms; {torch.get_num_threads()} thread(s), "
        f"{'CPU time of the calling thread' if CLOCK else 'wall time'}; "
        f"{'LLaVA-1.5-7B decoder bf16' if args.real else f'{args.layers} layers x {args.width} fp32'}; minima over "
        f"{args.repeats + 1} interleaved rounds.\n")
    emit(table, args.out)


if __name__ == "__main__":
    main()
