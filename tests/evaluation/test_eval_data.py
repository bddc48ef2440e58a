"""Evaluation data (arrcoc/evaluation/data.py): ToyVQA slices and a user's JSONL / folder, with located errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from arrcoc.errors import ArrcocError, DatasetError
from arrcoc.evaluation.data import describe, load_samples


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / name)
    return tmp_path


def write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def record(**kw):
    return json.dumps({"image": "a.png", "question": "what colour ?", "answer": "red", **kw})


def test_toyvqa_slice():
    samples = load_samples(None, 3)
    assert [s.id for s in samples] == ["test:0", "test:1", "test:2"]
    from arrcoc.toyvqa import sample

    assert samples[1].question == sample("test", 1).question.text and samples[1].answer == sample("test", 1).question.answer
    assert samples[0].qtype in ("colour", "shape", "presence", "position", "count")
    assert [s.id for s in load_samples("toyvqa:val", 2)] == ["val:0", "val:1"]
    assert describe(None) == describe("toyvqa") == "toyvqa:test"
    with pytest.raises(DatasetError, match="test, val"):
        load_samples("toyvqa:train", 2)


def test_jsonl_and_folder(folder):
    path = write(folder / "data.jsonl", record(type="colour", id="q1"), "", record(image=str(folder / "b.png"),
                                                                                     answer="Blue"))
    samples = load_samples(path, 2)
    assert [s.id for s in samples] == ["q1", "data.jsonl:3"]
    assert samples[0].qtype == "colour" and samples[1].qtype is None
    assert samples[1].load_image().size == (16, 16)
    write(folder / "metadata.jsonl", json.dumps({"file_name": "a.png", "question": "q ?", "answer": "yes"}))
    (only,) = load_samples(folder, 1)
    assert only.image == folder / "a.png" and only.answer == "yes"


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "question": "q ?"', r"data\.jsonl:2: not valid JSON"),
    ('["a.png", "q ?", "red"]', r"data\.jsonl:2: expected a JSON object"),
    ('{"image": "a.png", "question": "q ?"}', r"data\.jsonl:2: missing field\(s\) answer"),
    ('{"image": "a.png", "question": "q ?", "answer": 3}', r"data\.jsonl:2: field 'answer' must be a string"),
    ('{"image": "nope.png", "question": "q ?", "answer": "red"}', r"data\.jsonl:2: image 'nope\.png' does not exist"),
    ('{"image": "a.png", "question": "q ?", "answer": " "}', r"data\.jsonl:2: field 'answer' is empty"),
])
def test_a_bad_line_is_an_error_naming_file_and_line(folder, line, message):
    path = write(folder / "data.jsonl", record(), line, record())
    with pytest.raises(DatasetError, match=message) as info:
        load_samples(path, 3)
    assert isinstance(info.value, ArrcocError)


def test_mismatches_are_errors(folder):
    path = write(folder / "data.jsonl", record(id="x"), record(id="x"))
    with pytest.raises(DatasetError, match="id 'x' appears more than once"):
        load_samples(path, 2)
    with pytest.raises(DatasetError, match=r"holds 2 records, but 5 were asked for; pass --n 2"):
        load_samples(path, 5)
    with pytest.raises(DatasetError, match="must hold metadata.jsonl"):
        load_samples(folder, 1)
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_samples(folder / "missing.jsonl", 1)
    (folder / "c.png").write_bytes(b"not a png")
    bad = write(folder / "bad.jsonl", record(image="c.png"))
    (sample,) = load_samples(bad, 1)  # the file exists; decoding fails when it is used, naming the line
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: image .*c\.png' cannot be read"):
        sample.load_image()
    latin = folder / "latin.jsonl"
    latin.write_bytes(record().encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DatasetError, match=r"latin\.jsonl:2: not UTF-8"):
        load_samples(latin, 2)


def test_lines_are_split_on_newlines_only(folder):
    """JSON strings may hold U+2028, U+0085 or a form feed raw (``json.dumps(..., ensure_ascii=False)`` writes
    them so); only ``\\n`` ends a JSONL line, so such records load and later lines keep their numbers.  A UTF-8
    byte order mark (Windows editors) is no part of the first record."""
    text = "\n".join([json.dumps({"image": "a.png", "question": f"what{sep}colour ?", "answer": "red"},
                                 ensure_ascii=False) for sep in ("\u2028", "\x85", "\x0c")]
                     + ['{"image": "a.png", "question": "q ?"}']) + "\r\n"
    path = folder / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    samples = load_samples(path, 3)
    assert [s.question for s in samples] == ["what\u2028colour ?", "what\x85colour ?", "what\x0ccolour ?"]
    assert [s.where.rsplit(":", 1)[1] for s in samples] == ["1", "2", "3"]
    with pytest.raises(DatasetError, match=r"data\.jsonl:4: missing field\(s\) answer"):
        load_samples(path, 4)
    path.write_text("\r\n".join([record(id="w1"), record(id="w2")]) + "\r\n", encoding="utf-8-sig")
    assert [s.id for s in load_samples(path, 2)] == ["w1", "w2"]
