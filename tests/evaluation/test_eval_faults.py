"""``arrcoc eval`` under faults: a run killed by PID, and a results folder left damaged (issue 16).

Whatever state a run leaves, a resume evaluates nothing twice, loses nothing, or stops with a clear error
naming the file. Each test counts the ``generate`` passes a resume makes (``_Runner.run`` calls, by method).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from arrcoc.errors import InputError  # noqa: E402
from arrcoc.evaluation import ALL_TOKENS, COLUMNS, evaluate, runner, store  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::arrcoc.errors.ArrcocWarning")
N = 4
BUDGETS = [0.5, 0.25]
KEYS = [(ALL_TOKENS, "1"), ("random_keep", "0.5"), ("random_keep", "0.25")]


def run_eval(out, model, budgets=BUDGETS, log=None):
    return evaluate(["random_keep"], budgets=budgets, n=N, out=out, model=model, batch_size=4, progress=False,
                    plots=False, baselines=False, log=log)


@pytest.fixture(scope="module")
def finished(toy, tmp_path_factory):
    """A finished run's folder (copied by each test before it damages it)."""
    out = tmp_path_factory.mktemp("finished")
    run_eval(out, toy)
    return out


@pytest.fixture
def passes(monkeypatch):
    """The methods a run evaluates, in order (the reference run is 'all tokens')."""
    calls: list[str] = []
    original = runner._Runner.run

    def counting(self, spec, *args, **kwargs):
        calls.append(spec.name)
        return original(self, spec, *args, **kwargs)

    monkeypatch.setattr(runner._Runner, "run", counting)
    return calls


