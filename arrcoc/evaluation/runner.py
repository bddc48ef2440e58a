"""``arrcoc eval``: accuracy, loyalty and cost against visual tokens, for pipelines and honest baselines.

For every method and budget the model answers the same questions, batched
(left-padded prompts, greedy ``generate``) inside ``arrcoc.hf.apply``, and
one row of ``results.csv`` records (docs/eval.md defines each column):

* ``accuracy`` (and per question type): the first ``k`` generated tokens,
  ``k`` the reference answer's token count, equal the answer (case and
  surrounding whitespace / final period ignored);
* ``loyalty``: the fraction of answers equal to the uncompressed run's
  (EffiVLM-Bench); ``kl``: the mean KL divergence ``KL(p_all || p_method)``
  of the next-token distribution at the answer position (the first new
  token, full softmax over the vocabulary);
* ``visual_tokens``: visual tokens the LLM sees per image, averaged over
  the decoder layers (the budget's measure), with ``visual_tokens_in`` (at
  the LLM input) and the per-layer means;
* ``prefill_gflops`` (analytic, LLM only, per image), ``prefill_ms``
  (vision tower + pre-LLM stages + LLM prefill), ``llm_prefill_ms`` and
  ``total_ms`` (the whole ``generate`` call), each per image (a batch's time
  divided by its size); ``kv_bytes``: the KV cache after prefill per image
  (padding included, as allocated);
* ``params``: the params the budget rule derived (JSON, per stage label).

The uncompressed run ("all tokens") is the reference: its answers and
next-token log-probabilities are cached in ``reference.pt`` so that a resumed
run and every method reuse them.  Rows already in ``results.csv`` are
skipped; ``run.json`` records what the rows were computed with (model files,
data, questions), and a mismatch is an error rather than a mixed table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..budget import plan_budget
from ..errors import ArrcocError, ArrcocWarning, BudgetError, InputError, ModelError
from ..models import check_model_dir
from ..spec import PipelineSpec, available_pipelines, parse_spec, resolve_spec
from ..timing import clock
from .data import EvalSample, describe, load_samples

DEFAULT_BUDGETS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.05)
#: Pipelines (by file name) evaluated as baselines in every run, besides all tokens and downsampling: the
#: query-blind lower bounds that benchmarks (UniPruneBench, VTC-Bench) found hard to beat.
BASELINE_PIPELINES: tuple[str, ...] = ("random_keep", "pool")
ALL_TOKENS = "all tokens"
DOWNSAMPLE = "downsample"
#: The pipeline of the uncompressed run: the model's own tower, no stage.
_NO_STAGES = {"name": ALL_TOKENS, "encoder": {"use": "hf_vision"}}

COLUMNS = (
    "method", "kind", "budget", "status", "n", "accuracy", "loyalty", "kl", "visual_tokens", "visual_fraction",
    "visual_tokens_in", "visual_tokens_layers", "prefill_gflops", "prefill_ms", "llm_prefill_ms", "total_ms",
    "kv_bytes", "params", "note", "pipeline",
)
DONE = ("ok", "unreachable")
_NUMBERS = {"n", "accuracy", "loyalty", "kl", "visual_tokens", "visual_fraction", "visual_tokens_in",
            "prefill_gflops", "prefill_ms", "llm_prefill_ms", "total_ms", "kv_bytes"}


@dataclass
class Method:
    """One line of the plots: a pipeline (or a baseline) evaluated at every budget."""

    name: str
    kind: str                               # "baseline" or "method"
    spec: PipelineSpec | None = None        # None: all tokens or downsampling
    note: str = ""


@dataclass
class Reference:
    """The uncompressed run: per sample answers and next-token log-probabilities."""

    ids: list[str]
    predictions: list[str]
    logprobs: torch.Tensor                  # [n, vocab] float32
    original: int                           # visual tokens per image
    grid: tuple[int, int]
    has_cls: bool
    layers: int
    encoder_layers: int
    acc: dict[str, Any] = field(default_factory=dict)   # the sums of its own row


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: one dict per (method, budget), in ``COLUMNS`` plus ``acc_<type>``."""

    rows: list[dict[str, Any]]
    out: Path | None = None
    question_types: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, method: str, budget: float) -> dict[str, Any]:
        for r in self.rows:  # by label, as results.csv and a resume find rows (a resumed 0.333333 is 1/3)
            if _key(r["method"], r["budget"]) == _key(method, budget):
                return r
        raise KeyError(f"no row for {method!r} at budget {budget}")


