"""What ``arrcoc eval`` writes next to ``results.csv``: ``results.md`` and the plots (PNG and SVG).

Plots (matplotlib, the ``viz`` extra): accuracy against the visual tokens the
LLM sees (mean over decoder layers; log scale), accuracy against prefill
milliseconds per image, and accuracy against visual tokens per question
type.  One line per method through its budgets; baselines dashed; the
uncompressed model is a star and a dotted horizontal line.

Reads only finished rows (an :class:`~arrcoc.evaluation.runner.EvalResult`); imports :mod:`.methods` and
:mod:`.store` below it, never the runner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import PluginLoadError
from .methods import ALL_TOKENS
from .store import atomic_write

PLOTS = ("accuracy_vs_tokens", "accuracy_vs_prefill_ms", "accuracy_by_type")


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def _f(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _pct(value: Any) -> str:
    v = _f(value)
    return "n/a" if math.isnan(v) else f"{v:.1%}"


def accuracy_grid(rows: list[dict[str, Any]], tokens_format: str = ".1f"
                  ) -> tuple[list[float], list[tuple[str, str, list[str]]]]:
    """The accuracy table both the terminal and results.md show: the budgets (largest first) and, per method,
    its kind and one cell per budget ("88.0% (256.0)", "unreachable", or "" where it was not run)."""
    budgets = sorted({float(r["budget"]) for r in rows}, reverse=True)
    cell = {(r["method"], float(r["budget"])): r for r in rows}
    grid = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for b in budgets:
            r = cell.get((method, b))
            cells.append("" if r is None else "unreachable" if r["status"] != "ok"
                         else f"{_pct(r['accuracy'])} ({_f(r['visual_tokens']):{tokens_format}})")
        grid.append((method, next(r["kind"] for r in rows if r["method"] == method), cells))
    return budgets, grid


def markdown(result: Any, fingerprint: dict[str, Any]) -> str:
    rows, types = result.rows, result.question_types
    budgets, grid = accuracy_grid(rows)
    lines = [
        "# arrcoc eval",
        "",
        f"Model `{fingerprint['model']}` (fingerprint {fingerprint['model_fingerprint']}), data "
        f"`{fingerprint['data']}`, {fingerprint['n']} questions, {fingerprint['max_new_tokens']} new tokens per "
        f"answer; {result.seconds / 60:.1f} min.  Budget = fraction of the visual tokens the LLM sees, averaged "
        "over decoder layers (docs/eval.md).  Baselines are marked *.",
        "",
        *([f"Data-parallel: {fingerprint['processes']} processes, batch b of the one-process run on rank "
           f"b % {fingerprint['processes']}; every accuracy, loyalty, KL, token, FLOP and KV column is the one-process "
           "value.  **Times are per rank**: each question's milliseconds were measured inside the process that ran "
           "it, beside the others sharing the machine, then averaged over all questions; the minutes above are "
           "rank 0's wall clock.", ""] if fingerprint.get("processes", 1) > 1 else []),
        "## Accuracy (visual tokens per image)",
        "",
        "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m, kind, cells in grid:
        lines.append(f"| {m}{' *' if kind == 'baseline' else ''} | " + " | ".join(cells) + " |")
    lines += ["", "## Every row", ""]
    head = ["method", "budget", "visual tokens", "accuracy", *types, "loyalty", "KL", "GFLOPs", "prefill ms",
            "total ms", "KV KiB"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in _ok(rows):
        lines.append("| " + " | ".join([
            r["method"], f"{float(r['budget']):g}", f"{_f(r['visual_tokens']):.1f}", _pct(r["accuracy"]),
            *[_pct(r.get(f"acc_{t}")) for t in types], f"{_f(r['loyalty']):.3f}", f"{_f(r['kl']):.4f}",
            f"{_f(r['prefill_gflops']):.3f}", f"{_f(r['prefill_ms']):.2f}", f"{_f(r['total_ms']):.2f}",
            f"{_f(r['kv_bytes']) / 1024:.1f}"]) + " |")
    lines += ["", "## Derived params", "", "| method | budget | visual tokens per layer | params |",
              "|---|---|---|---|"]
    for r in _ok(rows):
        params = r["params"] if isinstance(r["params"], str) else json.dumps(r["params"])
        lines.append(f"| {r['method']} | {float(r['budget']):g} | {r['visual_tokens_layers']} | `{params}` |")
    notes = [r for r in rows if r["note"]]
    if notes:
        lines += ["", "## Notes", ""]
        seen = set()
        for r in notes:
            text = f"- {r['method']} @ {float(r['budget']):g} ({r['status']}): {r['note']}"
            if r["status"] == "ok" and (r["method"], r["note"]) in seen:
                continue
            seen.add((r["method"], r["note"]))
            lines.append(text)
    return "\n".join(lines) + "\n"


def plot(result: Any, out: Path) -> list[Path]:
    """The three figures, each as PNG and SVG; returns the files written."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    except ImportError as exc:
        raise PluginLoadError(f"arrcoc eval: the plots need matplotlib, which is not installed ({exc}): "
                              "pip install 'arrcoc[viz]', or pass --no-plots (plots=False)") from None

    def figure(**kwargs: Any) -> Any:
        # A Figure with its own Agg canvas, not pyplot: no global backend switch, no figure registry to close.
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig

    rows = _ok(result.rows)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != ALL_TOKENS))
    baselines = [m for m in methods if any(r["method"] == m and r["kind"] == "baseline" for r in rows)]
    others = [m for m in methods if m not in baselines]
    grey = ["#222222", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf"]
    palette = matplotlib.colormaps["tab20"]  # the ten dark colours first, then their light pairs
    colour = [palette(2 * (i % 10) + (i // 10) % 2) for i in range(len(others))]
    markers = "osD^vPX<>h"
    style = {m: {"color": grey[i % len(grey)], "linestyle": "--", "marker": "o"} for i, m in enumerate(baselines)}
    style |= {m: {"color": colour[i], "linestyle": "-", "marker": markers[i % len(markers)]}
              for i, m in enumerate(others)}
    full = next((_f(r["visual_tokens"]) for r in rows if r["method"] == ALL_TOKENS), float("nan"))
    budget_ticks = [] if math.isnan(full) else sorted({round(_f(r["budget"]) * full) for r in result.rows})
    written: list[Path] = []

    def lines(ax: Any, x_key: str, y_key: str) -> None:
        for r in rows:
            if r["method"] == ALL_TOKENS and not math.isnan(_f(r[y_key])):  # the uncompressed model: its level
                ax.axhline(_f(r[y_key]), color="grey", linestyle=":", linewidth=1)
                ax.plot([_f(r[x_key])], [_f(r[y_key])], marker="*", markersize=13, linestyle="none",
                        color="black", label=ALL_TOKENS, zorder=5)
        for m in [*baselines, *others]:
            pts = sorted((_f(r[x_key]), _f(r[y_key])) for r in rows if r["method"] == m)
            pts = [(x, y) for x, y in pts if not (math.isnan(x) or math.isnan(y))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, markersize=4, linewidth=1.4, label=m, **style[m])

    def axes_style(ax: Any, xlabel: str, ticks: list[float] | None) -> None:
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(ticks)
        else:  # milliseconds: 1, 2, 5, 10, 20, 50 ...
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(True, which="major", alpha=0.3)

    def save(fig: Any, name: str) -> None:
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=150, bbox_inches="tight")
            written.append(path)

    for name, x_key, xlabel, ticks in (
        ("accuracy_vs_tokens", "visual_tokens", "visual tokens per image (mean over LLM layers)", budget_ticks),
        ("accuracy_vs_prefill_ms", "prefill_ms", "prefill ms per image (vision tower + stages + LLM)", None),
    ):
        fig = figure(figsize=(8, 5.5))
        ax = fig.subplots()
        lines(ax, x_key, "accuracy")
        axes_style(ax, xlabel, ticks)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
        ax.set_title(f"accuracy vs {xlabel.split(' (')[0]} (dashed: baselines)")
        save(fig, name)
    types = result.question_types
    if types:
        cols = min(len(types), 3)
        nrows = math.ceil(len(types) / cols)
        fig = figure(figsize=(5 * cols, 3.8 * nrows))
        axes = fig.subplots(nrows, cols, squeeze=False)
        for ax, t in zip(axes.flat, types):
            lines(ax, "visual_tokens", f"acc_{t}")
            axes_style(ax, "visual tokens per image", budget_ticks)
            ax.set_title(t)
        for ax in list(axes.flat)[len(types):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.suptitle("accuracy per question type (dashed: baselines)")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.legend(handles, labels, fontsize=7, ncol=min(len(labels), 8), loc="lower center")
        save(fig, "accuracy_by_type")
    return written


def write_outputs(result: Any, fingerprint: dict[str, Any], plots: bool = True) -> list[Path]:
    out = Path(result.out)
    md = out / "results.md"
    atomic_write(md, markdown(result, fingerprint).encode("utf-8"))
    written = [out / "results.csv", md]
    if plots:
        written += plot(result, out)
    return written
