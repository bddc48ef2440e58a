"""``python -m arrcoc.toyvqa``: show, baselines, and errors as one line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from rich.console import Console

from arrcoc.toyvqa import __main__ as cli
from arrcoc.toyvqa import sample


@pytest.fixture
def run(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=2000))
    monkeypatch.setattr(cli, "err_console", Console(width=2000, stderr=True))
    return lambda *args: CliRunner().invoke(cli.main, list(args))


def test_show_prints_question_answer_and_records(run, tmp_path):
    result = run("show", "--split", "test", "--index", "3", "--out", str(tmp_path / "s.png"))
    assert result.exit_code == 0, result.output
    s = sample("test", 3)
    assert s.question.text in result.output and s.question.answer in result.output
    assert s.objects[0].name in result.output
    assert (tmp_path / "s.png").stat().st_size > 0


def test_baselines_prints_a_table_per_type(run):
    result = run("baselines", "--n-train", "60", "--n-test", "20")
    assert result.exit_code == 0, result.output
    for word in ("majority", "template prior", "question lookup", "colour", "count", "overall"):
        assert word in result.output


def test_an_existing_run_is_one_red_line(run, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    pytest.importorskip("transformers")
    result = run("train", "--out", str(tmp_path), "--tiny", "--steps", "1")
    assert result.exit_code == 2
    assert "pass --resume" in result.output and "Traceback" not in result.output


def test_export_reads_the_shipped_name(run, tmp_path):
    pytest.importorskip("transformers")
    result = run("export", "arrcoc:toyvqa", str(tmp_path / "copy"), "--dtype", "float16")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    from arrcoc.toyvqa import model_path

    copied, shipped = load_file(tmp_path / "copy" / "model.safetensors"), load_file(model_path() / "model.safetensors")
    assert copied.keys() == shipped.keys() and all(copied[k].equal(shipped[k]) for k in shipped)


@pytest.mark.parametrize("option, value", [("--lr", "0"), ("--lr", "-1e-3"), ("--grounding-weight", "-0.1"),
                                           ("--attention-weight", "-1")])
def test_train_refuses_a_learning_rate_or_weight_out_of_range_before_building_anything(run, tmp_path, option, value):
    result = run("train", "--out", str(tmp_path / "run"), "--tiny", "--steps", "1", option, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "run").exists()
