"""arrcoc as an lmms-eval model, on the shipped ToyVQA task: the same numbers as ``arrcoc eval``.

These tests need the ``lmms`` extra (lmms-eval); they run in CI's own environment (.ci/lmms-env), where
skipping fails the lane.  lmms-eval runs as a user runs it (``python -m lmms_eval``, the model found through
the ``lmms_eval.models`` entry point, the task through ``--include_path``), offline, against
``arrcoc.evaluate`` on the very questions of the export, in batches of the same size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="the lmms extra (lmms-eval) is not installed: pip install 'arrcoc[lmms]'")

import torch  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc.errors import BudgetError, InputError, UnknownPipelineError  # noqa: E402
from arrcoc.evaluation.totals import normalise  # noqa: E402
from arrcoc.toyvqa import QUESTION_TYPES  # noqa: E402

N = 40          # 5 batches of 8: every question type present
BATCH = 8
BUDGET = 0.111  # the example budget: cdpruner keeps 28 of 256 tokens
REPORT = ("visual_tokens", "visual_tokens_in", "prefill_gflops", "kv_bytes")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("hf")
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache),
            "HF_HOME": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from arrcoc.lmms_tasks import export

    return export(tmp_path_factory.mktemp("task"), split="test", n=N)


@pytest.fixture(scope="module")
def reference(task: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[arrcoc.evaluation.runner.EvalResult, Path]:
    """``arrcoc eval`` on the exported questions: all tokens and cdpruner at BUDGET."""
    out = tmp_path_factory.mktemp("eval")
    result = arrcoc.evaluate(["cdpruner"], budgets=[BUDGET], data=str(task / "test"), n=N, batch_size=BATCH,
                             baselines=False, out=out, progress=False, plots=False, device="cpu")
    return result, out


def lmms_eval(task: Path, out: Path, env: dict[str, str], model_args: str) -> dict:
    """``python -m lmms_eval`` on the exported task; its results JSON."""
    command = [sys.executable, "-m", "lmms_eval", "--model", "arrcoc", "--model_args", model_args,
               "--include_path", str(task), "--tasks", "arrcoc_toyvqa", "--output_path", str(out), "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    files = sorted(out.rglob("*_results.json"))
    assert done.returncode == 0 and files, f"lmms-eval failed ({done.returncode}):\n{done.stdout[-3000:]}\n" \
                                           f"{done.stderr[-5000:]}"
    return json.loads(files[-1].read_text())


def assert_same_scores(results: dict, row: dict) -> None:
    scores = results["results"]["arrcoc_toyvqa"]
    assert scores["exact_match,none"] == row["accuracy"]
    for t in QUESTION_TYPES:
        assert scores[f"acc_{t},none"] == row[f"acc_{t}"], t
    throughput = results["throughput"]
    assert throughput["avg_arrcoc_images"] == N
    for field in REPORT:   # the same plan, the same calls: the report's counts are arrcoc eval's columns
        assert throughput[f"avg_arrcoc_{field}"] == pytest.approx(row[field], rel=1e-9), field
    for field in ("prefill_ms", "llm_prefill_ms", "total_ms"):
        assert throughput[f"avg_arrcoc_{field}"] > 0, field


def test_the_entry_point_names_the_model() -> None:
    from lmms_eval.models import get_model

    from arrcoc.integrations.lmms.model import ArrcocLMM

    assert get_model("arrcoc") is ArrcocLMM


def test_keep_everything_scores_what_arrcoc_eval_reports_for_all_tokens(task, reference, env, tmp_path) -> None:
    result, _ = reference
    row = result.row("all tokens", 1.0)
    assert 0.0 < row["accuracy"] < 1.0 and row["visual_tokens"] == 256   # a score that could differ
    results = lmms_eval(task, tmp_path, env, f"pretrained=arrcoc:toyvqa,batch_size={BATCH}")
    assert_same_scores(results, row)
    assert results["n-samples"]["arrcoc_toyvqa"]["effective"] == N


def test_a_pruning_pipeline_scores_what_arrcoc_eval_reports_at_that_budget(task, reference, env, tmp_path) -> None:
    result, _ = reference
    row = result.row("cdpruner", BUDGET)
    assert row["status"] == "ok" and row["visual_tokens"] == 28
    assert row["accuracy"] != result.row("all tokens", 1.0)["accuracy"]   # pruning changed answers
    results = lmms_eval(task, tmp_path, env, f"pretrained=arrcoc:toyvqa,pipeline=cdpruner,budget={BUDGET},"
                                             f"batch_size={BATCH}")
    assert_same_scores(results, row)
    assert "pipeline=cdpruner" in results["config"]["model_args"]


def test_two_processes_score_what_one_does(task, reference, env, tmp_path) -> None:
    """``torchrun --nproc-per-node 2 -m lmms_eval`` (gloo on the CPU; ``accelerate launch`` starts one process
    where there is no GPU): each rank runs its shard, the report's sums are added over both."""
    result, _ = reference
    row = result.row("cdpruner", BUDGET)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lmms_eval",
               "--model", "arrcoc", "--model_args",
               f"pretrained=arrcoc:toyvqa,pipeline=cdpruner,budget={BUDGET},batch_size={BATCH}",
               "--include_path", str(task), "--tasks", "arrcoc_toyvqa", "--output_path", str(tmp_path),
               "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    files = sorted(tmp_path.rglob("*_results.json"))
    assert done.returncode == 0 and files, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "Running on rank 1" in done.stdout + done.stderr   # two processes ran
    results = json.loads(files[-1].read_text())
    scores = results["results"]["arrcoc_toyvqa"]
    assert scores["exact_match,none"] == row["accuracy"]
    for t in QUESTION_TYPES:
        assert scores[f"acc_{t},none"] == row[f"acc_{t}"], t
    throughput = results["throughput"]
    assert throughput["avg_arrcoc_images"] == N   # both ranks' images, not rank 0's
    for field in ("visual_tokens", "visual_tokens_in", "prefill_gflops"):   # per image, whatever the batches
        assert throughput[f"avg_arrcoc_{field}"] == pytest.approx(row[field], rel=1e-9), field
    # (kv_bytes counts each batch's left padding, which depends on which questions share a batch)


