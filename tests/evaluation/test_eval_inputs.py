"""Bad ``arrcoc eval`` inputs are refused with a clear error before any model loads (issue 16).

No test here needs the model: ``load_model`` is replaced by one that fails the test if it is reached, so
every error must come first.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from arrcoc.cli import main
from arrcoc.errors import BudgetError, DatasetError, InputError
from arrcoc.evaluation import evaluate, runner
from arrcoc.evaluation.data import load_samples


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def unreachable(*args, **kwargs):
        raise AssertionError("the model was loaded: the bad input should have been refused before")

    monkeypatch.setattr(runner, "load_model", unreachable)


@pytest.mark.parametrize("budgets", ["", ",", " , ", "0.5,,0.25", "0.5,"])
def test_cli_budgets_with_an_empty_item_are_a_usage_error(budgets, tmp_path):
    result = CliRunner().invoke(main, ["eval", "random_keep", "--budgets", budgets, "--n", "2",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"--budgets: expected comma-separated fractions such as 1.0,0.5,0.25, got {budgets!r}" in result.output


def test_no_budget_is_an_error_not_an_empty_table(tmp_path):
    with pytest.raises(BudgetError, match=r"^arrcoc eval: no budget given; pass at least one fraction"):
        evaluate(["random_keep"], budgets=[], n=2, out=tmp_path / "out", progress=False)


@pytest.mark.parametrize("budgets, message", [
    ([0.5, 0.5000001], r"budget 0\.5000001 and 0\.5 are one budget at the precision rows are labelled with \(0\.5\)"),
    ([0.25, 0.5, 0.25], r"budget 0\.25 repeats"),
    ([1, 1.0], r"budget 1\.0 repeats"),
])
def test_budgets_that_share_a_row_label_are_refused(budgets, message, tmp_path):
    """results.csv labels a row by its budget to 6 significant digits, and a resume finds rows by that label:
    two budgets printing alike would write two rows of one label (and a resume would take one for the other)."""
    with pytest.raises(BudgetError, match=message):
        evaluate(["random_keep"], budgets=budgets, n=2, out=tmp_path / "out", progress=False)
    result = CliRunner().invoke(main, ["eval", "random_keep", "--budgets", "0.5,0.5000001", "--n", "2",
                                       "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "are one budget at the precision" in result.output, result.output


@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_an_out_folder_under_a_file_is_an_error_naming_the_file(below, tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    out = file / below if below else file
    where = "it" if not below else f"'{file}' above it"
    with pytest.raises(InputError, match=rf"output folder '{out}' cannot be created: {where} is a file, not a folder"):
        evaluate(["random_keep"], budgets=[0.5], n=2, out=out, progress=False)
    if below:  # click refuses an existing file itself as --out (file_okay=False)
        result = CliRunner().invoke(main, ["eval", "random_keep", "--budgets", "0.5", "--n", "2", "--out", str(out)])
        assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_jsonl_says_it_is_empty(text, tmp_path):
    """Not 'pass --n 0 or fewer': the CLI refuses --n 0."""
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    with pytest.raises(DatasetError, match=r"data\.jsonl: holds no records \(the file is empty or only blank lines\)"):
        load_samples(data, 1)
    result = CliRunner().invoke(main, ["eval", "random_keep", "--data", str(data), "--n", "1",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "holds no records" in result.output and "--n 0" not in result.output


def test_threads_beyond_what_torch_takes_are_a_usage_error(tmp_path):
    """torch.set_num_threads(100000) is accepted and crashes the process; 2^31 overflows."""
    for threads in ("100000", str(2**31)):
        result = CliRunner().invoke(main, ["eval", "random_keep", "--budgets", "0.5", "--n", "2", "--threads", threads,
                                           "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '--threads': {threads} is not in the range 1<=x<=1024." in result.output


def test_an_out_folder_under_the_home_of_no_user_is_an_error_naming_it(tmp_path):
    """'~name/...' of no user 'name' (the shell leaves it as it is) was a raw RuntimeError from expanduser."""
    out = "~no_such_user_x/results"
    with pytest.raises(InputError, match=r"output folder '~no_such_user_x/results' cannot be created: "
                                         r"'~no_such_user_x' names no user's home folder; pass another --out"):
        evaluate(["random_keep"], budgets=[0.5], n=2, out=out, progress=False)
    result = CliRunner().invoke(main, ["eval", "random_keep", "--budgets", "0.5", "--n", "2", "--out", out])
    assert result.exit_code == 2 and "names no user's home folder" in result.output, result.output