# ------------------------------------------------------------------ methods
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


# ------------------------------------------------------------------- model
def load_model(model: Any, device: str | None = None) -> tuple[Any, Any, str]:
    """``(model, processor, description)`` from a ``(model, processor)`` pair, a directory, or the shipped model."""
    if isinstance(model, tuple):
        m, processor = model
        return m, processor, getattr(m, "name_or_path", "") or type(m).__name__
    from ..integrations import hf

    # The shipped model by default; `arrcoc:toyvqa` as a directory, so the fingerprint reads its weight files.
    model = check_model_dir("arrcoc:toyvqa" if model is None else model)   # missing files named, before loading
    from ..pipeline import _resolve_device

    dev = _resolve_device(device)
    # fp32 on a CPU (fp16 matmuls there are slow and the shipped weights are fp16); the checkpoint's own dtype on GPUs.
    m, processor = hf.load(str(model), device=dev, dtype=torch.float32 if dev.type == "cpu" else None)
    return m, processor, str(model)


def model_fingerprint(model: Any, description: str) -> str:
    """Config plus the size and mtime of each weights file: new weights in the same folder change it."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    folder = Path(description)
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:  # a model object: its weights themselves
        for p in model.parameters():
            h.update(p.detach().float().sum().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def prompt_for(processor: Any, question: str) -> str:
    """The model's chat prompt for one image and ``question`` (LLaVA-1.5's form without a chat template)."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def normalise(answer: str) -> str:
    return answer.strip().rstrip(".").strip().lower()


# -------------------------------------------------------------------- runs
@dataclass
class _Batch:
    samples: list[EvalSample]
    inputs: dict[str, Any]
    lengths: list[int]                      # answer tokens per sample


class _Runner:
    def __init__(self, model: Any, processor: Any, samples: list[EvalSample], batch_size: int,
                 max_new_tokens: int | None) -> None:
        self.model, self.processor, self.samples = model, processor, samples
        self.batch_size = batch_size
        self.tokenizer = processor.tokenizer
        self.lengths = [max(len(self.tokenizer(s.answer, add_special_tokens=False)["input_ids"]), 1) for s in samples]
        # Answer plus one more token (the end of the answer): total_ms includes a decoding step with the KV cache.
        self.max_new_tokens = max_new_tokens or max(self.lengths) + 1
        if self.max_new_tokens < max(self.lengths):
            raise InputError(f"arrcoc eval: max_new_tokens={self.max_new_tokens} is shorter than the longest answer "
                             f"({max(self.lengths)} tokens)")
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def batches(self, processor_kwargs: dict[str, Any] | None = None) -> Iterable[_Batch]:
        for start in range(0, len(self.samples), self.batch_size):
            chunk = self.samples[start:start + self.batch_size]
            images = [s.load_image() for s in chunk]
            texts = [prompt_for(self.processor, s.question) for s in chunk]
            # Left padding whatever the tokenizer's default: the answer position (the first new token's logits)
            # is the last column, which is the last prompt token only when every prompt ends there.
            inputs = self.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt",
                                    **(processor_kwargs or {}))
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            yield _Batch(chunk, inputs, self.lengths[start:start + len(chunk)])

    def warm_up(self) -> None:
        """One untimed ``generate`` on the first batch: first-call costs (allocations, lazy inits) would
        otherwise land in the first row's milliseconds."""
        from ..integrations.hf import apply

        batch = next(self.batches())
        with warnings.catch_warnings(), torch.inference_mode(), apply(self.model, parse_spec(dict(_NO_STAGES))):
            warnings.simplefilter("ignore", ArrcocWarning)
            self.model.generate(**batch.inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id)

    def run(self, spec: Any, on_batch: Callable[[int], None], processor_kwargs: dict[str, Any] | None = None,
            context: Any = None) -> dict[str, Any]:
        """Every sample through ``generate`` inside ``apply(model, spec)``; sums and per-sample outputs."""
        from ..integrations.hf import apply

        acc: dict[str, Any] = {"predictions": [], "logprobs": [], "layers": None, "flops": 0.0, "kv": 0.0,
                               "prefill_ms": 0.0, "llm_prefill_ms": 0.0, "total_ms": 0.0, "warnings": {},
                               "visual_in": []}
        with warnings.catch_warnings(), torch.inference_mode(), apply(self.model, spec) as run, \
                (context or nullcontext()):
            warnings.simplefilter("ignore", ArrcocWarning)  # collected from the stage records below
            for batch in self.batches(processor_kwargs):
                start = clock(self.device)
                out = self.model.generate(**batch.inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          return_dict_in_generate=True, output_logits=True,
                                          pad_token_id=self.tokenizer.pad_token_id)
                acc["total_ms"] += (clock(self.device) - start) * 1e3
                report = run.report
                new = out.sequences[:, batch.inputs["input_ids"].shape[1]:]
                for row, k in zip(new.tolist(), batch.lengths):
                    acc["predictions"].append(self.tokenizer.decode(row[:k], skip_special_tokens=True))
                acc["logprobs"].append(torch.log_softmax(out.logits[0].float(), -1).cpu())
                visual = torch.tensor(report.layer_visual, dtype=torch.float64)  # [layers, B]
                acc["layers"] = visual.sum(1) if acc["layers"] is None else acc["layers"] + visual.sum(1)
                acc["flops"] += report.prefill_flops
                acc["kv"] += report.kv_cache_bytes
                acc["prefill_ms"] += report.prefill_ms
                acc["llm_prefill_ms"] += report.llm_prefill_ms
                for record in report.pre_llm:
                    for note in record.warnings:
                        acc["warnings"][note] = acc["warnings"].get(note, 0) + 1
                acc["visual_in"].extend(report.visual_tokens_in)
                on_batch(len(batch.samples))
        acc["logprobs"] = torch.cat(acc["logprobs"]) if acc["logprobs"] else torch.zeros(0)
        return acc




