"""``arrcoc eval`` end to end on a slice of ToyVQA with the shipped model (whatever weights it holds).

One small run (8 questions, batches of 4, budgets 1.0 and 0.25) is shared by most tests; its numbers are
checked against independent computations: ``toyvqa.evaluate`` for the uncompressed accuracy, the report's
token counts, exact loyalty and KL for keep-everything pipelines.
"""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

import arrcoc  # noqa: E402
import arrcoc.toyvqa as toyvqa  # noqa: E402
from arrcoc.cli import main  # noqa: E402
from arrcoc.errors import ArrcocError, BudgetError, InputError, MissingInputError  # noqa: E402
from arrcoc.evaluation import ALL_TOKENS, COLUMNS, DOWNSAMPLE, evaluate, runner  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::arrcoc.errors.ArrcocWarning")
N = 8
PIPELINES = ["random_keep", "fastv", "tome"]


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = evaluate(PIPELINES, budgets=[1.0, 0.25], n=N, out=out, model=toy, batch_size=4, progress=False)
    return result, out


def test_every_method_and_budget_has_a_row(run):
    result, out = run
    keys = [(r["method"], r["budget"]) for r in result.rows]
    assert keys == [(ALL_TOKENS, 1.0), (DOWNSAMPLE, 1.0), (DOWNSAMPLE, 0.25), ("random_keep", 1.0),
                    ("random_keep", 0.25), ("pool", 1.0), ("pool", 0.25), ("fastv", 1.0), ("fastv", 0.25),
                    ("tome", 1.0), ("tome", 0.25)]
    kinds = {r["method"]: r["kind"] for r in result.rows}
    assert kinds == {ALL_TOKENS: "baseline", DOWNSAMPLE: "baseline", "pool": "baseline", "random_keep": "baseline",
                     "fastv": "method", "tome": "method"}
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["budget"])) for r in rows] == keys
    assert set(COLUMNS) <= set(rows[0])


def test_uncompressed_accuracy_is_toyvqa_evaluate(toy, run):
    model, processor = toy
    expected = toyvqa.evaluate(model, processor, n=N, batch_size=4, progress=False)
    row = run[0].row(ALL_TOKENS, 1.0)
    assert row["accuracy"] == expected.overall
    for qtype, accuracy in expected.per_type.items():
        if expected.accuracy.per_type[qtype][1]:
            assert row[f"acc_{qtype}"] == accuracy


def test_keep_everything_is_loyal_with_zero_kl(run):
    result, _ = run
    for method in (ALL_TOKENS, DOWNSAMPLE, "pool", "random_keep", "fastv", "tome"):
        row = result.row(method, 1.0)
        assert row["loyalty"] == 1.0, method
        assert row["kl"] == pytest.approx(0.0, abs=1e-9), method
        assert row["accuracy"] == result.row(ALL_TOKENS, 1.0)["accuracy"]
        assert row["visual_tokens"] == row["visual_tokens_in"] == 256


def test_compressed_rows_measure_tokens_and_cost(run):
    result, _ = run
    full = result.row(ALL_TOKENS, 1.0)
    for method in ("random_keep", "pool", "tome", DOWNSAMPLE):
        row = result.row(method, 0.25)
        assert row["visual_tokens"] == 64 and row["visual_fraction"] == 0.25, method
        assert row["visual_tokens_layers"] == "64.00;64.00;64.00"
        assert row["prefill_gflops"] < 0.4 * full["prefill_gflops"]
        assert row["kv_bytes"] < 0.4 * full["kv_bytes"]
        assert 0 <= row["loyalty"] <= 1 and row["kl"] >= 0
    assert json.loads(result.row("random_keep", 0.25)["params"]) == {"compress[0]": {"keep": 64}}
    assert json.loads(result.row(DOWNSAMPLE, 0.25)["params"]) == {"image": {"grid": [8, 8], "height": 64, "width": 64}}
    tome = result.row("tome", 0.25)
    # One merge round per tower block that produced the features (4 of the 5: LLaVA reads layer -2).
    assert json.loads(tome["params"]) == {"compress[0]": {"r": [75, 53, 37, 27]}}
    assert "runs after the vision tower" in tome["note"]
    # Loyalty and accuracy agree with each other: a loyal answer is right exactly when the reference's is.
    for r in result.rows:
        if r["status"] == "ok":
            assert abs(r["accuracy"] - full["accuracy"]) <= 1 - r["loyalty"] + 1e-12


def test_unreachable_budget_is_a_row_that_says_why(run):
    row = run[0].row("fastv", 0.25)
    assert row["status"] == "unreachable" and row["accuracy"] is None
    assert "out of reach" in row["note"] and "fastv" in row["note"]


def test_outputs(run):
    result, out = run
    md = (out / "results.md").read_text()
    assert "| random_keep * |" in md and "| fastv | " in md and "unreachable" in md
    assert f"{result.row('random_keep', 0.25)['accuracy']:.1%} (64.0)" in md
    for name in ("accuracy_vs_tokens", "accuracy_vs_prefill_ms", "accuracy_by_type"):
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    assert json.loads((out / "run.json").read_text())["n"] == N
    assert arrcoc.evaluate is evaluate  # the Python API of `arrcoc eval`


