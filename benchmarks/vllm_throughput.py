"""vLLM serving throughput of a LLaVA-1.5-shaped model with arrcoc's fixed visual budget per image (issue 21).

Random weights, no download: a small CLIP tower at LLaVA-1.5's geometry (336 px, patch 14: 576 image tokens;
``--tower-layers 2 --tower-width 128`` so the CPU spends its time in the decoder) and the Llama decoder of
``benchmarks/llava_prefill.py`` (``--layers 8 --width 1024``, vocabulary 32064), saved with a word-level
tokenizer and a ``LlavaProcessor`` to a temporary directory laid out like the shipped ``arrcoc:toyvqa`` model.

For each budget K (576 / 144 / 64 by default) one engine serves ``--requests`` prompts of 40 text tokens and one
image each (distinct seeded random images) and generates exactly ``--new-tokens`` tokens (``ignore_eos``,
greedy).  Every engine gets the SAME KV-cache memory (``--kv-cache-mib``) and ``max_model_len`` = its prompt
length + new tokens.  K equal to the tower's 576 is stock vLLM (keep everything, no arrcoc); smaller K run
``arrcoc.vllm.engine_args(--pipeline, tokens_per_image=K)``.

Columns: prompt tokens per request (checked: text + K), requests/s, prompt and generated tokens/s (the
generate call's wall time, after a warm-up), vLLM's reported maximum concurrency (requests of
``max_model_len`` tokens that fit in the KV cache), and both ratios against keep-everything.

    python benchmarks/vllm_throughput.py --out out/vllm_throughput.md

Needs the ``vllm`` extra (``pip install "arrcoc[vllm]"``; the CPU build runs it here).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT_TEXT = 40  # text tokens per prompt (bos + words), as llava_prefill.py's LLaVA-1.5 template
IMAGE_TOKEN_ID = 32000
VOCAB = 32064
SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE_TOKEN_ID}
IMAGE_SIZE, PATCH = 336, 14
FULL = (IMAGE_SIZE // PATCH) ** 2  # 576


def build_model_dir(path: Path, layers: int, width: int, tower_layers: int, tower_width: int, seed: int) -> Path:
    """Save a random LLaVA-1.5-shaped model, its tokenizer and processor to ``path`` (from_pretrained layout)."""
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vision = transformers.CLIPVisionConfig(
        hidden_size=tower_width, intermediate_size=4 * tower_width, num_hidden_layers=tower_layers,
        num_attention_heads=max(tower_width // 64, 1), image_size=IMAGE_SIZE, patch_size=PATCH)
    text = transformers.LlamaConfig(
        hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=layers,
        num_attention_heads=width // 64, num_key_value_heads=width // 64, vocab_size=VOCAB,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                                      image_seq_length=FULL, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    transformers.LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    legacy_tower_names(path / "model.safetensors")

    # Word-level vocabulary: specials at their ids, "w<i>" elsewhere; prompts are made of these words.
    vocab = {f"w{i}": i for i in range(VOCAB)}
    for word, i in SPECIALS.items():
        vocab.pop(f"w{i}")
        vocab[word] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=4096, extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)
    return path


def legacy_tower_names(weights: Path) -> None:
    """Store the CLIP tower as the published LLaVA-1.5 checkpoints do (``vision_tower.vision_model.*``).

    transformers 5 saves it flat (``vision_tower.embeddings.*``), which stock vLLM 0.32's LLaVA cannot load
    (docs/vllm.md); transformers and arrcoc's vLLM class read either layout.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    renamed = {re.sub(r"^(model\.)?vision_tower\.(?!vision_model\.)", r"\g<0>vision_model.", k): v
               for k, v in tensors.items()}
    save_file(renamed, weights, metadata={"format": "pt"})


def prompt_text() -> str:
    """``<image>`` and the words making PROMPT_TEXT tokens with the bos the tokenizer adds."""
    return " ".join(["<image>", *(f"w{100 + i}" for i in range(PROMPT_TEXT - 1))])


def images(count: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(count)]


@dataclass
class Row:
    tokens: int
    method: str
    prompt_tokens: int
    max_model_len: int
    kv_tokens: int
    max_concurrency: float
    seconds: float
    requests: int
    generated: int
    block_size: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def prompt_per_s(self) -> float:
        return self.requests * self.prompt_tokens / self.seconds

    @property
    def generated_per_s(self) -> float:
        return self.generated / self.seconds