@pytest.fixture(scope="module")
def docs(task: Path) -> list[dict]:
    from PIL import Image

    lines = (task / "test" / "metadata.jsonl").read_text().splitlines()
    return [dict(json.loads(line), image=Image.open(task / "test" / json.loads(line)["file_name"])) for line in lines]


def requests(docs: list[dict], kind: str, second: list) -> list:
    from lmms_eval.api.instance import Instance

    from arrcoc.lmms_tasks import toyvqa_doc_to_visual

    return [Instance(request_type=kind, arguments=(d["question"], s, toyvqa_doc_to_visual, i, "toy", "test"), idx=0,
                     metadata={"task": "toy", "doc_id": i, "repeats": 1})
            for i, (d, s) in enumerate(zip(docs, second))]


def model(docs: list[dict], **args):
    from arrcoc.integrations.lmms.model import ArrcocLMM

    lm = ArrcocLMM(pretrained="arrcoc:toyvqa", batch_size=BATCH, device="cpu", **args)
    lm.task_dict = {"toy": {"test": docs}}
    return lm


def test_loglikelihood_of_the_answer_is_the_reference_runs_answer_logprob(docs, reference) -> None:
    """Keep everything: log p(answer | prompt) is the log-probability arrcoc eval recorded at the answer position
    (reference.pt, the first new token's full softmax), in the same batches."""
    result, out = reference
    saved = torch.load(out / "reference.pt", weights_only=True)["reference"]
    lm = model(docs)
    scores = lm.loglikelihood(requests(docs, "loglikelihood", [" " + d["answer"] for d in docs]))
    ids = [lm.tokenizer(d["answer"], add_special_tokens=False)["input_ids"] for d in docs]
    assert all(len(i) == 1 for i in ids)
    expected = saved["logprobs"][torch.arange(N), torch.tensor([i[0] for i in ids])]
    got = torch.tensor([s for s, _ in scores])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # greedy exactly where the reference run's answer is the right one
    assert [g for _, g in scores] == [normalise(p) == d["answer"] for p, d in zip(saved["predictions"], docs)]


