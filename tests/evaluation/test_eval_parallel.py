"""``arrcoc eval`` data-parallel: ``--nproc N`` and ``torchrun`` give the one-process table; resume per shard.

Six ToyVQA questions in batches of 2 (three batches: rank 0 of 2 takes batches 0 and 2, rank 1 batch 1), the
shipped model, two pipelines at one budget.  Every column but the milliseconds must equal the one-process
run's, as written in results.csv (the same text).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from arrcoc.cli import main  # noqa: E402
from arrcoc.errors import InputError  # noqa: E402
from arrcoc.evaluation import data, evaluate, runner  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::arrcoc.errors.ArrcocWarning")
N, BATCH = 6, 2
#: --questions, not --n: torchrun's parser takes `--n` for an abbreviation of its own options.
ARGS = ["random_keep", "fastv", "--no-baselines", "--budgets", "0.5", "--questions", str(N), "--batch-size", str(BATCH),
        "--no-plots"]
#: Rows (method, budget) of ARGS, in order.
ROWS = [("all tokens", "1"), ("random_keep", "0.5"), ("fastv", "0.5")]
#: Every column measured in milliseconds (per rank in a data-parallel run); all the others must be equal.
TIMES = {"prefill_ms", "llm_prefill_ms", "total_ms"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", runner.HALT_ENV)}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def _arrcoc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arrcoc", "eval", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=300)


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _same_but_times(rows: list[dict[str, str]], expected: list[dict[str, str]]) -> None:
    assert [(r["method"], r["budget"]) for r in rows] == ROWS
    assert [{k: v for k, v in r.items() if k not in TIMES} for r in rows] == \
           [{k: v for k, v in r.items() if k not in TIMES} for r in expected]


def _ledger(out: Path) -> list[tuple[str, str, str]]:
    """Every (method, budget, question) the ranks recorded as evaluated, over every run into ``out``."""
    seen = []
    for path in sorted((out / "shards").glob("rank*/evaluated.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            seen += [(record["method"], record["budget"], q) for q in record["questions"]]
    return seen


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    result = CliRunner().invoke(main, ["eval", *ARGS, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = _table(out)
    assert [(r["method"], r["budget"]) for r in rows] == ROWS
    # the table measures something: the pruned rows differ from the reference in KL and visual tokens
    assert float(rows[1]["kl"]) > 0 and float(rows[1]["visual_tokens"]) < float(rows[0]["visual_tokens"])
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    done = _arrcoc(*ARGS, "--out", str(out), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sharding_keeps_the_one_process_batches_whole():
    assert data.shard_batches(7, 2, 0, 2) == [0, 2] and data.shard_batches(7, 2, 1, 2) == [1, 3]
    samples = list(range(7))
    shards = [data.shard_samples(samples, 2, r, 3) for r in range(3)]
    assert shards == [[0, 1, 6], [2, 3], [4, 5]]
    assert data.shard_samples(samples, 8, 1, 2) == []   # one batch: rank 1 has nothing to do


def test_nproc_2_gives_the_one_process_table(one, two):
    _same_but_times(_table(two), _table(one))
    # each question of each row evaluated once, on the rank of its batch
    ledger = _ledger(two)
    assert sorted(ledger) == sorted((m, b, f"test:{q}") for m, b in ROWS for q in range(N))
    rank1 = [json.loads(line) for line in (two / "shards/rank1-of2/evaluated.jsonl").read_text().splitlines()]
    assert {tuple(r["questions"]) for r in rank1} == {("test:2", "test:3")}
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert "Times are per rank" in (two / "results.md").read_text()


def test_a_killed_rank_resumes_its_shard_without_recomputing(one, tmp_path):
    """--nproc 2 with rank 1 killed by its PID mid-run, resumed by torchrun: each rank resumes its own shard."""
    out = tmp_path / "killed"
    # rank 1 stops after its reference and first row, and waits; it is killed by its PID mid-run
    run = subprocess.Popen([sys.executable, "-m", "arrcoc", "eval", *ARGS, "--out", str(out), "--nproc", "2"],
                           env=_env(**{runner.HALT_ENV: "1:2"}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    halted = out / "shards/rank1-of2/halted"
    deadline = time.monotonic() + 240
    while not halted.is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert halted.is_file(), run.communicate(timeout=60)[1][-3000:]
    os.kill(int(halted.read_text()), signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    assert "rank 1 of 2 exited" in stderr and "resume" in stderr
    assert not (out / "results.csv").exists()
    before = _ledger(out)
    assert [(m, b) for m, b, q in before if q == "test:2"] == [ROWS[0], ROWS[1]]   # rank 1's two rows
    files = {path: path.read_text() for path in (out / "shards").glob("rank*/evaluated.jsonl")}
    halted.unlink()

    # torchrun's ranks resume the shards --nproc's ranks left (the same rank{r}-of{w} folders)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "arrcoc", "eval", *ARGS, "--out", str(out)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(path.read_text().startswith(text) for path, text in files.items())   # appended to, not rewritten
    after = _ledger(out)
    assert len(after) > len(before)
    # no question of any row evaluated twice, none lost
    assert sorted(after) == sorted((m, b, f"test:{q}") for m, b in ROWS for q in range(N))
    _same_but_times(_table(out), _table(one))


def test_resuming_with_another_world_size_is_an_error(one, two, monkeypatch):
    kwargs = dict(baselines=False, budgets=[0.5], n=N, batch_size=BATCH, progress=False, plots=False)
    with pytest.raises(InputError, match=r"2-process run \(shards/rank0-of2\).*this run has 1 process;.*--nproc 2"):
        evaluate(["random_keep", "fastv"], out=two, **kwargs)
    # a rank of torchrun with 3 processes (every rank checks before any collective, so none waits)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InputError, match=r"2-process run .*this run has 3 processes;.*torchrun --nproc-per-node 2"):
        evaluate(["random_keep", "fastv"], out=two, **kwargs)
    # a one-process folder keeps no per-question outcomes to shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="holds the results of a one-process run"):
        evaluate(["random_keep", "fastv"], out=one, **kwargs)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    _same_but_times(_table(two), _table(one))   # the folders are left as they were
    with pytest.raises(InputError, match="use one or the other"):   # --nproc under torchrun
        monkeypatch.setenv("WORLD_SIZE", "2")
        evaluate(["random_keep"], out=two, processes=2, **kwargs)