def rows_of(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def keys_of(out):
    return [(r["method"], r["budget"]) for r in rows_of(out)]


def copy(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


@pytest.mark.parametrize("cut", [0.5, 0.05, 0.999])
def test_a_half_written_last_row_is_dropped_and_computed_again(toy, finished, tmp_path, passes, cut):
    out = copy(finished, tmp_path)
    text = (out / "results.csv").read_bytes()
    last = text.rstrip(b"\r\n").rfind(b"\n") + 1        # where the last row starts
    end = len(text.rstrip(b"\r\n"))
    (out / "results.csv").write_bytes(text[:last + max(1, int((end - last) * cut))])
    said: list[str] = []
    result = run_eval(out, toy, log=said.append)
    assert passes == ["random_keep"]  # that row only: neither the reference nor the finished rows again
    assert any("results.csv:4: the last row was cut off mid-write" in line for line in said), said
    assert keys_of(out) == KEYS
    expected = {(r["method"], r["budget"]): r for r in rows_of(finished)}
    for row in rows_of(out):  # the numbers that do not depend on the clock are those of the finished run
        before = expected[row["method"], row["budget"]]
        for column in ("accuracy", "loyalty", "kl", "visual_tokens", "params"):
            assert row[column] == before[column], column
    assert [(r["method"], r["budget"]) for r in result.rows] == [(m, float(b)) for m, b in KEYS]


def test_a_damaged_reference_is_computed_again_and_no_row_is(toy, finished, tmp_path, passes):
    out = copy(finished, tmp_path)
    data = (out / "reference.pt").read_bytes()
    (out / "reference.pt").write_bytes(data[: len(data) // 2])
    said: list[str] = []
    run_eval(out, toy, budgets=[*BUDGETS, 0.125], log=said.append)
    assert passes == ["all tokens", "random_keep"]  # the reference, and the one new budget
    assert any("reference.pt: cannot be read" in line and "computed again" in line for line in said), said
    assert keys_of(out) == [*KEYS, ("random_keep", "0.125")]
    passes.clear()
    run_eval(out, toy, budgets=[*BUDGETS, 0.125])   # rewritten whole: read back, nothing computed
    assert passes == []


@pytest.mark.parametrize("damage", [b'{"model": "arrc', b"", b"[1, 2]", b"\xff\xfe{}"])
def test_a_damaged_run_json_is_an_error_naming_it(toy, finished, tmp_path, passes, damage):
    out = copy(finished, tmp_path)
    (out / "run.json").write_bytes(damage)
    with pytest.raises(InputError, match=rf"^{out / 'run.json'}: cannot be read \(.+\); it records what results.csv "
                                         r"beside it was computed with, so those rows cannot be resumed"):
        run_eval(out, toy)
    assert passes == []


def test_a_damaged_run_json_with_no_results_beside_it_is_written_again(toy, finished, tmp_path, passes):
    out = copy(finished, tmp_path)
    (out / "run.json").write_bytes(b'{"model": "arrc')
    (out / "results.csv").unlink()   # nothing depends on it
    run_eval(out, toy, budgets=[0.5])
    assert passes == ["random_keep"]   # the reference.pt beside it records its own settings: reused
    assert keys_of(out) == KEYS[:2]
    assert json.loads((out / "run.json").read_text())["n"] == N


def test_a_second_row_for_one_method_and_budget_is_an_error_naming_both_lines(toy, finished, tmp_path):
    out = copy(finished, tmp_path)
    lines = (out / "results.csv").read_bytes().splitlines(keepends=True)
    (out / "results.csv").write_bytes(b"".join([*lines, lines[2]]))
    with pytest.raises(InputError, match=r"results\.csv:5: a second row for random_keep at budget 0\.5 \(first at "
                                         r"line 3\)"):
        run_eval(out, toy)


CHILD = """
import sys, time
from arrcoc.evaluation import runner

original = runner._Runner.run
methods = []

def run(self, spec, *args, **kwargs):
    if spec.name != "all tokens":
        methods.append(spec.name)
        if len(methods) == 2:     # the first method row is in results.csv: wait here to be killed
            print("waiting", flush=True)
            time.sleep(120)
    return original(self, spec, *args, **kwargs)

runner._Runner.run = run
from arrcoc.cli import main
main(sys.argv[1:])
"""


def test_a_run_killed_by_pid_resumes_where_it_stopped(tmp_path, passes):
    """A real ``arrcoc eval`` process (the shipped model, as the CLI loads it) is SIGKILLed while it evaluates its
    second method row; the resume evaluates only the rows that were not written."""
    out = tmp_path / "killed"
    budgets = "0.5,0.25,0.125"
    stderr = (tmp_path / "stderr.txt").open("wb")  # a file, not a pipe nobody reads (a full pipe would block it)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "eval", "random_keep", "--budgets", budgets, "--n", str(N), "--batch-size", "4",
         "--no-baselines", "--no-plots", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        line = b""
        while b"waiting" not in line and time.monotonic() < deadline and child.poll() is None:
            line = child.stdout.readline()
        assert b"waiting" in line, (tmp_path / "stderr.txt").read_text()[-2000:]
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        stderr.close()
    assert keys_of(out) == KEYS[:2]   # what was finished, whole
    evaluate(["random_keep"], budgets=[float(b) for b in budgets.split(",")], n=N, out=out, batch_size=4,
             progress=False, plots=False, baselines=False)
    assert passes == ["random_keep", "random_keep"]   # 0.25 and 0.125: not the reference, not 0.5
    assert keys_of(out) == [*KEYS, ("random_keep", "0.125")]
    assert not list(out.glob(".*.tmp"))


def test_a_resumed_row_keeps_the_budget_asked_for_not_its_six_digit_label(toy, tmp_path, passes):
    """results.csv writes 1/3 as 0.333333: a resumed row read back at that label was a second budget beside the
    1/3 of the rows computed now (two '0.333333' columns in the tables, and ``row(m, 1/3)`` a KeyError)."""
    from arrcoc.evaluation.output import accuracy_grid

    out = tmp_path / "third"
    kwargs = dict(budgets=[1 / 3], n=N, out=out, model=toy, batch_size=4, progress=False, plots=False,
                  baselines=False)
    evaluate(["random_keep"], **kwargs)
    passes.clear()
    result = evaluate(["random_keep", "pool"], **kwargs)
    assert passes == ["pool"]   # random_keep resumed
    assert [(r["method"], r["budget"]) for r in result.rows] == [(ALL_TOKENS, 1.0), ("random_keep", 1 / 3),
                                                                 ("pool", 1 / 3)]
    assert accuracy_grid(result.rows)[0] == [1.0, 1 / 3]
    assert result.row("random_keep", 1 / 3)["status"] == "ok" and result.row("pool", 0.333333)["status"] == "ok"
    assert "| 1 | 0.333333 |" in (out / "results.md").read_text()


def _results_csv(*last: str) -> bytes:
    row = "{},method,0.5,ok," + ",".join(["1"] * 13) + ",{{}},,p.yaml"   # 20 columns
    return "\r\n".join([",".join(COLUMNS), row.format("a"), *(row.format(m) for m in last)]).encode()


def test_a_last_row_cut_inside_a_multibyte_character_is_dropped(tmp_path):
    """A cut inside a UTF-8 character of the last row was a raw UnicodeDecodeError, not a row computed again."""
    path = tmp_path / "results.csv"
    data = _results_csv("pipeline_é")
    path.write_bytes(data[:data.rfind("é".encode()) + 1])
    said: list[str] = []
    rows = store.read_rows(path, said.append)
    assert [r["method"] for r in rows] == ["a"]
    assert any("results.csv:3: the last row was cut off mid-write" in line for line in said), said
    path.write_bytes(data + b"\r\n")  # whole: read as it is
    assert [r["method"] for r in store.read_rows(path)] == ["a", "pipeline_é"]


def test_bytes_that_are_no_utf8_before_the_last_row_are_an_error_naming_the_line(tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(_results_csv("b", "c").replace(b"\r\nb,", b"\r\nb\xff,"))
    with pytest.raises(InputError, match=rf"^{path}:3: not UTF-8 text \(byte \d+\); the file was damaged"):
        store.read_rows(path)


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary_one(tmp_path, monkeypatch):
    """A full disk mid-write: the temporary file was left beside results.csv (taking the space a resume needs)
    and the error was a raw OSError traceback naming no file."""
    import errno

    path = tmp_path / "results.csv"
    store.atomic_write(path, b"before\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(InputError, match=rf"^{path}: cannot be written \(No space left on device\); the previous "
                                         r"version is kept"):
        store.atomic_write(path, b"after\n")
    assert path.read_bytes() == b"before\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