def _row(method: Method, budget: float, samples: list[EvalSample], acc: dict[str, Any], reference: Reference | None,
         original: int, params: dict[str, Any], note: str, types: list[str]) -> dict[str, Any]:
    n = len(samples)
    correct = [normalise(p) == normalise(s.answer) for p, s in zip(acc["predictions"], samples)]
    if reference is None:  # this is the reference run
        loyal, kl = [True] * n, torch.zeros(n, dtype=torch.float64)
    else:
        loyal = [normalise(p) == normalise(r) for p, r in zip(acc["predictions"], reference.predictions)]
        p_ref = reference.logprobs.double()
        kl = (p_ref.exp() * (p_ref - acc["logprobs"].double())).sum(-1)
    per_layer = (acc["layers"] / n).tolist()
    visual = sum(per_layer) / len(per_layer)
    if acc["warnings"]:
        first, count = next(iter(acc["warnings"].items()))
        more = sum(acc["warnings"].values()) - count
        note = "; ".join(x for x in (note, f"warning: {first}" + (f" (+{more} more)" if more else "")) if x)
    row: dict[str, Any] = {
        "method": method.name, "kind": method.kind, "budget": budget, "status": "ok", "n": n,
        "accuracy": sum(correct) / n, "loyalty": sum(loyal) / n, "kl": float(kl.mean()),
        "visual_tokens": visual, "visual_fraction": visual / original,
        "visual_tokens_in": sum(acc["visual_in"]) / n,
        "visual_tokens_layers": ";".join(f"{v:.2f}" for v in per_layer),
        "prefill_gflops": acc["flops"] / n / 1e9, "prefill_ms": acc["prefill_ms"] / n,
        "llm_prefill_ms": acc["llm_prefill_ms"] / n, "total_ms": acc["total_ms"] / n, "kv_bytes": acc["kv"] / n,
        "params": json.dumps(params, sort_keys=True), "note": note,
        "pipeline": method.spec.source if method.spec is not None else "",
    }
    for t in types:
        hits = [c for c, s in zip(correct, samples) if s.qtype == t]
        row[f"acc_{t}"] = sum(hits) / len(hits) if hits else float("nan")
    return row


