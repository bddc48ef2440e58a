"""Prefill cost of a VLM with arrcoc pipelines applied inside it, one script for every model family (``--family``).

Random weights built from configs (no download), realistic widths, few
layers (scaled to the CPU):

* ``llava`` (default): the CLIP-L/14-336 tower (24 layers, width 1024, 576
  image tokens) and a Llama decoder (``--layers 8 --width 1024``; ``--real``
  builds the LLaVA-1.5-7B decoder in bf16 on a GPU).  Without ``--ratios``:
  the full table, for each visual budget (576 / 288 / 144 / 64) and method
  (below), medians of ``--repeats``; with ``--ratios K``: the decisive ratios.
* ``qwen2_vl``: its tower (width 640, 8 blocks) on a 448 px image, 256 merged
  tokens; ``qwen3_vl``: the 8B's tower width 1152, patch 16, 3 blocks, each
  giving a DeepStack plane, on a 512 px image, 256 merged tokens;
  ``internvl``: InternViT width 1024 (2 blocks), an 896 x 448 image cut into
  2 tiles and the thumbnail, pixel-shuffled to 256 tokens each (768);
  ``llava_onevision``: SigLIP-so400m width 1152 (2 blocks), a 640 x 480
  photo, base view and 2 x 2 crops (AnyRes-max, the released pinpoints),
  2929 visual tokens packed; ``gemma3``: SigLIP width 1152 (1 block) at
  896 px, 4096 patches pooled to 256 tokens.  Decoders ``--layers 8 --width
  1024`` (the family's own: Qwen2 / Qwen3 with GQA, Gemma 3 with its sliding
  and global layers); 40 text tokens around the image.  These run the ratios
  only, at ``--ratio`` (0.25) of the visual tokens.

The ratios (``_prefill``): interleaved rounds, the minimum of each
component; the LLM prefill speed-up against all visual tokens, and the
end-to-end overhead of each method (its whole call from the pixels) against
a hand-built prompt of the **same length** (the vision tower, then the
unmodified model on a prompt carrying the first n features, built as the
family's tests build it: Qwen's grid of n placeholders with the model's
positions (Qwen3-VL: the full prompt's positions of the kept cells, as
test_hf_qwen3_vl passes them, and every DeepStack plane's first n rows); Gemma 3's
image block with its ``token_type_ids``).  Every pre-LLM method of the
support matrix is tried at 25 % of each view's (tile's, image's) tokens
(PruMerge and PruMerge+ at their official adaptive count); the ones the
family refuses are listed under the table; ``fastv`` at layer 2
keeps 25 % in the LLM.  A pre-LLM method's reference is a hand-built prompt of
the length it hands the LLM (on LLaVA-OneVision the newlines of the rows
that keep a token, and merging methods' counts, vary by method).

LLaVA rows: ``hand-built`` (the unmodified model on a prompt with the first
k features at the placeholders); pre-LLM ``random_keep``, ``hired``,
``pool`` where its stride gives k, and issue 18's ``cdpruner``,
``divprune``, ``vispruner``, ``scope``, ``dart_pre`` keeping k; in-LLM
``fastv`` (layer 2), ``dart`` (layer 2, k kept: ``count: exact``) and
``pyramiddrop`` (three stages at L/4, L/2, 3L/4, the official spacing, with
the ratio whose last stage keeps k: 0.48 for 64, the official 0.5 gives 72);
and, where the plugin's budget rule reaches it, the in-LLM methods set by
``budget_params`` for a **mean** of k visual tokens over the decoder layers
(``(mean k)`` rows; on 8 layers a mean of 64 is out of reach for a method
acting after layer 1).

``selection share``: the method's own stage time (the pre-LLM stages of
``run.report`` plus its in-LLM stage calls, ``run.report.llm_stage_ms``;
not the engine's work to compute the in-LLM signals) divided by the LLM
prefill time the reduction saves, all visual tokens minus the hand-built
prompt of k (issue 18: under 2 % at 576 -> 64).

LLaVA full-table columns: LLM prefill ms (the decoder stack alone, from
``run.report``), end-to-end prefill ms (vision tower + stages + LLM + the
last position's logits, ``logits_to_keep=1`` as in ``generate``), prefill
GFLOPs (analytic, docs/hf.md), KV-cache MiB, ``generate`` of 32 tokens ms.

    python benchmarks/prefill.py --out out/llava_prefill.md
    python benchmarks/prefill.py --threads 1 --clock thread --ratios 64,144 --repeats 2   # interleaved, minima
    python benchmarks/prefill.py --ratios 64 --methods cdpruner,scope,dart
    python benchmarks/prefill.py --family qwen3_vl --threads 1 --clock thread --repeats 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch

import arrcoc
from _prefill import Minima, Setup, emit, measure_round, probe, ratio_table, thread_clock
from _timing import time_ms

import arrcoc.plugin

PROMPT_TEXT = 40  # text tokens around the image (system prompt + question), as in LLaVA-1.5's template


def build_llava_model(layers: int, width: int, real: bool, device: str, dtype: torch.dtype):
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


def llava_prompt(n_image: int, device: str) -> dict:
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


def llava_methods(k: int, layers: int, total: int = 576, only: str = "") -> dict[str, dict]:
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


CLOCK = None  # set by --clock thread: the clock of this script's own timings (None: wall time)


def share_text(select_ms: float, share: float) -> str:
    """``"1.23 %"``, or empty for a row with no selection stage or no saving to divide by."""
    return "" if not select_ms or math.isnan(share) else f"{100 * share:.2f} %"


def timed(fn, repeats: int, device: str) -> float:
    """Median ms of ``repeats`` runs after one warm-up."""
    return time_ms(fn, repeats, torch.device(device), **({"clock": CLOCK} if CLOCK else {}))


def llava_table(args) -> None:
    """LLaVA-1.5 shape, every budget of ``--budgets``: the full table (medians; noisier than the ratios)."""
    dtype = torch.bfloat16 if args.real else torch.float32
    model = build_llava_model(args.layers, args.width, args.real, args.device, dtype)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixels = torch.rand(1, 3, 336, 336, device=args.device, dtype=dtype)
    full = llava_prompt(576, args.device)
    rows, base_llm = [], None
    for k in [int(b) for b in args.budgets.split(",")]:
        methods = {"hand-built": None, **llava_methods(k, model.config.text_config.num_hidden_layers, 576,
                                                       args.methods)}
        hand_e2e = hand_llm = None
        for name, stages in methods.items():
            with torch.inference_mode():
                if stages is None:
                    feats = model.model.get_image_features(pixel_values=pixels).pooler_output[0][:k]
                    short = llava_prompt(k, args.device)
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



# ------------------------------------------------------------------------------------- the ratio rounds, per family
def _features(pooler: Any) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooler)}}


def _text(pre: int = 14, post: int = 24) -> tuple[list[int], list[int]]:
    """System prompt and question around the image: ``pre + post`` text tokens (40 with the family's own)."""
    return list(range(100, 100 + pre)), list(range(200, 200 + post))


def _ids(row: list[int], device: str, **extra: Any) -> dict:
    ids = torch.tensor([row], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def llava_setup(args) -> Setup:
    dtype = torch.bfloat16 if args.real else torch.float32
    model = build_llava_model(args.layers, args.width, args.real, args.device, dtype)
    pixels = torch.rand(1, 3, 336, 336, device=args.device, dtype=dtype)
    encode = lambda: model.model.get_image_features(pixel_values=pixels).pooler_output[0]  # noqa: E731
    return Setup(model, llava_prompt(576, args.device), {"pixel_values": pixels}, 576, encode,
                 lambda n, f: {**llava_prompt(n, args.device), **_features([f[:n]])},
                 f"LLaVA-1.5 shape: CLIP-L/14-336 tower (24 blocks x 1024), "
                 f"{'LLaVA-1.5-7B decoder bf16' if args.real else f'Llama decoder {args.layers} x {args.width} fp32'}, "
                 f"576 visual + 40 text tokens")


def _qwen_grid(n: int) -> list[int]:
    """A ``(1, 2h, 2w)`` patch grid of ``n`` merged tokens, ``h`` the largest divisor of ``n`` up to its root."""
    h = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return [1, 2 * h, 2 * (n // h)]


QWEN_IMAGE, QWEN_START, QWEN_END = 151655, 151652, 151653


def _qwen_prompt(grid: list[int], device: str) -> dict:
    n = grid[0] * grid[1] * grid[2] // 4
    pre, post = _text()
    out = _ids([1, *pre, QWEN_START, *[QWEN_IMAGE] * n, QWEN_END, *post], device,
               image_grid_thw=torch.tensor([grid], device=device))
    out["mm_token_type_ids"] = (out["input_ids"] == QWEN_IMAGE).int()
    return out


def qwen2_vl_setup(args) -> Setup:
    """Qwen2-VL: its tower (width 640 here, 2x2 merging, patch 14) on a 448 px image (32 x 32 patches -> 256 merged
    tokens); the hand-built prompt: an ``h x w`` grid of ``n`` placeholders (positions by the model)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    width, heads = args.width, args.width // 64
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=args.vision_depth or 8, embed_dim=640, hidden_size=width, num_heads=10, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=151936, hidden_size=width, intermediate_size=int(width * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],  # head_dim 64
                                          "rope_theta": 1000000.0}),
        image_token_id=QWEN_IMAGE, video_token_id=151656, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END)
    model = Qwen2VLForConditionalGeneration(cfg).to(args.device).eval()
    full = _qwen_prompt([1, 32, 32], args.device)
    pixels = torch.randn(32 * 32, 3 * 2 * 14 * 14, device=args.device)
    encode = lambda: model.model.get_image_features(pixels, full["image_grid_thw"]).pooler_output[0]  # noqa: E731
    return Setup(model, full, {"pixel_values": pixels}, 256, encode,
                 lambda n, f: {**_qwen_prompt(_qwen_grid(n), args.device), **_features([f[:n]])},
                 f"Qwen2-VL shape: vision {args.vision_depth or 8} blocks x 640, decoder {args.layers} x {width}, "
                 f"fp32, 256 visual + 40 text tokens")


def qwen3_vl_setup(args) -> Setup:
    """Qwen3-VL (the 8B's tower width 1152, patch 16, 2x2 merging, DeepStack from every one of the
    ``--vision-depth`` blocks into the first decoder layers) on a 512 px image (32 x 32 patches -> 256 merged
    tokens); the hand-built prompt carries the first ``n`` rows of the features and of every DeepStack plane."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    torch.manual_seed(0)
    depth, width = args.vision_depth or 3, args.width
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=depth, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=width,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=list(range(min(depth, 3)))),
        text_config=dict(vocab_size=151936, hidden_size=width, intermediate_size=int(width * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=width // 64,
                         num_key_value_heads=width // 128, head_dim=64, bos_token_id=1, eos_token_id=None,
                         pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [12, 10, 10],  # 8B's [24, 20, 20]
                                          "mrope_interleaved": True, "rope_theta": 5000000.0}),
        image_token_id=QWEN_IMAGE, video_token_id=151656, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END)
    model = Qwen3VLForConditionalGeneration(cfg).to(args.device).eval()
    full = _qwen_prompt([1, 32, 32], args.device)
    pixels = torch.randn(32 * 32, 3 * 2 * 16 * 16, device=args.device)
    encode = lambda: model.model.get_image_features(pixels, full["image_grid_thw"])  # noqa: E731

    with torch.inference_mode():  # the model's own positions of the full prompt (test_hf_qwen3_vl's reference)
        positions, _ = model.model.get_rope_index(full["input_ids"], full["mm_token_type_ids"],
                                                  full["image_grid_thw"], attention_mask=full["attention_mask"])
    image_columns = (full["input_ids"][0] == QWEN_IMAGE).nonzero().flatten()

    def hand(n: int, out: Any) -> dict:
        """As test_hf_qwen3_vl's ``shortened_logits``: ``n`` placeholders at the full prompt's positions of the
        first ``n`` image cells (3-D rows gathered, the text row renumbered), every DeepStack plane's first ``n``
        rows."""
        L = full["input_ids"].shape[1]
        keep = torch.ones(L, dtype=torch.bool, device=args.device)
        keep[image_columns[n:]] = False
        ids = full["input_ids"][:, keep]
        text_row = torch.arange(ids.shape[1], device=args.device)[None, None]
        planes = [[plane[0][:n]] for plane in out.deepstack_features]
        outputs = BaseModelOutputWithDeepstackFeatures(pooler_output=[out.pooler_output[0][:n]],
                                                       deepstack_features=planes)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "position_ids": torch.cat([text_row, positions[:, :, keep]]),
                "mm_token_type_ids": (ids == QWEN_IMAGE).int(), "mm_encoder_outputs": {"image": outputs}}

    return Setup(model, full, {"pixel_values": pixels}, 256, encode, hand,
                 f"Qwen3-VL shape: vision {depth} blocks x 1152 (DeepStack planes from blocks "
                 f"{list(range(min(depth, 3)))}), decoder {args.layers} x {width} (GQA, head_dim 64), fp32, "
                 f"512 px image: 256 visual + 40 text tokens")


def internvl_setup(args) -> Setup:
    """InternVL3 (InternViT-300M's width 1024 at 448 px, patch 14: 32 x 32 patches per tile, pixel-shuffled to 256
    tokens; Qwen2 decoder): an 896 x 448 image, 2 tiles and the thumbnail, 768 visual tokens; the hand-built
    prompt: ``<img>``, ``n`` placeholders, ``</img>`` (tiles' kept runs are contiguous: one run)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    torch.manual_seed(0)
    width, tiles = args.width, 3
    image, img_start, img_end = 151667, 151665, 151666
    vision = InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=args.vision_depth or 2,
                                  num_attention_heads=16, image_size=448, patch_size=14)
    text = Qwen2Config(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=args.layers,
                       num_attention_heads=width // 64, num_key_value_heads=width // 128, vocab_size=151674,
                       pad_token_id=0, bos_token_id=1, eos_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    model = InternVLForConditionalGeneration(InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image, image_seq_length=256,
        downsample_ratio=0.5)).to(args.device).eval()
    pre, post = _text(13, 25)

    def prompt(n: int) -> dict:
        return _ids([1, *pre, img_start, *[image] * n, img_end, *post], args.device)

    pixels = torch.randn(tiles, 3, 448, 448, device=args.device)
    encode = lambda: model.model.get_image_features(pixel_values=pixels).pooler_output  # noqa: E731
    return Setup(model, prompt(256 * tiles), {"pixel_values": pixels}, 256 * tiles, encode,
                 lambda n, f: {**prompt(n), **_features(f.flatten(0, 1)[:n][None])},
                 f"InternVL3 shape: InternViT {args.vision_depth or 2} blocks x 1024, 2 tiles + thumbnail of 448 px, "
                 f"decoder (Qwen2) {args.layers} x {width} fp32, {256 * tiles} visual + 40 text tokens")


def llava_onevision_setup(args) -> Setup:
    """LLaVA-OneVision (SigLIP-so400m's width 1152 at 384 px, patch 14: 27 x 27 tokens per view; Qwen2 decoder;
    the released pinpoints, 384 .. 2304 px, and ``anyres_max_9``): a 640 x 480 photo, crop grid 2 x 2, base view
    and 4 crops (the stitched 54 x 54 grid unpadded to 40 rows, not pooled: under 9 views), one newline per row;
    the hand-built prompt: ``n`` placeholders carrying the first ``n`` rows of the model's packed sequence."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    from transformers import SiglipVisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    torch.manual_seed(0)
    width, image = args.width, 151646
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.vision_depth or 2,
                                num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=args.layers,
                       num_attention_heads=width // 64, num_key_value_heads=width // 128, vocab_size=152000,
                       pad_token_id=0, bos_token_id=1, eos_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=image, video_token_id=151647,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full",
        vision_feature_layer=-1)).to(args.device).eval()
    sizes = torch.tensor([[480, 640]], device=args.device)
    views = image_size_to_num_patches(sizes[0].tolist(), pinpoints, 384)
    pixels = torch.randn(1, views, 3, 384, 384, device=args.device)
    image_inputs = {"pixel_values": pixels, "image_sizes": sizes,
                    "batch_num_images": torch.ones(1, dtype=torch.long, device=args.device)}
    encode = lambda: model.model.get_image_features(pixels, sizes).pooler_output[0]  # noqa: E731
    with torch.inference_mode():
        total = int(encode().shape[0])  # the model's own packing: base view, unpadded crops, newlines
    pre, post = _text()

    def prompt(n: int) -> dict:
        return _ids([1, *pre, *[image] * n, *post], args.device)

    return Setup(model, prompt(total), image_inputs, total, encode,
                 lambda n, f: {**prompt(n), **_features([f[:n]])},
                 f"LLaVA-OneVision shape: SigLIP {args.vision_depth or 2} blocks x 1152 at 384 px, a 640 x 480 image "
                 f"(base view + 2 x 2 crops), decoder (Qwen2) {args.layers} x {width} fp32, {total} visual + 38 "
                 f"text tokens")