def test_loglikelihood_under_a_pipeline_agrees_with_its_generation(docs, reference) -> None:
    """cdpruner at the budget: the answer ``generate_until`` writes is greedy under ``loglikelihood``, another
    answer of the same type is not and scores lower (the prompt alone is pruned, then the answer decoded)."""
    from arrcoc.toyvqa import ANSWERS

    lm = model(docs, pipeline="cdpruner", budget=BUDGET)
    generated = lm.generate_until(requests(docs, "generate_until", [{"max_new_tokens": 1, "until": []}] * N))
    other = [next(a for a in ANSWERS[d["type"]] if a != g.strip()) for d, g in zip(docs, generated)]
    mine = lm.loglikelihood(requests(docs, "loglikelihood", [" " + g.strip() for g in generated]))
    theirs = lm.loglikelihood(requests(docs, "loglikelihood", [" " + o for o in other]))
    assert len(mine) == len(theirs) == N
    # generate_until outside lmms-eval's loop answers as arrcoc eval does at this budget
    assert sum(normalise(g) == d["answer"] for g, d in zip(generated, docs)) == \
        round(reference[0].row("cdpruner", BUDGET)["accuracy"] * N)
    assert all(greedy for _, greedy in mine)
    assert not any(greedy for _, greedy in theirs)
    assert all(m > t for (m, _), (t, _) in zip(mine, theirs))


def test_a_token_count_budget_plans_as_its_fraction(docs) -> None:
    from arrcoc.budget import plan_budget
    from arrcoc.spec import resolve_spec

    lm = model(docs, pipeline="cdpruner", budget=28)
    inputs, spec = lm._encode([docs[0]["question"]], [[docs[0]["image"].convert("RGB")]])
    image_inputs = {k: inputs[k] for k in lm.adapter.image_input_names if k in inputs}
    context = lm.adapter.budget_context(inputs["pixel_values"], image_inputs)[0]
    assert context["original"] == 256
    expected = plan_budget(resolve_spec("cdpruner"), 28 / 256, original=256, grid=tuple(context["grid"]),
                           layers=context["layers"], has_cls=context["has_cls"],
                           encoder_layers=context["encoder_layers"])
    assert spec.as_yaml_dict() == expected.spec.as_yaml_dict()
    assert lm.plan_params == expected.params and lm.plan_params


@pytest.mark.parametrize("args, error, words", [
    ({"pipeline": "no_such_pipeline"}, UnknownPipelineError, "no_such_pipeline"),
    ({"pipeline": "cdpruner", "budget": 1.5}, BudgetError, "(0, 1]"),
    ({"pipeline": "cdpruner", "budget": 0}, BudgetError, ">= 1"),
    ({"pipeline": "cdpruner", "budget": "lots"}, BudgetError, "'lots'"),
    ({"pipeline": "cdpruner", "budget": True}, BudgetError, "True"),
    ({"budget": 0.5}, BudgetError, "needs a pipeline"),
    ({"pipeline": "cdpruner", "batch_size": 0}, InputError, "batch_size"),
    ({"pipeline": "cdpruner", "pipelne": "x"}, InputError, "pipelne"),
])
def test_bad_model_args_are_clear_errors_before_the_model_loads(args, error, words) -> None:
    from arrcoc.integrations.lmms.model import ArrcocLMM

    with pytest.raises(error) as info:
        ArrcocLMM(pretrained="/nonexistent/model", **args)   # the arguments fail first, not the missing model
    assert words in str(info.value)


def test_a_token_budget_above_the_images_tokens_is_an_error(docs) -> None:
    lm = model(docs, pipeline="cdpruner", budget=300)
    with pytest.raises(BudgetError, match="at most 256"):
        lm.generate_until(requests(docs[:1], "generate_until", [{"max_new_tokens": 1}]))


def test_an_unreachable_budget_names_the_stage(docs) -> None:
    lm = model(docs, pipeline="fastv", budget=0.111)   # FastV keeps all 256 in layer 0 of 3: >= 1/3
    with pytest.raises(BudgetError, match="fastv"):
        lm.generate_until(requests(docs[:1], "generate_until", [{"max_new_tokens": 1}]))


def test_the_cli_reports_an_unknown_pipeline(task, env, tmp_path) -> None:
    command = [sys.executable, "-m", "lmms_eval", "--model", "arrcoc", "--model_args",
               "pretrained=arrcoc:toyvqa,pipeline=no_such_pipeline", "--include_path", str(task), "--tasks",
               "arrcoc_toyvqa", "--output_path", str(tmp_path), "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert "no_such_pipeline" in done.stdout + done.stderr
    assert not list(tmp_path.rglob("*_results.json"))
