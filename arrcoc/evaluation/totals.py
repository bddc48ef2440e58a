"""What one method at one budget measured, and the row of ``results.csv`` it makes (docs/eval.md defines each column).

:class:`Totals` adds up, call by call, what ``arrcoc.hf``'s
:class:`~arrcoc.integrations.hf.report.Report` says (visual tokens per decoder
layer, prefill FLOPs, KV bytes, milliseconds, pre-LLM stage warnings, visual
tokens at the LLM input) with the answers and the answer-position
log-probabilities.  :class:`Scoring` turns totals into a row: accuracy
against the reference answers, loyalty and KL against the uncompressed run
(:class:`Reference`), per-image means.

Imports only :mod:`.methods` and :mod:`.data` below it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .data import EvalSample
from .methods import Method

if TYPE_CHECKING:
    from ..integrations.hf.report import Report

#: The columns of results.csv, in order; ``acc_<question type>`` columns follow.
COLUMNS = (
    "method", "kind", "budget", "status", "n", "accuracy", "loyalty", "kl", "visual_tokens", "visual_fraction",
    "visual_tokens_in", "visual_tokens_layers", "prefill_gflops", "prefill_ms", "llm_prefill_ms", "total_ms",
    "kv_bytes", "params", "note", "pipeline",
)
#: The columns that hold numbers (``n`` an int), read back as such from results.csv.
NUMBER_COLUMNS = frozenset({"n", "accuracy", "loyalty", "kl", "visual_tokens", "visual_fraction", "visual_tokens_in",
                            "prefill_gflops", "prefill_ms", "llm_prefill_ms", "total_ms", "kv_bytes"})


def normalise(answer: str) -> str:
    """An answer as compared: case, surrounding whitespace and a final period ignored."""
    return answer.strip().rstrip(".").strip().lower()


def question_types(samples: list[EvalSample]) -> list[str]:
    """The question types present, ToyVQA's in its order first, then the others sorted."""
    from ..toyvqa import QUESTION_TYPES

    present = {s.qtype for s in samples if s.qtype is not None}
    return [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))


@dataclass
class Totals:
    """Sums over every ``generate`` call of one method at one budget (per sample lists in sample order)."""

    predictions: list[str] = field(default_factory=list)     # the first k new tokens, decoded
    logprob_batches: list[torch.Tensor] = field(default_factory=list)   # per call [B, vocab] float32
    layer_visual: torch.Tensor | None = None                 # [layers] float64: visual tokens, summed over samples
    prefill_flops: float = 0.0
    kv_cache_bytes: float = 0.0
    prefill_ms: float = 0.0
    llm_prefill_ms: float = 0.0
    total_ms: float = 0.0                                    # the whole generate calls, wall clock
    warnings: dict[str, int] = field(default_factory=dict)   # pre-LLM stage warning -> images it was raised for
    visual_tokens_in: list[int] = field(default_factory=list)   # per sample, at the LLM input

    def add(self, report: "Report", predictions: list[str], logprobs: torch.Tensor, total_ms: float) -> None:
        """One call: its ``run.report``, its answers, the next-token log-probabilities at the answer position."""
        self.total_ms += total_ms
        self.predictions.extend(predictions)
        self.logprob_batches.append(logprobs)
        self.__dict__.pop("logprobs", None)   # the cached concatenation is stale
        visual = torch.tensor(report.layer_visual, dtype=torch.float64).sum(1)  # [layers, B] -> [layers]
        self.layer_visual = visual if self.layer_visual is None else self.layer_visual + visual
        self.prefill_flops += report.prefill_flops
        self.kv_cache_bytes += report.kv_cache_bytes
        self.prefill_ms += report.prefill_ms
        self.llm_prefill_ms += report.llm_prefill_ms
        for record in report.pre_llm:
            for note in record.warnings:
                self.warnings[note] = self.warnings.get(note, 0) + 1
        self.visual_tokens_in.extend(report.visual_tokens_in)

    @cached_property
    def logprobs(self) -> torch.Tensor:
        """``[n, vocab]`` float32, every call's rows in sample order (empty before the first call)."""
        return torch.cat(self.logprob_batches) if self.logprob_batches else torch.zeros(0)


