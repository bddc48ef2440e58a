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
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BudgetError, ModelError
from .data import EvalSample
from .methods import ALL_TOKENS, Method, outcome_key

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

    #: Every call's sums, as :meth:`add_call` took them: a data-parallel run replays its ranks' calls in the
    #: one-process batch order (:func:`merge_outcomes`), so its sums are the same additions in the same order.
    calls: list[dict[str, Any]] = field(default_factory=list)
    #: Per-question ``KL(p_all || p_method)`` computed where the log-probabilities are (each rank of a
    #: data-parallel run, against its own questions' reference); ``None``: :class:`Scoring` computes it.
    question_kl: torch.Tensor | None = None

    def add(self, report: "Report", predictions: list[str], logprobs: torch.Tensor, total_ms: float) -> None:
        """One call: its ``run.report``, its answers, the next-token log-probabilities at the answer position."""
        warned: dict[str, int] = {}
        for record in report.pre_llm:
            for note in record.warnings:
                warned[note] = warned.get(note, 0) + 1
        self.add_call({
            "predictions": list(predictions),
            "layer_visual": torch.tensor(report.layer_visual, dtype=torch.float64).sum(1),  # [layers, B] -> [layers]
            "prefill_flops": report.prefill_flops, "kv_cache_bytes": report.kv_cache_bytes,
            "prefill_ms": report.prefill_ms, "llm_prefill_ms": report.llm_prefill_ms, "total_ms": total_ms,
            "warnings": warned, "visual_tokens_in": list(report.visual_tokens_in),
        }, logprobs)

    def add_call(self, call: dict[str, Any], logprobs: torch.Tensor | None = None) -> None:
        """One call's sums (the dict :meth:`add` builds from a report), and its log-probabilities if at hand."""
        self.calls.append(call)
        self.total_ms += call["total_ms"]
        self.predictions.extend(call["predictions"])
        if logprobs is not None:
            self.logprob_batches.append(logprobs)
            self.__dict__.pop("logprobs", None)   # the cached concatenation is stale
        visual = call["layer_visual"]
        self.layer_visual = visual if self.layer_visual is None else self.layer_visual + visual
        self.prefill_flops += call["prefill_flops"]
        self.kv_cache_bytes += call["kv_cache_bytes"]
        self.prefill_ms += call["prefill_ms"]
        self.llm_prefill_ms += call["llm_prefill_ms"]
        for note, count in call["warnings"].items():
            self.warnings[note] = self.warnings.get(note, 0) + count
        self.visual_tokens_in.extend(call["visual_tokens_in"])

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

    def kl(self, totals: Totals) -> torch.Tensor:
        """Per question, ``KL(p_all || p_method)`` (float64, nats) at the answer position."""
        p_ref = self.reference.logprobs.double()
        return (p_ref.exp() * (p_ref - totals.logprobs.double())).sum(-1)

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
            kl = totals.question_kl if totals.question_kl is not None else self.kl(totals)
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


# ------------------------------------------------------- data-parallel runs
def call_record(totals: Totals | None, ids: list[str], params: dict[str, Any], note: str = "",
            kl: torch.Tensor | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """A row's outcomes on one rank: each call's sums with its questions' KL (plain types: weights_only)."""
    if totals is None:
        return {"status": "unreachable", "note": note, "params": "{}", "calls": [], "ids": ids}
    calls = []
    start = 0
    for call in totals.calls:
        size = len(call["predictions"])
        calls.append({**call, **({"kl": kl[start:start + size].clone()} if kl is not None else {})})
        start += size
    record = {"status": "ok", "note": note, "params": json.dumps(params), "calls": calls, "ids": ids}
    if context is not None:
        record["context"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in context.items()}
    return record


def merge_outcomes(gathered: list[dict[str, Any]], methods: list[Method], configs: list[tuple[Method, float]],
           samples: list[EvalSample], types: list[str], batch_size: int, world: int) -> list[dict[str, Any]]:
    """The rows of all questions from every rank's outcomes, as one process computes them."""
    batches = math.ceil(len(samples) / batch_size)

    def totals_of(key: str) -> tuple[Totals, dict[str, Any]]:
        totals, kls = Totals(), []
        for b in range(batches):
            record = gathered[b % world].get(key)
            if record is None or len(record["calls"]) <= b // world:
                raise ModelError(f"arrcoc eval: rank {b % world} of {world} returned no outcome of batch {b} for "
                                 f"{key.replace(chr(9), ' @ ')}; its shard store is damaged: --restart")
            call = record["calls"][b // world]
            totals.add_call(call)
            if "kl" in call:
                kls.append(call["kl"])
        if kls:
            totals.question_kl = torch.cat(kls)
        return totals, gathered[0][key]

    ref_totals, first = totals_of(outcome_key(ALL_TOKENS, 1.0))
    contexts = {json.dumps(r[outcome_key(ALL_TOKENS, 1.0)]["context"], sort_keys=True) for r in gathered if r}
    visual_in = ref_totals.visual_tokens_in
    if len(set(visual_in)) != 1 or len(contexts) != 1:
        raise BudgetError(
            f"arrcoc eval: budgets are fractions of one visual-token count per image, but this model gives images "
            f"{sorted(set(visual_in))[:5]} tokens (e.g. LLaVA-NeXT, Qwen2-VL); use a LLaVA-1.5-style model")
    context = first["context"]
    reference = Reference(ids=[s.id for s in samples], totals=ref_totals, original=int(context["original"]),
                          grid=tuple(context["grid"]), has_cls=bool(context["has_cls"]),
                          layers=int(context["layers"]), encoder_layers=int(context["encoder_layers"]))
    scoring = Scoring(samples, types, reference)
    rows = [scoring.reference_row(methods[0])]
    for meth, budget in configs:
        if meth.name == ALL_TOKENS:
            continue
        record = gathered[0].get(outcome_key(meth.name, budget))
        if record is not None and record["status"] == "unreachable":
            rows.append(scoring.unreachable(meth, budget, record["note"]))
            continue
        totals, record = totals_of(outcome_key(meth.name, budget))
        rows.append(scoring.row(meth, budget, totals, json.loads(record["params"])))
    return rows
