"""What the prefill benchmarks share: one model call inside ``arrcoc.hf.apply`` and the ratio table.

The decisive ratios are read from minima over interleaved rounds (a busy
machine only ever inflates a time): each round times the vision tower, the
model on the full prompt and on a hand-built prompt of the kept length, and
every method; a method's end-to-end prefill = vision + its pre-LLM stages +
its decoder stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import arrcoc

NO_STAGES = {"encoder": {"use": "timm_vit"}}


class Minima:
    """The smallest time seen per (row, component), and what each row's LLM saw (``info``: visual tokens at the
    last decoder layer and their mean over layers, prefill FLOPs; the same every round)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.info: dict[str, dict[str, float]] = {}

    def add(self, name: str, **parts: float) -> None:
        row = self.rows.setdefault(name, {})
        for part, ms in parts.items():
            row[part] = min(row.get(part, float("inf")), ms)


def prefill(model: Any, spec: dict, inputs: dict, features: torch.Tensor | None = None) -> Any:
    """One prefill (``logits_to_keep=1``, as in ``generate``) inside ``apply``; returns the run's report.

    ``features`` hands the image features in directly (a hand-built prompt).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    extra = {} if features is None else {
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[features])}}
    with torch.inference_mode(), arrcoc.hf.apply(model, spec) as run:
        model(**inputs, **extra, logits_to_keep=1)
    return run.report


def measure_round(minima: Minima, model: Any, full: dict, full_features: torch.Tensor, short: dict, k: int,
                  methods: dict[str, dict], image_inputs: dict, total: int) -> None:
    """One interleaved round: the full prompt, the hand-built prompt of ``k``, then every method.

    A method with pre-LLM stages only must hand the LLM ``k`` visual tokens; an in-LLM one (``llm:`` stages) may
    see another count at its last layer or on average over layers (recorded in ``minima.info``).  ``select`` is the
    time of the method's own stages: the pre-LLM stages' plus the in-LLM stages' (``run.report.llm_stage_ms``,
    the stage calls alone, not the engine's work to compute their signals).
    """
    for name, inputs, features in ((f"all {total}", full, full_features), ("hand-built", short, full_features[:k])):
        report = prefill(model, NO_STAGES, inputs, features)
        minima.add(name, llm=report.llm_prefill_ms, stages=0.0, select=0.0)
        minima.info[name] = _seen(report)
    for name, stages in methods.items():
        report = prefill(model, {**NO_STAGES, **stages}, {**full, **image_inputs})
        if not stages.get("llm") and report.layer_visual[-1][0] != k:
            raise SystemExit(f"{name}: the last decoder layer sees {report.layer_visual[-1]} visual tokens, not {k}")
        minima.add(name, llm=report.llm_prefill_ms, stages=report.stages_ms,
                   select=report.stages_ms + sum(report.llm_stage_ms.values()))
        minima.info[name] = _seen(report)


def _seen(report: Any) -> dict[str, float]:
    """Visual tokens at the last decoder layer (first prompt), their mean over layers, and the prefill FLOPs."""
    return {"last": float(report.layer_visual[-1][0]), "mean": report.visual_tokens_mean,
            "flops": float(report.prefill_flops)}


def emit(table: str, out: str | None) -> None:
    """Print the table, and write it to ``out`` too when given."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)


def ratio_table(minima: Minima, vision_ms: float, k: int, total: int) -> str:
    """Markdown: LLM speed-up against all tokens, LLM and end-to-end overhead against the hand-built prompt, and
    the selection share.

    ``selection share`` = the method's own stage time / the LLM prefill time that removing ``total - k`` tokens
    saves (all ``total`` minus the hand-built prompt of ``k``); ``LLM ms / FLOP-proportional`` = the LLM prefill
    time against all-tokens' time scaled by the FLOP ratio (1.0: the LLM costs what its tokens cost; above it:
    the engine's extra work, e.g. the in-LLM signals, or non-linear costs).
    """
    rows = dict(minima.rows)
    base, hand = rows[f"all {total}"]["llm"], rows["hand-built"]["llm"]
    base_flops = minima.info.get(f"all {total}", {}).get("flops")
    saved = base - hand
    lines = [f"| method | visual tokens (last layer / mean) | LLM prefill ms (min) | LLM speed-up vs {total} | "
             f"pre-LLM stages ms | selection ms | selection share of the {saved:.0f} ms saved | LLM overhead vs "
             f"hand-built {k} | e2e overhead vs hand-built {k} | LLM ms / FLOP-proportional |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        e2e = (vision_ms + row["stages"] + row["llm"]) / (vision_ms + hand)
        info = minima.info.get(name, {})
        seen = f"{info['last']:.0f} / {info['mean']:.1f}" if info else ""
        select = row.get("select", row["stages"])
        share = f"{100 * select / saved:.2f} %" if select and saved > 0 else ""
        flop_ratio = (f"{row['llm'] / (base * info['flops'] / base_flops):.3f}" if info and base_flops else "")
        lines.append(f"| {name} | {seen} | {row['llm']:.1f} | {base / row['llm']:.2f}x | {row['stages']:.1f} | "
                     f"{select:.2f} | {share} | {row['llm'] / hand:.3f} | {e2e:.3f} | {flop_ratio} |")
    return "\n".join(lines)