@dataclass
class Reference:
    """The uncompressed run: its totals (answers, log-probabilities, its own row's sums) and the budget context
    of its images, which :func:`arrcoc.budget.plan_budget` derives every method's params from."""

    ids: list[str]
    totals: Totals
    original: int                           # visual tokens per image at the LLM input
    grid: tuple[int, int]                   # the tower's feature grid (rows, cols)
    has_cls: bool
    layers: int                             # decoder layers
    encoder_layers: int                     # tower blocks up to the one whose attention signals are read

    @property
    def predictions(self) -> list[str]:
        return self.totals.predictions

    @property
    def logprobs(self) -> torch.Tensor:
        return self.totals.logprobs

    @property
    def budget_context(self) -> dict[str, Any]:
        """``plan_budget``'s keyword arguments: ``plan_budget(spec, fraction, **reference.budget_context)``."""
        return {"original": self.original, "grid": self.grid, "layers": self.layers, "has_cls": self.has_cls,
                "encoder_layers": self.encoder_layers}


@dataclass
class Scoring:
    """What every row of a run is scored against: its questions, their types and the uncompressed run."""

    samples: list[EvalSample]
    types: list[str]
    reference: Reference

    def reference_row(self, method: Method) -> dict[str, Any]:
        """The uncompressed run's own row (loyalty 1 and KL 0 by definition)."""
        return self._row(method, 1.0, self.reference.totals, {}, compare=False)

    def row(self, method: Method, budget: float, totals: Totals, params: dict[str, Any]) -> dict[str, Any]:
        """The row of ``method`` at ``budget``: ``totals`` scored against the answers and the reference."""
        return self._row(method, budget, totals, params, compare=True)

    def _row(self, method: Method, budget: float, totals: Totals, params: dict[str, Any], compare: bool
             ) -> dict[str, Any]:
        samples, reference, original = self.samples, self.reference, self.reference.original
        n = len(samples)
        correct = [normalise(p) == normalise(s.answer) for p, s in zip(totals.predictions, samples)]
        if not compare:
            loyal, kl = [True] * n, torch.zeros(n, dtype=torch.float64)
        else:
            loyal = [normalise(p) == normalise(r) for p, r in zip(totals.predictions, reference.predictions)]
            p_ref = reference.logprobs.double()
            kl = (p_ref.exp() * (p_ref - totals.logprobs.double())).sum(-1)
        per_layer = (totals.layer_visual / n).tolist()
        visual = sum(per_layer) / len(per_layer)
        note = method.note
        if totals.warnings:
            first, count = next(iter(totals.warnings.items()))
            more = sum(totals.warnings.values()) - count
            note = "; ".join(x for x in (note, f"warning: {first}" + (f" (+{more} more)" if more else "")) if x)
        row: dict[str, Any] = {
            "method": method.name, "kind": method.kind, "budget": budget, "status": "ok", "n": n,
            "accuracy": sum(correct) / n, "loyalty": sum(loyal) / n, "kl": float(kl.mean()),
            "visual_tokens": visual, "visual_fraction": visual / original,
            "visual_tokens_in": sum(totals.visual_tokens_in) / n,
            "visual_tokens_layers": ";".join(f"{v:.2f}" for v in per_layer),
            "prefill_gflops": totals.prefill_flops / n / 1e9, "prefill_ms": totals.prefill_ms / n,
            "llm_prefill_ms": totals.llm_prefill_ms / n, "total_ms": totals.total_ms / n,
            "kv_bytes": totals.kv_cache_bytes / n,
            "params": json.dumps(params, sort_keys=True), "note": note,
            "pipeline": method.spec.source if method.spec is not None else "",
        }
        for t in self.types:
            hits = [c for c, s in zip(correct, samples) if s.qtype == t]
            row[f"acc_{t}"] = sum(hits) / len(hits) if hits else float("nan")
        return row

    def unreachable(self, method: Method, budget: float, reason: str) -> dict[str, Any]:
        """The row of a budget the method cannot reach (``reason`` in its note); no number measured."""
        row: dict[str, Any] = {c: None for c in COLUMNS} | {f"acc_{t}": None for t in self.types}
        row.update(method=method.name, kind=method.kind, budget=budget, status="unreachable", note=reason,
                   pipeline=method.spec.source if method.spec is not None else "")
        return row
