"""What ``arrcoc eval`` evaluates: the methods (all tokens, downsampling, the baselines, the pipelines) and budgets.

The lowest layer of :mod:`arrcoc.evaluation`: it knows pipeline specs and
nothing of models, rows or files.  A row of the results is labelled by
:func:`row_key` (method, budget at the precision ``results.csv`` writes it),
which the store, the runner and :class:`~arrcoc.evaluation.runner.EvalResult`
all find rows by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import BudgetError, InputError
from ..spec import PipelineSpec, available_pipelines, parse_spec, resolve_spec

DEFAULT_BUDGETS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.05)
#: Pipelines (by file name) evaluated as baselines in every run, besides all tokens and downsampling: the
#: query-blind lower bounds that benchmarks (UniPruneBench, VTC-Bench) found hard to beat.
BASELINE_PIPELINES: tuple[str, ...] = ("random_keep", "pool")
ALL_TOKENS = "all tokens"
DOWNSAMPLE = "downsample"
#: The pipeline of the uncompressed run (and of downsampling, which shrinks the image instead): the model's own
#: tower, no stage.
_NO_STAGES = {"name": ALL_TOKENS, "encoder": {"use": "hf_vision"}}


@dataclass
class Method:
    """One line of the plots: a pipeline (or a baseline) evaluated at every budget."""

    name: str
    kind: str                               # "baseline" or "method"
    spec: PipelineSpec | None = None        # None: all tokens or downsampling
    note: str = ""


def no_stages() -> PipelineSpec:
    """The pipeline of the uncompressed run: the model's own tower, no stage (named ``all tokens``)."""
    return parse_spec(dict(_NO_STAGES))


def post_tower(spec: PipelineSpec) -> tuple[PipelineSpec, str]:
    """``spec`` with an ``encoder.in_blocks`` compressor moved to the first ``compress:`` stage, and a note.

    ``arrcoc.hf.apply`` cannot compress inside a Hugging Face tower, so the
    method runs on the tower's output features instead (with the tower's
    keys and CLS attention); the note says so in every row.
    """
    inner = spec.encoder.params.get("in_blocks")
    if not inner:
        return spec, ""
    inner = inner.as_yaml_dict() if hasattr(inner, "as_yaml_dict") else dict(inner)
    data = spec.as_yaml_dict()
    del data["encoder"]["in_blocks"]
    data["compress"] = [inner, *data.get("compress", [])]
    note = (f"encoder.in_blocks ({inner['use']}) runs after the vision tower, on its output features: "
            "arrcoc.hf.apply cannot compress inside a Hugging Face tower")
    return parse_spec(data, source=spec.source), note


def methods_for(pipelines: Sequence[Any], baselines: bool = True) -> list[Method]:
    """The methods of a run: all tokens, downsampling and the baseline pipelines first, then ``pipelines``."""
    specs = [resolve_spec(p) for p in pipelines] if pipelines else [
        resolve_spec(path) for name, path in sorted(available_pipelines().items())]
    out: list[Method] = [Method(ALL_TOKENS, "baseline")]
    if baselines:
        out.append(Method(DOWNSAMPLE, "baseline"))
        named = {s.name for s in specs}
        specs += [resolve_spec(name) for name in BASELINE_PIPELINES if name not in named]
        # the baselines first, in BASELINE_PIPELINES order, then the methods as given
        rank = {name: i for i, name in enumerate(BASELINE_PIPELINES)}
        specs.sort(key=lambda s: rank.get(s.name, len(rank)))
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen or spec.name in (ALL_TOKENS, DOWNSAMPLE):
            raise InputError(f"arrcoc eval: two methods are named {spec.name!r} ({seen.get(spec.name, 'built in')} "
                             f"and {spec.source}); give each pipeline file its own `name:`")
        seen[spec.name] = spec.source
        spec, note = post_tower(spec)
        kind = "baseline" if baselines and spec.name in BASELINE_PIPELINES else "method"
        out.append(Method(spec.name, kind, spec, note))
    return out


def row_key(method: str, budget: float) -> tuple[str, str]:
    """A row's label: the method and the budget at the precision results.csv writes it (1/3 is '0.333333')."""
    return method, f"{float(budget):g}"


def outcome_key(method: str, budget: float) -> str:
    """A row's label as one string (the key of a rank's ``outcomes.pt``)."""
    return "\t".join(row_key(method, budget))


def check_budgets(budgets: Sequence[float]) -> list[float]:
    """``budgets`` as floats in (0, 1], each with its own label; a :class:`BudgetError` naming a bad one."""
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < float(b) <= 1.0:
            raise BudgetError(f"arrcoc eval: a budget is a fraction of the visual tokens in (0, 1], got {b!r}")
        out.append(float(b))
    if not out:
        raise BudgetError("arrcoc eval: no budget given; pass at least one fraction of the visual tokens in (0, 1], "
                          f"e.g. {', '.join(f'{b:g}' for b in DEFAULT_BUDGETS)}")
    # A row is labelled (and found again on resume) by its budget at the precision results.csv writes: two
    # budgets that print alike would write two rows of one label, and a resume would take one for the other.
    labels: dict[str, float] = {}
    for b in out:
        label = row_key("", b)[1]
        if label in labels:
            same = "repeats" if labels[label] == b else f"and {labels[label]!r} are one budget at the precision " \
                                                        f"rows are labelled with ({label})"
            raise BudgetError(f"arrcoc eval: budget {b!r} {same}; give each budget once, differing in its first "
                              "6 significant digits")
        labels[label] = b
    return out
