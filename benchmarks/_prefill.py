"""What the prefill benchmark shares: one model call inside ``arrcoc.hf.apply``, the interleaved rounds and the
ratio table.

The decisive ratios are read from minima over interleaved rounds (a busy
machine only ever inflates a time): each round times the vision tower, the
model on the full prompt, the unmodified model on a hand-built prompt of each
length a method hands the LLM, and every method.  End to end is measured as a
whole call: a method's = its one ``model(...)`` call from the pixels
(vision tower, its stages, the engine's work, the decoder, the last
position's logits); a hand-built prompt's = the vision tower (its minimum)
plus the unmodified model's call on the prompt carrying the first ``n``
features, outside ``apply`` (what an oracle selection would cost).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import arrcoc

NO_STAGES = {"encoder": {"use": "timm_vit"}}


@dataclass
class Setup:
    """A model and its prompts for the ratio rounds.

    ``full``: the full prompt's text inputs; ``image_inputs``: what the model needs besides them to encode the
    image (``pixel_values``, grids, sizes); ``total``: the visual tokens of the full prompt; ``encode()``: the
    model's own image features (whatever its forward takes back as ``mm_encoder_outputs``); ``hand(n, features)``:
    the inputs of the hand-built prompt with ``n`` visual tokens carrying the first ``n`` features (the way the
    family's tests build it), ``mm_encoder_outputs`` included.
    """

    model: Any
    full: dict
    image_inputs: dict
    total: int
    encode: Callable[[], Any]
    hand: Callable[[int, Any], dict]
    describe: str = ""


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


def hand_name(n: int) -> str:
    return f"hand-built {n}"


def _sync(model: Any) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(model: Any, inputs: dict, clock: Callable[[], float]) -> float:
    """Milliseconds of one ``model(**inputs, logits_to_keep=1)`` (as ``generate``'s prefill)."""
    _sync(model)
    start = clock()
    model(**inputs, logits_to_keep=1)
    _sync(model)
    return 1e3 * (clock() - start)


def run_spec(model: Any, spec: dict, inputs: dict, clock: Callable[[], float]) -> tuple[Any, float]:
    """One prefill inside ``apply(model, spec)``: the run's report, and the call's time (entering ``apply`` not
    counted: a pipeline is applied once and serves every call)."""
    with torch.inference_mode(), arrcoc.hf.apply(model, spec) as run:
        ms = call_ms(model, inputs, clock)
    return run.report, ms


def probe(setup: Setup, methods: dict[str, dict], clock: Callable[[], float]) -> tuple[dict[str, dict], dict, dict]:
    """One warm-up call per method: the methods that run, the visual tokens each pre-LLM one hands the LLM (its
    hand-built reference is a prompt of that length), and the refusals (``ArrcocError`` message, first line)."""
    runs, lengths, refused = {}, {}, {}
    for name, stages in methods.items():
        try:
            report, _ = run_spec(setup.model, {**NO_STAGES, **stages}, {**setup.full, **setup.image_inputs}, clock)
        except arrcoc.ArrcocError as error:
            needs = re.search(r"needs '([^']+)'", str(error))
            refused[name] = f"needs '{needs[1]}'" if needs else str(error).splitlines()[0][:120]
            print(f"{name}: refused: {refused[name]}", flush=True)
            continue
        runs[name] = stages
        if not stages.get("llm"):
            lengths[name] = int(report.layer_visual[-1][0])
        print(f"{name}: runs, the last decoder layer sees {report.layer_visual[-1][0]} visual tokens", flush=True)
    return runs, lengths, refused


def measure_round(minima: Minima, setup: Setup, features: Any, k: int, methods: dict[str, dict],
                  lengths: dict[str, int], clock: Callable[[], float]) -> None:
    """One interleaved round: the vision tower, the full prompt, the hand-built prompt of ``k`` and of every other
    length in ``lengths``, then every method.

    A pre-LLM method must hand the LLM the ``lengths[name]`` visual tokens it handed it in :func:`probe` (the
    same every round); an in-LLM one (``llm:`` stages) is compared with the hand-built prompt of ``k`` and may
    see another count at its last layer or on average over layers (recorded in ``minima.info``).  ``select`` is
    the time of the method's own stages: the pre-LLM stages' plus the in-LLM stages' (``run.report.llm_stage_ms``,
    the stage calls alone, not the engine's work to compute their signals).
    """
    model = setup.model
    with torch.inference_mode():
        _sync(model)
        start = clock()
        setup.encode()
        _sync(model)
        minima.add("vision", e2e=1e3 * (clock() - start))
    name = f"all {setup.total}"
    report, ms = run_spec(model, NO_STAGES, {**setup.full, **setup.image_inputs}, clock)
    minima.add(name, llm=report.llm_prefill_ms, stages=0.0, select=0.0, e2e=ms)
    minima.info[name] = _seen(report)
    for n in sorted({k, *lengths.values()}, reverse=True):
        short = setup.hand(n, features)
        report, _ = run_spec(model, NO_STAGES, short, clock)
        with torch.inference_mode():
            ms = call_ms(model, short, clock)  # the unmodified model, outside apply
        minima.add(hand_name(n), llm=report.llm_prefill_ms, stages=0.0, select=0.0, call=ms)
        minima.info[hand_name(n)] = _seen(report)
    for name, stages in methods.items():
        report, ms = run_spec(model, {**NO_STAGES, **stages}, {**setup.full, **setup.image_inputs}, clock)
        if name in lengths and report.layer_visual[-1][0] != lengths[name]:
            raise SystemExit(f"{name}: the last decoder layer sees {report.layer_visual[-1]} visual tokens, not "
                             f"{lengths[name]} as in the first call")
        minima.add(name, llm=report.llm_prefill_ms, stages=report.stages_ms,
                   select=report.stages_ms + sum(report.llm_stage_ms.values()), e2e=ms,
                   **({"tower": report.vision_ms} if report.vision_ms else {}))
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


def ratio_table(minima: Minima, k: int, total: int, lengths: dict[str, int]) -> str:
    """Markdown: LLM speed-up against all tokens, LLM and end-to-end overhead against the hand-built prompt of the
    same length, and the selection share.

    A pre-LLM method's reference is the hand-built prompt of the length it hands the LLM (``lengths``); an in-LLM
    method's, and the full prompt's, the hand-built prompt of ``k``.  ``tower ms in the call``: the vision tower
    inside the method's call (``run.report.vision_ms``, the signals arrcoc reads from it included; a hand-built
    prompt's: the tower alone; empty where the model runs its tower itself, in-LLM pipelines); ``rest ms``: the
    call's time outside tower, pre-LLM stages and decoder stack (embedding, the engine's assembly and positions,
    the last position's logits), from the minima.  ``selection share`` = the method's own stage
    time / the LLM prefill time that removing ``total - k`` tokens saves (all ``total`` minus the hand-built
    prompt of ``k``); ``LLM ms / FLOP-proportional`` = the LLM prefill time against all-tokens' time scaled by the
    FLOP ratio (1.0: the LLM costs what its tokens cost; above it: the engine's extra work, e.g. the in-LLM
    signals, or non-linear costs).
    """
    rows = dict(minima.rows)
    vision = rows.pop("vision")["e2e"]
    base = rows[f"all {total}"]["llm"]
    base_flops = minima.info.get(f"all {total}", {}).get("flops")
    saved = base - rows[hand_name(k)]["llm"]
    lines = [f"| method | visual tokens (last layer / mean) | LLM prefill ms (min) | LLM speed-up vs {total} | "
             f"pre-LLM stages ms | selection ms | selection share of the {saved:.0f} ms saved | hand-built reference "
             f"| LLM overhead vs hand-built | tower ms in the call | rest ms | e2e ms (min) | e2e overhead vs hand-built "
             f"| LLM ms / FLOP-proportional |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        n = lengths.get(name, k) if not name.startswith("hand-built") else int(name.split()[-1])
        ref = rows[hand_name(n)]
        ref_e2e = vision + ref["call"]
        e2e = vision + row["call"] if "call" in row else row["e2e"]
        info = minima.info.get(name, {})
        seen = f"{info['last']:.0f} / {info['mean']:.1f}" if info else ""
        select = row.get("select", row["stages"])
        share = f"{100 * select / saved:.2f} %" if select and saved > 0 else ""
        flop_ratio = (f"{row['llm'] / (base * info['flops'] / base_flops):.3f}" if info and base_flops else "")
        tower = vision if "call" in row else row.get("tower")
        rest = "" if tower is None else f"{e2e - tower - row['stages'] - row['llm']:.1f}"
        tower = "" if tower is None else f"{tower:.1f}"
        lines.append(f"| {name} | {seen} | {row['llm']:.1f} | {base / row['llm']:.2f}x | {row['stages']:.1f} | "
                     f"{select:.2f} | {share} | {n} | {row['llm'] / ref['llm']:.3f} | {tower} | {rest} | {e2e:.1f} | "
                     f"{e2e / ref_e2e:.3f} | {flop_ratio} |")
    return "\n".join(lines) + f"\n\nvision tower (min) {vision:.1f} ms"


def thread_clock() -> Callable[[], float]:
    """Make arrcoc's clock (``arrcoc.timing.clock``, behind every time in ``run.report``) read the calling thread's
    CPU time, and return that clock (CPU with one torch thread only: all the work runs on that thread, and other
    processes on a shared machine do not count)."""
    import types

    import arrcoc.timing

    if torch.get_num_threads() != 1:
        raise SystemExit("--clock thread: only on the CPU with --threads 1 (other threads' work would not count)")
    arrcoc.timing.time = types.SimpleNamespace(perf_counter=time.thread_time)
    return time.thread_time
