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


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "Invalid value for '--lr': 'nan' is not a finite number."),
    ("--lr", "inf", "Invalid value for '--lr': 'inf' is not a finite number."),
    ("--grounding-weight", "nan", "Invalid value for '--grounding-weight': 'nan' is not a finite number."),
    ("--attention-weight", "inf", "Invalid value for '--attention-weight': 'inf' is not a finite number."),
    ("--seed", str(10**22), "Invalid value for '--seed': 10000000000000000000000 is not in the range"),
    ("--seed", "-1", "Invalid value for '--seed': -1 is not in the range"),
    ("--steps", str(10**30), f"TrainConfig.steps: expected an integer in [1, {2**63 - 1}], got {10**30}"),
    ("--threads", "100000", "Invalid value for '--threads': 100000 is not in the range 1<=x<=1024."),
])
def test_train_refuses_non_finite_or_too_large_numbers_before_building_anything(run, tmp_path, option, value, message):
    """``--lr nan`` passed click's FloatRange (no comparison with nan fails) and trained NaN weights; a seed
    of 10^22 overflowed in torch.manual_seed with a traceback."""
    result = run("train", "--out", str(tmp_path / "run"), "--tiny", "--steps", "1", option, value)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, message", [
    ({"lr": float("nan")}, r"^TrainConfig\.lr: expected a finite number > 0, got nan$"),
    ({"grad_clip": 0.0}, r"^TrainConfig\.grad_clip: expected a finite number > 0, got 0\.0$"),
    ({"weight_decay": -1e-3}, r"^TrainConfig\.weight_decay: expected a finite number >= 0, got -0\.001$"),
    ({"position_weight": float("inf")}, r"^TrainConfig\.position_weight: expected a finite number >= 0, got inf$"),
    ({"min_lr_ratio": 1.5}, r"^TrainConfig\.min_lr_ratio: expected a finite number >= 0 and <= 1, got 1\.5$"),
    ({"warmup": -1}, r"^TrainConfig\.warmup: expected an integer in \[0, 9223372036854775807\], got -1$"),
    ({"seed": 2**64}, r"^TrainConfig\.seed: expected an integer in \[0, 9223372036854775807\], got 18446744073709551616$"),
    ({"batch_images": 2.5}, r"^TrainConfig\.batch_images: expected an integer in \[1, 9223372036854775807\], got 2\.5$"),
])
def test_train_config_refuses_what_the_cli_refuses(changes, message):
    from arrcoc.errors import InputError
    from arrcoc.toyvqa.train import TrainConfig

    with pytest.raises(InputError, match=message):
        TrainConfig(**changes)
    assert TrainConfig().lr == 1e-3 and TrainConfig(min_lr_ratio=1.0, warmup=0, attention_weight=0.0).warmup == 0