def serve(model_dir: Path, tokens: int, args: argparse.Namespace, pictures: list) -> Row:
    """One engine at budget ``tokens``: warm up, then time one generate over every request."""
    from vllm import LLM, SamplingParams

    import arrcoc.vllm

    max_model_len = PROMPT_TEXT + tokens + args.new_tokens
    extra = {} if tokens == FULL else arrcoc.vllm.engine_args(args.pipeline, tokens_per_image=tokens, model=model_dir)
    llm = LLM(model=str(model_dir), dtype=args.dtype, enforce_eager=True, max_model_len=max_model_len,
              limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=args.kv_cache_mib << 20,
              distributed_executor_backend="uni", seed=0, **extra)
    try:
        text = prompt_text()
        requests = [{"prompt": text, "multi_modal_data": {"image": image}} for image in pictures]
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
        llm.generate(requests[:2], SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        lengths = {len(out.prompt_token_ids) for out in outputs}
        if lengths != {PROMPT_TEXT + tokens}:
            raise SystemExit(f"K={tokens}: the engine's prompts hold {sorted(lengths)} tokens, expected text + K = "
                             f"{PROMPT_TEXT + tokens}")
        generated = sum(len(out.outputs[0].token_ids) for out in outputs)
        cache = llm.llm_engine.vllm_config.cache_config
        return Row(tokens, "keep everything (stock vLLM)" if tokens == FULL else args.pipeline,
                   PROMPT_TEXT + tokens, max_model_len, int(cache.kv_cache_size_tokens or 0),
                   float(cache.kv_cache_max_concurrency or 0.0), seconds, len(requests), generated,
                   int(cache.block_size))
    finally:
        del llm
        gc.collect()


def table(rows: list[Row], args: argparse.Namespace) -> str:
    base = next((r for r in rows if r.tokens == FULL), rows[0])
    lines = [
        f"{args.requests} requests of {PROMPT_TEXT} text tokens + 1 image, {args.new_tokens} new tokens each; decoder "
        f"{args.layers} x {args.width} ({args.dtype}), KV cache {args.kv_cache_mib} MiB for every engine in blocks of "
        f"{sorted({r.block_size for r in rows})} tokens (a request holds whole blocks)",
        "",
        "| K | method | prompt tokens | max_model_len | KV-cache tokens | max concurrency | requests/s | "
        "prompt tok/s | generated tok/s | requests/s vs 576 | concurrency vs 576 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tokens} | {r.method} | {r.prompt_tokens} | {r.max_model_len} | {r.kv_tokens:,} | "
            f"{r.max_concurrency:.2f} | {r.requests_per_s:.3f} | {r.prompt_per_s:.1f} | {r.generated_per_s:.1f} | "
            f"{r.requests_per_s / base.requests_per_s:.2f}x | {r.max_concurrency / base.max_concurrency:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default=f"{FULL},144,64", help="visual budgets K (576: stock vLLM)")
    parser.add_argument("--pipeline", default="random_keep", help="arrcoc pipeline for K < 576")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tower-layers", type=int, default=2)
    parser.add_argument("--tower-width", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-mib", type=int, default=1024, help="KV-cache memory of every engine")
    parser.add_argument("--model-dir", default=None, help="reuse (or create) the random model here")
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    args = parser.parse_args()
    budgets = [int(k) for k in args.tokens.split(",")]
    bad = [k for k in budgets if not 1 <= k <= FULL]
    if bad:
        parser.error(f"--tokens: each K must be in 1..{FULL} (the tower's tokens per image), got {bad}")
    # The engine in this process: its config (with the KV-cache capacity it computed) is the one we read.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or tmp)
        if not (model_dir / "config.json").is_file():
            build_model_dir(model_dir, args.layers, args.width, args.tower_layers, args.tower_width, seed=0)
        pictures = images(args.requests, seed=1)
        rows = []
        for k in budgets:
            rows.append(serve(model_dir, k, args, pictures))
            print(f"K={k}: {rows[-1].requests_per_s:.3f} requests/s, max concurrency {rows[-1].max_concurrency:.2f}",
                  flush=True)
    text = table(rows, args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