def _unreachable(method: Method, budget: float, reason: str, types: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS} | {f"acc_{t}": None for t in types}
    row.update(method=method.name, kind=method.kind, budget=budget, status="unreachable", note=reason,
               pipeline=method.spec.source if method.spec is not None else "")
    return row


# ------------------------------------------------------------------ storage
def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, flushed to disk, renamed over it.

    A run killed mid-write (SIGKILL, a full disk, a power cut) leaves the previous file or the new one,
    never half of one, so a resume reads what was finished.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, a folder made read-only, Ctrl-C: no half file left beside it
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # (a write error names no file)
            raise InputError(f"{path}: cannot be written ({exc.strerror or exc}); the previous version is kept: "
                             "free some space or pass another --out, then run again to resume") from exc
        raise
    try:  # the rename itself reaches the disk with the folder's entry (POSIX; other systems cannot open a folder)
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def _read_rows(path: Path, say: Callable[[str], None] = lambda message: None) -> list[dict[str, Any]]:
    """The rows of a results.csv; a last row cut off mid-write (no line end) is dropped, and said so."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if b"\n" in data[exc.start:]:  # not in an unterminated last row (dropped below): the file is damaged
            line = data[:exc.start].count(b"\n") + 1
            raise InputError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); the file was damaged: fix the "
                             "line, or --restart to discard it") from None
        # A cut inside a multi-byte character of the last row, which is dropped below as cut off mid-write.
        text = data.decode("utf-8", errors="replace")
    if not text:
        return []
    reader = csv.reader(io.StringIO(text))
    records: list[tuple[int, list[str]]] = []   # (first line, fields): a quoted field may span lines
    start = 1
    try:
        for record in reader:
            records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: not CSV ({exc}); the file was damaged: --restart to "
                         "discard it") from None
    if not text.endswith("\n"):
        # Only this program writes the file, always ending a row with its line end: an unterminated last row
        # is one a killed run (or a full disk) left half-written. It is computed again, never read as done.
        line, partial = records.pop()
        if not records:
            return []
        say(f"{path}:{line}: the last row was cut off mid-write ({','.join(partial)[:60]!r}...); it is dropped and "
            "computed again")
    header = records[0][1]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}: not a results file of arrcoc eval (missing columns {', '.join(missing)}); "
                         "use another --out, or --restart to overwrite")
    rows = []
    first_line: dict[tuple[str, str], int] = {}
    for line, record in records[1:]:
        if len(record) != len(header):
            raise InputError(f"{path}:{line}: {len(record)} fields where the header has {len(header)}; the file was "
                             "edited or damaged: fix the line, or --restart")
        row: dict[str, Any] = dict(zip(header, record))
        try:
            row["budget"] = float(row["budget"])
            for key, value in row.items():
                if key in _NUMBERS or key.startswith("acc_"):
                    row[key] = None if value in ("", None) else (int(value) if key == "n" else float(value))
        except ValueError as exc:
            raise InputError(f"{path}:{line}: a number column holds something else ({exc}); the file was "
                             "edited or truncated: fix the line, or --restart") from None
        key = _key(row["method"], row["budget"])
        if key in first_line:
            raise InputError(f"{path}:{line}: a second row for {key[0]} at budget {key[1]} (first at line "
                             f"{first_line[key]}); keep one of them, or --restart")
        first_line[key] = line
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]], types: list[str]) -> None:
    """results.csv, rewritten whole and atomically (:func:`atomic_write`) after every finished row."""
    columns = list(COLUMNS) + [f"acc_{t}" for t in types]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _cell(row.get(c, "")) for c in columns})
    atomic_write(path, text.getvalue().encode("utf-8"))


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def _key(method: str, budget: float) -> tuple[str, str]:
    return method, f"{float(budget):g}"


# -------------------------------------------------------------------- main
def evaluate(
    pipelines: Sequence[Any] = (),
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    n: int = 1000,
    out: str | Path | None = None,
    model: Any = None,
    data: Any = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    baselines: bool = True,
    device: str | None = None,
    progress: bool = True,
    restart: bool = False,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate ``pipelines`` (names, YAML paths, dicts or specs; default: every shipped pipeline) at each budget.

    ``model``: a local HF checkpoint directory, a ``(model, processor)`` pair, or ``None`` for the shipped
    ToyVQA model; ``data``: ``toyvqa`` / ``toyvqa:<split>`` (default: the test split), a JSONL file or a folder
    with ``metadata.jsonl``, or a list of :class:`~arrcoc.evaluation.data.EvalSample`.  With ``out``, rows go
    to ``out/results.csv`` as they finish (a rerun skips them), then ``results.md`` and the plots.
    """
    began = time.perf_counter()
    budgets = _check_budgets(budgets)
    if batch_size < 1:
        raise InputError(f"arrcoc eval: batch_size must be >= 1, got {batch_size}")
    methods = methods_for(pipelines, baselines)
    samples = list(data) if isinstance(data, list) else load_samples(data, n)
    out_dir = _make_out_dir(out)   # before the model loads: a bad --out fails in a second, not after a minute
    n = len(samples)
    types = _question_types(samples)
    m, processor, description = load_model(model, device)
    runner = _Runner(m, processor, samples, batch_size, max_new_tokens)
    fingerprint = {
        "model": description, "model_fingerprint": model_fingerprint(m, description),
        "data": describe(data) if not isinstance(data, list) else "samples", "n": n,
        "samples": hashlib.sha256("\n".join(f"{s.id}\t{s.question}\t{s.answer}" for s in samples).encode()
                                  ).hexdigest()[:16],
        "max_new_tokens": runner.max_new_tokens,
        # Per-image KV bytes (left padding as allocated) and milliseconds depend on it.
        "batch_size": batch_size,
    }
    say = log or (lambda message: None)
    rows: list[dict[str, Any]] = []
    if out_dir is not None:
        # A row that is not done (an unknown status: edited by hand) is computed again, and replaced.
        rows = [r for r in _resume(out_dir, fingerprint, restart, say) if r["status"] in DONE]
        # results.csv holds a budget at the precision of its label (0.333333 for 1/3): a resumed row takes the
        # budget asked for, as a row computed now has it, so both are one column of the tables and of row().
        asked = {_key("", b)[1]: b for b in budgets}
        for r in rows:
            if r["method"] != ALL_TOKENS:
                r["budget"] = asked.get(_key("", r["budget"])[1], r["budget"])
    done = {_key(r["method"], r["budget"]) for r in rows}

    configs = [(meth, b) for meth in methods for b in ([1.0] if meth.name == ALL_TOKENS else budgets)]
    pending = [(meth, b) for meth, b in configs if _key(meth.name, b) not in done and meth.name != ALL_TOKENS]
    reference = _cached_reference(out_dir, fingerprint, say)
    bar = _Progress(progress, total=(len(pending) + (reference is None)) * n)
    try:
        if reference is None or pending:
            runner.warm_up()
        if reference is None:
            reference = _reference(runner, out_dir, fingerprint, bar)
        if _key(ALL_TOKENS, 1.0) not in done:
            rows.append(_row(methods[0], 1.0, samples, reference.acc, None, reference.original, {}, "", types))
            say(_summary(rows[-1]))
            _save(out_dir, rows, types)
        for meth, budget in pending:
            bar.describe(f"{meth.name} @ {budget:g}")
            try:
                row = _evaluate_one(runner, meth, budget, reference, samples, types, bar)
            except ArrcocError as exc:
                raise type(exc)(f"arrcoc eval: {meth.name} at budget {budget:g}: {exc}") from exc
            except Exception as exc:  # a pipeline that cannot run is an error, never a silent skip
                raise ModelError(f"arrcoc eval: {meth.name} at budget {budget:g} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            rows.append(row)
            say(_summary(row))
            _save(out_dir, rows, types)
    finally:
        bar.stop()
    order = {_key(meth.name, b): i for i, (meth, b) in enumerate(configs)}
    rows.sort(key=lambda r: order.get(_key(r["method"], r["budget"]), len(order)))
    result = EvalResult(rows=rows, out=out_dir, question_types=types, seconds=time.perf_counter() - began)
    if out_dir is not None:
        from .output import write_outputs

        write_rows(out_dir / "results.csv", rows, types)
        write_outputs(result, fingerprint, plots=plots)
    return result


def _check_budgets(budgets: Sequence[float]) -> list[float]:
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
        label = _key("", b)[1]
        if label in labels:
            same = "repeats" if labels[label] == b else f"and {labels[label]!r} are one budget at the precision " \
                                                        f"rows are labelled with ({label})"
            raise BudgetError(f"arrcoc eval: budget {b!r} {same}; give each budget once, differing in its first "
                              "6 significant digits")
        labels[label] = b
    return out


def _make_out_dir(out: str | Path | None) -> Path | None:
    """The output folder, created; an :class:`InputError` saying why when it cannot be."""
    if out is None:
        return None
    try:
        out_dir = Path(out).expanduser()
    except RuntimeError:  # '~name/...' with no user 'name' (the shell leaves it as it is)
        raise InputError(f"arrcoc eval: output folder {str(out)!r} cannot be created: {str(out).split('/', 1)[0]!r} "
                         "names no user's home folder; pass another --out") from None
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        where = "it" if blocking == out_dir else f"{str(blocking)!r} above it"
        raise InputError(f"arrcoc eval: output folder {str(out_dir)!r} cannot be created: {where} is a file, "
                         "not a folder; pass another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"arrcoc eval: output folder {str(out_dir)!r} cannot be created "
                         f"({exc.strerror or type(exc).__name__}); pass another --out") from None
    return out_dir


def _question_types(samples: list[EvalSample]) -> list[str]:
    from ..toyvqa import QUESTION_TYPES

    present = {s.qtype for s in samples if s.qtype is not None}
    return [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))