def test_resume_skips_done_rows_and_reuses_the_reference(toy, run, monkeypatch, tmp_path):
    _, out = run
    calls = []
    original = runner._Runner.run

    def counting(self, spec, *args, **kwargs):
        calls.append(spec.name)
        return original(self, spec, *args, **kwargs)

    monkeypatch.setattr(runner._Runner, "run", counting)
    before = (out / "results.csv").read_text()
    again = evaluate(PIPELINES, budgets=[1.0, 0.25], n=N, out=out, model=toy, batch_size=4, progress=False,
                     plots=False)
    assert calls == []  # nothing recomputed, not even the reference
    assert (out / "results.csv").read_text() == before
    assert again.row("random_keep", 0.25)["accuracy"] == run[0].row("random_keep", 0.25)["accuracy"]
    more = evaluate(["random_keep"], budgets=[0.25, 0.5], n=N, out=out, model=toy, batch_size=4, progress=False,
                    plots=False)
    assert sorted(calls) == ["all tokens", "pool", "random_keep"]  # only the new budget 0.5 (downsample: no spec)
    assert more.row("random_keep", 0.5)["visual_tokens"] == 128
    # Other settings in the same folder: an error, never a mixed table.
    with pytest.raises(InputError, match=r"other settings \(n, samples"):
        evaluate(["random_keep"], budgets=[0.5], n=4, out=out, model=toy, batch_size=4, progress=False)


def test_a_pipeline_that_cannot_run_is_an_error_naming_it(toy, tmp_path):
    broken = {"name": "broken", "encoder": {"use": "timm_vit"},
              "compress": [{"use": "sparsevlm", "saliency": "cls_attn@99"}]}
    with pytest.raises(MissingInputError, match=r"arrcoc eval: broken at budget 0\.5: .*cls_attn@99"):
        evaluate([broken], budgets=[0.5], n=4, model=toy, batch_size=4, progress=False, baselines=False)
    with pytest.raises(InputError, match="two methods are named 'random_keep'"):
        evaluate(["random_keep", "random_keep"], n=4, model=toy, progress=False)
    with pytest.raises(BudgetError, match=r"in \(0, 1\]"):
        evaluate(["random_keep"], budgets=[0.0], n=4, model=toy, progress=False)


def test_cli(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_model", lambda model, device=None: (*toy, str(toyvqa.model_path())))
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["eval", "random_keep", "--budgets", "0.25", "--n", "4", "--batch-size", "4",
                                       "--out", str(out), "--no-baselines", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "random_keep" in result.output and "(64)" in result.output
    with open(out / "results.csv", newline="") as f:
        assert [(r["method"], r["budget"]) for r in csv.DictReader(f)] == [(ALL_TOKENS, "1"), ("random_keep", "0.25")]
    bad = CliRunner().invoke(main, ["eval", "--budgets", "half", "--out", str(out)])
    assert bad.exit_code == 2 and "--budgets" in bad.output
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "x.png", "question": "q"}\n')
    bad = CliRunner().invoke(main, ["eval", "--data", str(data), "--n", "1", "--out", str(out)])
    assert bad.exit_code == 2 and "data.jsonl:1: missing field(s) answer" in bad.output
    assert issubclass(type(arrcoc.DatasetError("x")), ArrcocError)


def test_a_right_padding_processor_is_padded_left_and_left_as_it_was(toy, run):
    """The answer position is the last prompt token: a processor passed as ``(model, processor)`` whose
    tokenizer pads on the right (many checkpoints' default) must give the same numbers, and keep its setting."""
    model, processor = toy
    processor.tokenizer.padding_side = "right"
    try:
        result = evaluate(["random_keep"], budgets=[1.0], n=N, model=(model, processor), batch_size=4,
                          progress=False, plots=False, baselines=False)
        assert processor.tokenizer.padding_side == "right"
    finally:
        processor.tokenizer.padding_side = "left"
    assert result.row(ALL_TOKENS, 1.0)["accuracy"] == run[0].row(ALL_TOKENS, 1.0)["accuracy"]
    row = result.row("random_keep", 1.0)
    assert row["loyalty"] == 1.0 and row["kl"] == pytest.approx(0.0, abs=1e-9)


def test_resume_with_another_batch_size_is_an_error(toy, run, tmp_path):
    """Per-image KV bytes (padding as allocated) and milliseconds depend on the batch size: rows of two batch
    sizes in one table would not compare.  A run.json from before the batch size was recorded is accepted."""
    _, out = run
    with pytest.raises(InputError, match=r"other settings \(batch_size: 4 -> 2\)"):
        evaluate(PIPELINES, budgets=[1.0, 0.25], n=N, out=out, model=toy, batch_size=2, progress=False, plots=False)
    older = tmp_path / "older"
    evaluate(["random_keep"], budgets=[0.25], n=4, out=older, model=toy, batch_size=4, progress=False, plots=False,
             baselines=False)
    meta = json.loads((older / "run.json").read_text())
    assert meta["batch_size"] == 4
    del meta["batch_size"]
    (older / "run.json").write_text(json.dumps(meta))
    calls = []
    original = runner._Runner.run
    try:
        runner._Runner.run = lambda self, spec, *a, **k: calls.append(spec.name) or original(self, spec, *a, **k)
        evaluate(["random_keep"], budgets=[0.25], n=4, out=older, model=toy, batch_size=4, progress=False,
                 plots=False, baselines=False)
    finally:
        runner._Runner.run = original
    assert calls == []  # the rows and the cached reference are reused


def test_plots_without_matplotlib_say_how_to_get_it_or_skip_them(monkeypatch, tmp_path):
    import sys

    from arrcoc.errors import PluginLoadError
    from arrcoc.evaluation.output import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` fail
    with pytest.raises(PluginLoadError, match=r"pip install 'arrcoc\[viz\]', or pass --no-plots"):
        plot(None, tmp_path)
