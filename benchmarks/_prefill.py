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
    """The smallest time seen per (row, component)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

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
    """One interleaved round: the full prompt, the hand-built prompt of ``k``, then every method."""
    minima.add(f"all {total}", llm=prefill(model, NO_STAGES, full, full_features).llm_prefill_ms, stages=0.0)
    minima.add("hand-built", llm=prefill(model, NO_STAGES, short, full_features[:k]).llm_prefill_ms, stages=0.0)
    for name, stages in methods.items():
        report = prefill(model, {**NO_STAGES, **stages}, {**full, **image_inputs})
        if report.layer_visual[-1][0] != k:
            raise SystemExit(f"{name}: the last decoder layer sees {report.layer_visual[-1]} visual tokens, not {k}")
        minima.add(name, llm=report.llm_prefill_ms, stages=report.stages_ms)


def emit(table: str, out: str | None) -> None:
    """Print the table, and write it to ``out`` too when given."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)


def ratio_table(minima: Minima, vision_ms: float, k: int, total: int) -> str:
    """Markdown: LLM speed-up against all tokens, LLM and end-to-end overhead against the hand-built prompt."""
    rows = dict(minima.rows)
    base, hand = rows[f"all {total}"]["llm"], rows["hand-built"]["llm"]
    lines = [f"| method | LLM prefill ms (min) | LLM speed-up vs {total} | pre-LLM stages ms | LLM overhead vs "
             f"hand-built {k} | e2e overhead vs hand-built {k} |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        e2e = (vision_ms + row["stages"] + row["llm"]) / (vision_ms + hand)
        lines.append(f"| {name} | {row['llm']:.1f} | {base / row['llm']:.2f}x | {row['stages']:.1f} | "
                     f"{row['llm'] / hand:.3f} | {e2e:.3f} |")
    return "\n".join(lines)
