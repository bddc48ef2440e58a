"""Evaluation data: the ToyVQA test split, or a user's (image, question, answer) records.

``load_samples(source, n)`` reads:

* ``toyvqa`` (the test split) or ``toyvqa:<split>`` (``test``, ``val``):
  samples ``0 .. n-1`` of the split, with their question type;
* a **JSONL file**: one JSON object per line with ``image`` (a path,
  relative to the file's directory, or absolute), ``question``, ``answer``
  and optionally ``type`` (question type, for the per-type breakdown) and
  ``id``; blank lines are skipped;
* a **folder** holding ``metadata.jsonl`` (the Hugging Face ImageFolder
  convention: ``file_name`` may stand for ``image``), read the same way.

Every record is checked before any model runs: a line that is not JSON, is
not an object, lacks a field, has a non-string field, names an image that
does not exist, or (when it is loaded) an image that cannot be decoded is a
:class:`~arrcoc.errors.DatasetError` naming the file and the line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError

METADATA = "metadata.jsonl"
TOYVQA = "toyvqa"
REQUIRED = ("image", "question", "answer")


@dataclass(frozen=True)
class EvalSample:
    """One question about one image; ``image`` is an ``[H, W, 3]`` uint8 array or a path loaded when used."""

    id: str
    image: Any
    question: str
    answer: str
    qtype: str | None = None
    where: str = ""          # file:line of a record read from a file (for error messages)

    def load_image(self) -> Any:
        if not isinstance(self.image, Path):
            return self.image
        from ..errors import InputError
        from ..images import open_image

        try:  # the pipeline's own decoding: checksums verified, EXIF orientation, decompression bombs refused
            return open_image(self.image, where="decoding").convert("RGB")
        except InputError as exc:
            raise DatasetError(f"{self.where}: image {str(self.image)!r} cannot be read ({exc})") from None


def describe(source: str | Path | None) -> str:
    """The canonical name of a data source (``toyvqa:test`` for the default)."""
    if source is None or str(source) == TOYVQA:
        return f"{TOYVQA}:test"
    text = str(source)
    return text if text.startswith(f"{TOYVQA}:") else str(Path(text).expanduser().resolve())


def load_samples(source: str | Path | None, n: int) -> list[EvalSample]:
    """The first ``n`` samples of ``source`` (see the module docstring)."""
    if n < 1:
        raise DatasetError(f"evaluation data: expected n >= 1, got {n}")
    name = describe(source)
    if name.startswith(f"{TOYVQA}:"):
        return _toyvqa(name.split(":", 1)[1], n)
    path = Path(name)
    if path.is_dir():
        meta = path / METADATA
        if not meta.is_file():
            raise DatasetError(f"{path}: a data folder must hold {METADATA} (one JSON object per line with "
                               "image or file_name, question, answer); found none")
        path = meta
    if not path.is_file():
        raise DatasetError(f"evaluation data {str(source)!r}: expected 'toyvqa', 'toyvqa:<split>', a JSONL file or "
                           f"a folder with {METADATA}; no such file or folder")
    return _jsonl(path, n)


def _toyvqa(split: str, n: int) -> list[EvalSample]:
    from ..toyvqa import SPLITS, samples

    if split not in SPLITS or split == "train":
        raise DatasetError(f"evaluation data toyvqa:{split}: expected a split among test, val")
    return [EvalSample(id=f"{split}:{s.seed - SPLITS[split][0]}", image=s.image, question=s.question.text,
                       answer=s.question.answer, qtype=s.question.qtype)
            for s in samples(split, n)]


def _jsonl(path: Path, n: int) -> list[EvalSample]:
    out: list[EvalSample] = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is no part of line 1
    except UnicodeDecodeError as exc:
        line = path.read_bytes().count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    # Only "\n" ends a JSONL line: str.splitlines also splits at U+2028, U+0085, form feeds ..., which JSON
    # strings may hold raw, and would cut such a record in two and misnumber the lines after it.
    for number, line in enumerate(text.split("\n"), 1):
        if len(out) == n:
            break
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object with {', '.join(REQUIRED)}, got "
                               f"{type(record).__name__}")
        if "image" not in record and "file_name" in record:
            record["image"] = record["file_name"]
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}; a record needs "
                               f"{', '.join(REQUIRED)} (and may have type, id); got keys {sorted(record)}")
        for key in (*REQUIRED, "type", "id"):
            if key in record and not isinstance(record[key], str):
                raise DatasetError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__} "
                                   f"{record[key]!r}")
        image = Path(record["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DatasetError(f"{where}: image {record['image']!r} does not exist (looked for {image})")
        if not record["answer"].strip():
            raise DatasetError(f"{where}: field 'answer' is empty")
        out.append(EvalSample(id=record.get("id", f"{path.name}:{number}"), image=image,
                              question=record["question"], answer=record["answer"], qtype=record.get("type"),
                              where=where))
    if not out:  # (not "pass --n 0": n >= 1 is required)
        raise DatasetError(f"{path}: holds no records (the file is empty or only blank lines); expected one JSON "
                           f"object per line with {', '.join(REQUIRED)}")
    if len(out) < n:
        raise DatasetError(f"{path}: holds {len(out)} records, but {n} were asked for; pass --n {len(out)} or "
                           "fewer")
    seen: dict[str, str] = {}
    for s in out:
        if s.id in seen:
            raise DatasetError(f"{s.where}: id {s.id!r} appears more than once (first at {seen[s.id]}); ids must "
                               "be unique")
        seen[s.id] = s.where
    return out


# ------------------------------------------------------- data-parallel shards
def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The one-process batches (by index) rank ``rank`` of ``world`` evaluates: ``b % world == rank``."""
    return list(range(rank, math.ceil(n / batch_size), world))


def shard_samples(samples: list[EvalSample], batch_size: int, rank: int, world: int) -> list[EvalSample]:
    """The rank's questions: its batches, whole and in order (the runner batches them back exactly)."""
    return [s for b in shard_batches(len(samples), batch_size, rank, world)
            for s in samples[b * batch_size:(b + 1) * batch_size]]
