"""The files of an ``arrcoc eval`` folder: ``results.csv``, ``run.json`` and the ``reference.pt`` cache.

* ``results.csv``: one row per (method, budget), rewritten whole and
  atomically (:func:`atomic_write`) after every finished row, so a run killed
  at any point leaves rows that are whole; :func:`read_rows` reads them back
  for a resume (a last row cut off mid-write is dropped and said so).
* ``run.json``: what the rows were computed with (:func:`run_fingerprint`);
  :func:`resume` refuses a folder computed with other settings rather than
  mix two runs in one table.
* ``reference.pt``: the uncompressed run (:class:`~.totals.Reference`), a
  cache of a deterministic run: one that cannot be read is computed again.

* ``shards/rank{r}-of{w}/`` (a data-parallel run): each rank's own
  ``run.json``, ``reference.pt``, ``outcomes.pt`` (per finished row, each
  call's sums, answers and per-question KL; :func:`save_outcomes`) and
  ``evaluated.jsonl`` (a line per row the rank computed, appended:
  :func:`append_ledger`); :func:`check_world` refuses to resume them with
  another number of processes.

Imports :mod:`.methods` and :mod:`.totals` below it; nothing here runs a model.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError
from .data import EvalSample
from .methods import row_key
from .totals import COLUMNS, NUMBER_COLUMNS, Reference, Totals

#: Row statuses a resume keeps; a row of another status (edited by hand) is computed again, and replaced.
DONE = ("ok", "unreachable")
#: Settings recorded in run.json since a later version: a folder written before them still resumes.
_RECORDED_LATER = ("batch_size",)


def _quiet(message: str) -> None:
    """The default ``say``: a caller that passes no logger hears nothing."""


# ---------------------------------------------------------------- writing
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


def make_out_dir(out: str | Path | None) -> Path | None:
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


# ------------------------------------------------------------ results.csv
def read_rows(path: Path, say: Callable[[str], None] = _quiet) -> list[dict[str, Any]]:
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
                if key in NUMBER_COLUMNS or key.startswith("acc_"):
                    row[key] = None if value in ("", None) else (int(value) if key == "n" else float(value))
        except ValueError as exc:
            raise InputError(f"{path}:{line}: a number column holds something else ({exc}); the file was "
                             "edited or truncated: fix the line, or --restart") from None
        key = row_key(row["method"], row["budget"])
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


def save_rows(out_dir: Path | None, rows: list[dict[str, Any]], types: list[str]) -> None:
    """``out_dir/results.csv`` (nothing without a folder)."""
    if out_dir is not None:
        write_rows(out_dir / "results.csv", rows, types)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


# --------------------------------------------------------------- run.json
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


def run_fingerprint(model: Any, description: str, data: str, samples: list[EvalSample], max_new_tokens: int,
                    batch_size: int) -> dict[str, Any]:
    """What ``run.json`` records: the settings every row of the folder was computed with (in this order)."""
    return {
        "model": description, "model_fingerprint": model_fingerprint(model, description),
        "data": data, "n": len(samples),
        "samples": hashlib.sha256("\n".join(f"{s.id}\t{s.question}\t{s.answer}" for s in samples).encode()
                                  ).hexdigest()[:16],
        "max_new_tokens": max_new_tokens,
        # Per-image KV bytes (left padding as allocated) and milliseconds depend on it.
        "batch_size": batch_size,
    }


def differ(previous: dict[str, Any], fingerprint: dict[str, Any]) -> list[str]:
    """The settings in which ``previous`` (run.json, reference.pt) and this run differ."""
    return [k for k in fingerprint
            if previous.get(k) != fingerprint[k] and not (k in _RECORDED_LATER and k not in previous)]


def resume(out_dir: Path, fingerprint: dict[str, Any], restart: bool,
           say: Callable[[str], None] = _quiet) -> list[dict[str, Any]]:
    """The rows already in ``out_dir`` (none with ``restart``, which deletes the folder's files), after checking
    that ``run.json`` records these settings; writes ``run.json`` for this run."""
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
        changed = differ(previous, fingerprint)
        if changed:
            raise InputError(
                f"{out_dir}: holds results computed with other settings ({', '.join(changed)}: "
                f"{', '.join(f'{previous.get(k)!r} -> {fingerprint[k]!r}' for k in changed)}); "
                "use another --out, or --restart to discard them"
            )
    elif not meta.is_file() and (out_dir / "results.csv").is_file():
        raise InputError(f"{out_dir}: results.csv has no run.json beside it, so what it was computed with is "
                         "unknown; use another --out, or --restart to discard it")
    atomic_write(meta, (json.dumps(fingerprint, indent=2) + "\n").encode("utf-8"))
    return read_rows(out_dir / "results.csv", say)


# ----------------------------------------------------------- reference.pt
#: reference.pt holds ``{"fingerprint": run.json's settings, "reference": {...}}``, the reference as plain
#: tensors, lists and numbers (``torch.load(weights_only=True)`` reads nothing else); its totals under ``acc``
#: with these keys, the names the file has had since its first version (a folder written then still resumes).
_SAVED_TOTALS = {"predictions": "predictions", "logprobs": "logprobs", "layers": "layer_visual",
                 "flops": "prefill_flops", "kv": "kv_cache_bytes", "prefill_ms": "prefill_ms",
                 "llm_prefill_ms": "llm_prefill_ms", "total_ms": "total_ms", "warnings": "warnings",
                 "visual_in": "visual_tokens_in"}


def save_reference(out_dir: Path | None, fingerprint: dict[str, Any], reference: Reference) -> None:
    """``out_dir/reference.pt`` (nothing without a folder), written atomically."""
    if out_dir is None:
        return
    totals = reference.totals
    saved_totals = {key: (totals.logprobs if name == "logprobs" else getattr(totals, name))
                    for key, name in _SAVED_TOTALS.items()}
    saved = {"ids": reference.ids, "predictions": reference.predictions, "logprobs": reference.logprobs,
             "original": reference.original, "grid": reference.grid, "has_cls": reference.has_cls,
             "layers": reference.layers, "encoder_layers": reference.encoder_layers, "acc": saved_totals}
    buffer = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "reference": saved}, buffer)
    atomic_write(out_dir / "reference.pt", buffer.getvalue())


def load_reference(out_dir: Path | None, fingerprint: dict[str, Any],
                   say: Callable[[str], None] = _quiet) -> Reference | None:
    """The uncompressed run from ``reference.pt``, when it was computed with these settings.

    The file is a cache of a deterministic run: one that cannot be read (damaged, or from another version) is
    said so and computed again, which rewrites it.
    """
    cache = out_dir / "reference.pt" if out_dir is not None else None
    if cache is None or not cache.is_file():
        return None
    try:
        saved = torch.load(cache, weights_only=True)
        if differ(saved.get("fingerprint") or {}, fingerprint):
            return None
        reference = _reference_from(saved["reference"])
        if not isinstance(reference.logprobs, torch.Tensor) or len(reference.logprobs) != fingerprint["n"] \
                or len(reference.predictions) != fingerprint["n"]:
            raise ValueError(f"it holds {len(reference.predictions)} answers for {fingerprint['n']} questions")
        return reference
    # Whatever a damaged file makes torch.load or the record raise (zip, unpickling, missing keys ...).
    except Exception as exc:  # noqa: BLE001
        say(f"{cache}: cannot be read ({type(exc).__name__}: {str(exc)[:120]}); the uncompressed run is computed "
            "again")
        return None


def _reference_from(saved: dict[str, Any]) -> Reference:
    """The :class:`Reference` that :func:`save_reference` wrote as ``saved``; a ``KeyError`` / ``ValueError``
    naming what is missing or unknown otherwise."""
    expected = {"ids", "predictions", "logprobs", "original", "grid", "has_cls", "layers", "encoder_layers", "acc"}
    unknown = sorted(set(saved) - expected)
    if unknown:
        raise ValueError(f"unknown reference fields {', '.join(unknown)}")
    acc = saved["acc"]
    unknown = sorted(set(acc) - set(_SAVED_TOTALS))
    if unknown:
        raise ValueError(f"unknown totals fields {', '.join(unknown)}")
    values = {name: acc[key] for key, name in _SAVED_TOTALS.items() if key != "logprobs"}
    totals = Totals(**values, logprob_batches=[acc["logprobs"]])
    return Reference(ids=saved["ids"], totals=totals, original=saved["original"], grid=tuple(saved["grid"]),
                     has_cls=saved["has_cls"], layers=saved["layers"], encoder_layers=saved["encoder_layers"])


# ------------------------------------------------- data-parallel shards
#: A data-parallel run's per-rank stores: ``OUT/shards/rank{r}-of{w}/`` (docs/eval.md, "Many processes").
SHARDS = "shards"


def shard_dir(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / SHARDS / f"rank{rank}-of{world}"


def check_world(out_dir: Path, world: int) -> None:
    """An :class:`InputError` when ``out_dir`` holds the shards of a run with another number of processes."""
    folder = out_dir / SHARDS
    found: dict[int, str] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            head, _, tail = path.name.rpartition("-of")
            if path.is_dir() and head.startswith("rank") and tail.isdigit():
                found.setdefault(int(tail), path.name)
    other = sorted(w for w in found if w != world)
    if other:
        w = other[0]
        raise InputError(
            f"arrcoc eval: {out_dir} holds the shards of a {w}-process run ({SHARDS}/{found[w]}), but this run has "
            f"{world} process{'es' if world > 1 else ''}; each process resumes its own shard, so resume with {w} "
            f"(arrcoc eval --nproc {w} ..., or torchrun --nproc-per-node {w} -m arrcoc eval ...), or --restart "
            "to discard them")
    if world > 1 and not found and (out_dir / "results.csv").is_file():
        meta = out_dir / "run.json"
        try:
            processes = json.loads(meta.read_text(encoding="utf-8")).get("processes", 1)
        except (OSError, ValueError, AttributeError):
            processes = 1
        if processes == 1:
            raise InputError(
                f"arrcoc eval: {out_dir} holds the results of a one-process run, which keeps no per-question "
                f"outcomes to resume {world} processes from; resume it with one process, or --restart to discard "
                "them")


def load_outcomes(folder: Path, say: Callable[[str], None]) -> dict[str, Any]:
    path = folder / "outcomes.pt"
    if not path.is_file():
        return {}
    try:
        saved = torch.load(path, weights_only=True)
        return dict(saved["rows"])
    except Exception as exc:  # noqa: BLE001 - a damaged file of a deterministic run: computed again
        say(f"{path}: cannot be read ({type(exc).__name__}: {str(exc)[:120]}); this shard's rows are computed again")
        return {}


def save_outcomes(folder: Path, rows: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"rows": rows}, buffer)
    atomic_write(folder / "outcomes.pt", buffer.getvalue())


def append_ledger(folder: Path, method: str, budget: float, rank: int, ids: list[str], seconds: float) -> None:
    """One line per row this rank computed, appended (a resume adds lines, never rewrites them)."""
    line = json.dumps({"method": method, "budget": row_key(method, budget)[1], "rank": rank, "questions": ids,
                       "seconds": round(seconds, 3)})
    with (folder / "evaluated.jsonl").open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