def _resume(out_dir: Path, fingerprint: dict[str, Any], restart: bool,
            say: Callable[[str], None] = lambda message: None) -> list[dict[str, Any]]:
    meta = out_dir / "run.json"
    previous: Any = None
    if restart:
        for name in ("results.csv", "reference.pt", "run.json"):
            (out_dir / name).unlink(missing_ok=True)
    elif meta.is_file():
        try:
            previous = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(previous, dict):
                raise ValueError(f"a JSON {type(previous).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            if (out_dir / "results.csv").is_file():
                raise InputError(
                    f"{meta}: cannot be read ({exc}); it records what results.csv beside it was computed with, so "
                    "those rows cannot be resumed: use another --out, or --restart to discard them") from None
            previous = None  # no row depends on it: written again below
    if isinstance(previous, dict):
        differ = _differ(previous, fingerprint)
        if differ:
            raise InputError(
                f"{out_dir}: holds results computed with other settings ({', '.join(differ)}: "
                f"{', '.join(f'{previous.get(k)!r} -> {fingerprint[k]!r}' for k in differ)}); "
                "use another --out, or --restart to discard them"
            )
    elif not meta.is_file() and (out_dir / "results.csv").is_file():
        raise InputError(f"{out_dir}: results.csv has no run.json beside it, so what it was computed with is "
                         "unknown; use another --out, or --restart to discard it")
    atomic_write(meta, (json.dumps(fingerprint, indent=2) + "\n").encode("utf-8"))
    return _read_rows(out_dir / "results.csv", say)


def _save(out_dir: Path | None, rows: list[dict[str, Any]], types: list[str]) -> None:
    if out_dir is not None:
        write_rows(out_dir / "results.csv", rows, types)


def _cached_reference(out_dir: Path | None, fingerprint: dict[str, Any],
                      say: Callable[[str], None] = lambda message: None) -> Reference | None:
    """The uncompressed run from ``reference.pt``, when it was computed with these settings.

    The file is a cache of a deterministic run: one that cannot be read (damaged, or from another version) is
    said so and computed again, which rewrites it.
    """
    cache = out_dir / "reference.pt" if out_dir is not None else None
    if cache is None or not cache.is_file():
        return None
    try:
        saved = torch.load(cache, weights_only=True)
        if _differ(saved.get("fingerprint") or {}, fingerprint):
            return None
        reference = Reference(**saved["reference"])
        if not isinstance(reference.logprobs, torch.Tensor) or len(reference.logprobs) != fingerprint["n"] \
                or len(reference.predictions) != fingerprint["n"]:
            raise ValueError(f"it holds {len(reference.predictions)} answers for {fingerprint['n']} questions")
        return reference
    # Whatever a damaged file makes torch.load or the record raise (zip, unpickling, missing keys ...).
    except Exception as exc:  # noqa: BLE001
        say(f"{cache}: cannot be read ({type(exc).__name__}: {str(exc)[:120]}); the uncompressed run is computed "
            "again")
        return None


#: Settings recorded in run.json since a later version: a folder written before them still resumes.
_RECORDED_LATER = ("batch_size",)


def _differ(previous: dict[str, Any], fingerprint: dict[str, Any]) -> list[str]:
    """The settings in which ``previous`` (run.json, reference.pt) and this run differ."""
    return [k for k in fingerprint
            if previous.get(k) != fingerprint[k] and not (k in _RECORDED_LATER and k not in previous)]


def _reference(runner: _Runner, out_dir: Path | None, fingerprint: dict[str, Any], bar: "_Progress") -> Reference:
    """The uncompressed run (cached in ``reference.pt``): answers, log-probabilities, the budget context."""
    from ..integrations.hf import apply

    bar.describe(ALL_TOKENS)
    spec = parse_spec(dict(_NO_STAGES))
    acc = runner.run(spec, bar.advance)
    if len(set(acc["visual_in"])) != 1:
        raise BudgetError(
            f"arrcoc eval: budgets are fractions of one visual-token count per image, but this model gives images "
            f"{sorted(set(acc['visual_in']))[:5]} tokens (e.g. LLaVA-NeXT, Qwen2-VL); use a LLaVA-1.5-style model"
        )
    first = next(runner.batches())
    with torch.inference_mode(), apply(runner.model, spec) as run:  # the tower's grid, class token and depth
        state = run.encoder.encode_inputs(first.inputs["pixel_values"][:1], {})
        blocks = run.adapter.default_attention_layer + 1  # the layer whose output is the features, counted
    ref = Reference(ids=[s.id for s in runner.samples], predictions=list(acc["predictions"]),
                    logprobs=acc["logprobs"], original=int(acc["visual_in"][0]), grid=tuple(state.grid),
                    has_cls=state.cls is not None, layers=len(acc["layers"]), encoder_layers=blocks, acc=acc)
    if out_dir is not None:
        buffer = io.BytesIO()
        torch.save({"fingerprint": fingerprint, "reference": {f.name: getattr(ref, f.name) for f in fields(ref)}},
                   buffer)
        atomic_write(out_dir / "reference.pt", buffer.getvalue())
    return ref


def _evaluate_one(runner: _Runner, method: Method, budget: float, reference: Reference,
                  samples: list[EvalSample], types: list[str], bar: "_Progress") -> dict[str, Any]:
    original = reference.original
    if method.name == DOWNSAMPLE:
        from ..integrations.hf import adapter_for

        tokens = max(round(budget * original), 1)
        kwargs, context, grid = adapter_for(runner.model).downsampling(runner.processor, tokens)
        params = {"image": {"grid": list(grid), **kwargs.get("crop_size", {})}}
        acc = runner.run(parse_spec(dict(_NO_STAGES)), bar.advance, processor_kwargs=kwargs, context=context)
        return _row(method, budget, samples, acc, reference, original, params, method.note, types)
    try:
        plan = plan_budget(method.spec, budget, original=original, grid=reference.grid, layers=reference.layers,
                           has_cls=reference.has_cls, encoder_layers=reference.encoder_layers)
    except BudgetError as exc:
        bar.advance(len(samples))
        return _unreachable(method, budget, str(exc), types)
    acc = runner.run(plan.spec, bar.advance)
    return _row(method, budget, samples, acc, reference, original, plan.params, method.note, types)


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['method']} @ {float(row['budget']):g}: {row['status']}: {row['note']}"
    return (f"{row['method']} @ {float(row['budget']):g}: accuracy {row['accuracy']:.1%}, loyalty "
            f"{row['loyalty']:.3f}, KL {row['kl']:.4f}, {row['visual_tokens']:.1f} visual tokens, "
            f"{row['prefill_ms']:.2f} ms prefill / image")


class _Progress:
    """A rich progress bar over every (method, budget) still to run, on stderr; nothing when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]arrcoc eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.bar.add_task("", total=total)
        self.bar.start()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, k: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, k)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