def gemma3_setup(args) -> Setup:
    """Gemma 3 (SigLIP-so400m's width 1152 at 896 px, patch 14: 64 x 64 patches average-pooled to 256 tokens; the
    decoder's five sliding-window layers to one global, window 1024): the hand-built prompt ``<start_of_image>``,
    ``n`` placeholders, ``<end_of_image>`` with ``token_type_ids`` 1 on them (one bidirectional block), as the
    family's tests build it."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    width = args.width
    boi, eoi, image = 255, 256, 257
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.vision_depth or 1,
                                num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)
    text = Gemma3TextConfig(vocab_size=32064, hidden_size=width, intermediate_size=int(width * 2.6875),
                            num_hidden_layers=args.layers, num_attention_heads=width // 128, num_key_value_heads=
                            max(1, width // 256), head_dim=128, query_pre_attn_scalar=128, sliding_window=1024,
                            pad_token_id=0, bos_token_id=2, eos_token_id=None)
    model = Gemma3ForConditionalGeneration(Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=256, boi_token_index=boi, eoi_token_index=eoi,
        image_token_index=image)).to(args.device).eval()
    pre, post = _text(13, 25)

    def prompt(n: int) -> dict:
        out = _ids([2, *pre, boi, *[image] * n, eoi, *post], args.device)
        out["token_type_ids"] = (out["input_ids"] == image).long()
        return out

    pixels = torch.randn(1, 3, 896, 896, device=args.device)
    encode = lambda: model.model.get_image_features(pixels).pooler_output  # noqa: E731
    types = "".join("S" if t == "sliding_attention" else "F" for t in text.layer_types)
    return Setup(model, prompt(256), {"pixel_values": pixels}, 256, encode,
                 lambda n, f: {**prompt(n), **_features(f[:, :n])},
                 f"Gemma 3 shape: SigLIP {args.vision_depth or 1} block(s) x 1152 at 896 px (4096 patches pooled to "
                 f"256), decoder {args.layers} x {width} fp32 (layer types {types}: S sliding window 1024, F global), "
                 f"256 visual + 40 text tokens")


SETUPS = {"llava": llava_setup, "qwen2_vl": qwen2_vl_setup, "qwen3_vl": qwen3_vl_setup, "internvl": internvl_setup,
          "llava_onevision": llava_onevision_setup, "gemma3": gemma3_setup}


def tome_rounds(tokens: int, keep: int) -> list[int]:
    """ToMe's ``r`` per round (after the encoder) from ``tokens`` to ``keep``: at most half per round (bipartite
    matching pairs a token of one half with one of the other)."""
    rounds = []
    while tokens > keep:
        r = min(tokens // 2, tokens - keep)
        rounds.append(r)
        tokens -= r
    return rounds


def family_methods(per_view: int, k: int, ratio: float = 0.25) -> dict[str, dict]:
    """Every pre-LLM method of the support matrix at ``ratio`` of each view's (tile's, image's) ``per_view``
    tokens (PruMerge(+): their adaptive count), and FastV at layer 2 keeping ``k``; the ones a family refuses are
    reported by :func:`probe`."""
    r = tome_rounds(per_view, int(per_view * ratio))
    pre = {
        "random_keep": {"use": "random_keep", "keep": ratio},
        "pool (stride 2)": {"use": "pool", "stride": 2},
        "tome (keys)": {"use": "tome", "r": r},
        f"tome (metric: tokens, r {r})": {"use": "tome", "r": r, "metric": "tokens"},
        "hired": {"use": "hired", "keep": ratio},
        # PruMerge(+) at their official adaptive count (IQR outliers): a fixed 25 % would give PruMerge+ a sampling
        # stride of floor(floor(1 / 0.25) / 3) = 1, every token (its official rule), so they keep their own count
        # and are compared with a hand-built prompt of it.
        "prumerge (adaptive)": {"use": "prumerge"},
        "prumerge_plus (adaptive)": {"use": "prumerge_plus"},
        "visionzip (keep)": {"use": "visionzip", "keep": ratio},
        "sparsevlm (CLS)": {"use": "sparsevlm", "keep": ratio},
        "sparsevlm (w_sal 0)": {"use": "sparsevlm", "keep": ratio, "w_sal": 0.0},
        "aim_merge (0.5, 0.5)": {"use": "aim_merge", "keep": [0.5, 0.5]},
        "cdpruner": {"use": "cdpruner", "keep": ratio},
        "divprune": {"use": "divprune", "keep": ratio},
        "scope (CLS)": {"use": "scope", "keep": ratio},
        "scope (score: null)": {"use": "scope", "keep": ratio, "score": None},
        "scope (attn_received)": {"use": "scope", "keep": ratio, "score": "attn_received"},
        "vispruner (CLS)": {"use": "vispruner", "keep": ratio},
        "vispruner (received)": {"use": "vispruner", "keep": ratio, "signal": "received", "attention_map": None},
        "dart_pre": {"use": "dart_pre", "keep": ratio, "count": "exact"},
    }
    methods = {name: {"compress": [stage]} for name, stage in pre.items()}
    methods["fastv (layer 2)"] = {"llm": [{"use": "fastv", "layer": 2, "keep": k}]}
    return methods


#: Tokens per state row (view, tile, image) of each family's benchmark image, for the per-view budgets.
PER_VIEW = {"qwen2_vl": 256, "qwen3_vl": 256, "internvl": 256, "llava_onevision": 729, "gemma3": 256}


def ratios(args) -> None:
    """LLM speed-up at K visual tokens, method overhead against a hand-built prompt of the same length and the
    selection share (see ``_prefill``), interleaved rounds, minima."""
    setup = SETUPS[args.family](args)
    clock = CLOCK or time.perf_counter
    with torch.inference_mode():
        features = setup.encode()
    if args.family == "llava":
        budgets = [int(v) for v in str(args.ratios or "144").split(",")]
    else:
        budgets = [int(setup.total * float(args.ratio))]
    tables = []
    for k in budgets:
        if args.family == "llava":
            methods = llava_methods(k, setup.model.config.text_config.num_hidden_layers, 576, args.methods)
        else:
            methods = family_methods(PER_VIEW[args.family], k, float(args.ratio))
            if args.methods:
                wanted = args.methods.split(",")
                methods = {n: s for n, s in methods.items() if n.split(" ")[0] in wanted}
        methods, lengths, refused = probe(setup, methods, clock)
        minima = Minima()

        def section() -> str:
            return (f"### {setup.total} -> {k} visual tokens\n\n" + ratio_table(minima, k, setup.total, lengths)
                    + ("\n\nrefused: " + "; ".join(f"{n} ({m})" for n, m in refused.items()) if refused else ""))

        for round_ in range(args.repeats + 1):
            measure_round(minima, setup, features, k, methods, lengths, clock)
            print(f"K={k}: round {round_ + 1} of {args.repeats + 1} done", flush=True)
            emit("\n\n".join([*tables, section()]), args.out)  # what is measured so far, in case it is stopped
        tables.append(section())
    emit("\n\n".join(tables) + (
        f"\n\n{setup.describe}; {torch.get_num_threads()} thread(s), "
        f"{'CPU time of the calling thread' if CLOCK else 'wall time'}; minima over {args.repeats + 1} interleaved "
        f"rounds after one warm-up call per method.\n"), args.out)


def main(argv: list[str] | None = None, family: str | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=list(SETUPS), default=family or "llava")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vision-depth", type=int, default=None,
                        help="vision tower blocks (default per family: qwen2_vl 8, qwen3_vl 3, internvl 2, "
                        "llava_onevision 2, gemma3 1; LLaVA's CLIP tower always has its 24)")
    parser.add_argument("--real", action="store_true", help="llava: LLaVA-1.5-7B decoder shape (needs a GPU), bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="576,288,144,64", help="llava full table: visual budgets")
    parser.add_argument("--repeats", type=int, default=None,
                        help="llava full table: runs per row (default 3); ratios: interleaved rounds - 1 (default 4)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ratios", default=None, metavar="K[,K]",
                        help="llava: only the decisive ratios (and the selection share) at K visual tokens, "
                        "interleaved runs, minima; several K comma-separated (every other family runs only these)")
    parser.add_argument("--ratio", default="0.25", help="families but llava: the share of visual tokens kept")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: every row)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: every time (run.report's stages and LLM prefill, whole calls, the vision tower) "
                        "is the calling thread's CPU time, not wall time (CPU with --threads 1 only: all the work runs "
                        "on that thread, and other processes on a shared machine do not count)")
    parser.add_argument("--no-generate", action="store_true", help="llava full table: skip the generate column")
    parser.add_argument("--out", default=None, help="Write the table (markdown) here too.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if args.device != "cpu":
            raise SystemExit("--clock thread: only on the CPU with --threads 1 (other threads' work would not count)")
        global CLOCK
        CLOCK = thread_clock()
    if args.family == "llava" and not args.ratios:
        args.repeats = 3 if args.repeats is None else args.repeats
        return llava_table(args)
    args.repeats = 4 if args.repeats is None else args.repeats
    ratios(args)


if __name__ == "__main__":
    main()
