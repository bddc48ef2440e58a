"""ToyVQA as an lmms-eval task: exported offline, scored as ``arrcoc eval`` scores it.

``python -m arrcoc.lmms_tasks OUT --split test --n 1000`` writes

* ``OUT/test/metadata.jsonl`` and ``OUT/test/images/*.png``: the first ``n`` questions of the split, a
  Hugging Face ImageFolder that lmms-eval loads offline and that ``arrcoc eval --data OUT/test`` reads too
  (the same questions, the same lossless images);
* ``OUT/arrcoc_toyvqa.yaml``: the task ``arrcoc_toyvqa``, the shipped ``toyvqa.yaml`` (beside this file)
  with this export as its data, found with ``python -m lmms_eval --include_path OUT --tasks arrcoc_toyvqa``.

Scoring (``toyvqa_process_results``): the generated answer equals the reference ignoring case, surrounding
spaces and a final period (``arrcoc.evaluation.totals.normalise``), reported as ``exact_match`` over all
questions and ``acc_<type>`` per question type (colour, shape, presence, position, count), the columns of
``arrcoc eval``.  ToyVQA's answers are one token, and the task generates one, as ``arrcoc eval`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..evaluation.totals import normalise
from ..toyvqa import QUESTION_TYPES

TASK = "arrcoc_toyvqa"
#: The shipped task definition; an export's YAML includes it and names its data.
TASK_YAML = Path(__file__).with_name("toyvqa.yaml")


def toyvqa_doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def toyvqa_doc_to_text(doc: dict[str, Any]) -> str:
    # the bare question: the model's own prompt wraps it (arrcoc eval's prompt, arrcoc.evaluation.runner.prompt_for)
    return doc["question"]


def toyvqa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """``exact_match`` for every question; ``acc_<type>`` only for its own type (``None`` elsewhere, skipped)."""
    score = float(normalise(results[0]) == normalise(doc["answer"]))
    return {"exact_match": score, **{f"acc_{t}": score if doc["type"] == t else None for t in QUESTION_TYPES}}


def mean_present(items: list[Any]) -> float:
    """The mean of the scores of the questions a metric applies to (``None`` marks the others)."""
    scores = [x for x in items if x is not None]
    return sum(scores) / len(scores) if scores else float("nan")


def export(out: str | Path, split: str = "test", n: int = 1000) -> Path:
    """The first ``n`` questions of ToyVQA's ``split`` as an lmms-eval task folder (the module doc); its path."""
    from PIL import Image

    from ..evaluation.data import load_samples

    if not TASK_YAML.is_file():   # package data an installation left out: the export would name a missing file
        raise InputError(f"arrcoc.lmms_tasks: the shipped task definition {TASK_YAML} is missing from this "
                         "installation of arrcoc; reinstall it")
    out = Path(out).expanduser().resolve()
    samples = load_samples(f"toyvqa:{split}", n)   # DatasetError for a bad split or n
    folder = out / "test"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(samples):
        name = f"images/{i:05d}.png"
        Image.fromarray(s.load_image()).save(folder / name)
        lines.append(json.dumps({"file_name": name, "question": s.question, "answer": s.answer, "type": s.qtype,
                                 "id": s.id}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # JSON is YAML: the paths are quoted whatever characters they hold.
    (out / f"{TASK}.yaml").write_text(
        f"# ToyVQA {split}, questions 0..{n - 1}, exported by python -m arrcoc.lmms_tasks\n"
        f"include: {json.dumps(str(TASK_YAML))}\ntask: {TASK}\ndataset_path: {json.dumps(str(out))}\n",
        encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m arrcoc.lmms_tasks",
                                     description="Export ToyVQA as an lmms-eval task folder (--include_path OUT).")
    parser.add_argument("out", help="folder to write (OUT/arrcoc_toyvqa.yaml, OUT/test/metadata.jsonl, images)")
    parser.add_argument("--split", default="test", help="ToyVQA split: test or val (default test)")
    parser.add_argument("--n", type=int, default=1000, help="questions, the first n of the split (default 1000)")
    args = parser.parse_args(argv)
    try:
        out = export(args.out, args.split, args.n)
    except InputError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out}: python -m lmms_eval --model arrcoc --include_path {out} --tasks {TASK}")
    return 0
