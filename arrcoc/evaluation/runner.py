"""``arrcoc eval``: accuracy, loyalty and cost against visual tokens, for pipelines and honest baselines.

For every method and budget the model answers the same questions, batched
(left-padded prompts, greedy ``generate``) inside ``arrcoc.hf.apply``, and
one row of ``results.csv`` records (docs/eval.md defines each column):

* ``accuracy`` (and per question type): the first ``k`` generated tokens,
  ``k`` the reference answer's token count, equal the answer (case and
  surrounding whitespace / final period ignored);
* ``loyalty``: the fraction of answers equal to the uncompressed run's
  (EffiVLM-Bench); ``kl``: the mean KL divergence ``KL(p_all || p_method)``
  of the next-token distribution at the answer position (the first new
  token, full softmax over the vocabulary);
* ``visual_tokens``: visual tokens the LLM sees per image, averaged over
  the decoder layers (the budget's measure), with ``visual_tokens_in`` (at
  the LLM input) and the per-layer means;
* ``prefill_gflops`` (analytic, LLM only, per image), ``prefill_ms``
  (vision tower + pre-LLM stages + LLM prefill), ``llm_prefill_ms`` and
  ``total_ms`` (the whole ``generate`` call), each per image (a batch's time
  divided by its size); ``kv_bytes``: the KV cache after prefill per image
  (padding included, as allocated);
* ``params``: the params the budget rule derived (JSON, per stage label).

The uncompressed run ("all tokens") is the reference: its answers and
next-token log-probabilities are cached in ``reference.pt`` so that a resumed
run and every method reuse them.  Rows already in ``results.csv`` are
skipped; ``run.json`` records what the rows were computed with (model files,
data, questions), and a mismatch is an error rather than a mixed table.

**Data-parallel** (``processes=N``, or under ``torchrun`` / ``accelerate
launch``): the questions are cut into batches of ``batch_size`` exactly as
one process cuts them, and batch ``b`` goes to rank ``b % N``, so every
``generate`` call holds the same questions, padded alike, as in one process.
Each rank evaluates every method and budget on its shard and keeps its own
store (``OUT/shards/rank{r}-of{N}/``, :mod:`.store`), resumed row by row;
rank 0 gathers each call's outcomes (gloo ``gather_object``: no shared file
system needed), replays them in the one-process batch order
(:func:`~.totals.merge_outcomes`) and writes the tables.  Milliseconds are
measured per rank.

This module only orchestrates: it loads the model, batches the questions,
runs each (method, budget) and shows progress.  Below it, in layers (each
imports only the ones above it in this list):

* :mod:`.methods`: the methods and budgets of a run;
* :mod:`.totals`: what one run measured (:class:`~.totals.Totals`) and its row;
* :mod:`.store`: results.csv, run.json and the reference.pt cache;
* :mod:`.output`: results.md and the plots.

The budget rules' context (visual tokens per image, the feature grid, class
token, depths) comes from the model's adapter
(:meth:`arrcoc.integrations.hf.adapter.Adapter.budget_context`), read from the
processor's inputs and the config without running the model (LLaVA-1.5,
Qwen2-VL; a family whose adapter does not answer it gets one forward of its
tower, as every family had before).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..budget import plan_budget
from ..errors import ArrcocError, ArrcocWarning, BudgetError, InputError, ModelError
from ..models import check_model_dir
from ..spec import PipelineSpec
from ..timing import clock
from .data import EvalSample, describe, load_samples, shard_samples
from .methods import (
    ALL_TOKENS, DEFAULT_BUDGETS, DOWNSAMPLE, Method, check_budgets, methods_for, no_stages, outcome_key, row_key,
)
from .output import write_outputs
from .store import (
    DONE, SHARDS, append_ledger, atomic_write, check_world, load_outcomes, load_reference, make_out_dir, resume,
    run_fingerprint, save_outcomes, save_reference, save_rows, shard_dir, write_rows,
)
from .totals import Reference, Scoring, Totals, call_record, merge_outcomes, question_types


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: one dict per (method, budget), in ``COLUMNS`` plus ``acc_<type>``."""

    rows: list[dict[str, Any]]
    out: Path | None = None
    question_types: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, method: str, budget: float) -> dict[str, Any]:
        for r in self.rows:  # by label, as results.csv and a resume find rows (a resumed 0.333333 is 1/3)
            if row_key(r["method"], r["budget"]) == row_key(method, budget):
                return r
        raise KeyError(f"no row for {method!r} at budget {budget}")


# ------------------------------------------------------------------- model
def load_model(model: Any, device: str | None = None) -> tuple[Any, Any, str]:
    """``(model, processor, description)`` from a ``(model, processor)`` pair, a directory, or the shipped model."""
    if isinstance(model, tuple):
        m, processor = model
        return m, processor, getattr(m, "name_or_path", "") or type(m).__name__
    from ..integrations import hf

    # The shipped model by default; `arrcoc:toyvqa` as a directory, so the fingerprint reads its weight files.
    model = check_model_dir("arrcoc:toyvqa" if model is None else model)   # missing files named, before loading
    from ..pipeline import _resolve_device

    dev = _resolve_device(device)
    # fp32 on a CPU (fp16 matmuls there are slow and the shipped weights are fp16); the checkpoint's own dtype on GPUs.
    m, processor = hf.load(str(model), device=dev, dtype=torch.float32 if dev.type == "cpu" else None)
    return m, processor, str(model)


def prompt_for(processor: Any, question: str) -> str:
    """The model's chat prompt for one image and ``question`` (LLaVA-1.5's form without a chat template)."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


# -------------------------------------------------------------------- runs
@dataclass
class _Batch:
    """One ``generate`` call's questions and the processor's inputs for them."""

    samples: list[EvalSample]
    inputs: dict[str, Any]
    lengths: list[int]                      # answer tokens per sample


class _Runner:
    """The model, its processor and the questions: batches them and runs them through one pipeline at a time."""

    def __init__(self, model: Any, processor: Any, samples: list[EvalSample], batch_size: int,
                 max_new_tokens: int | None) -> None:
        self.model, self.processor, self.samples = model, processor, samples
        self.batch_size = batch_size
        self.tokenizer = processor.tokenizer
        self.lengths = [max(len(self.tokenizer(s.answer, add_special_tokens=False)["input_ids"]), 1) for s in samples]
        # Answer plus one more token (the end of the answer): total_ms includes a decoding step with the KV cache.
        self.max_new_tokens = max_new_tokens or max(self.lengths) + 1
        if self.max_new_tokens < max(self.lengths):
            raise InputError(f"arrcoc eval: max_new_tokens={self.max_new_tokens} is shorter than the longest answer "
                             f"({max(self.lengths)} tokens)")
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def batches(self, processor_kwargs: dict[str, Any] | None = None) -> Iterable[_Batch]:
        for start in range(0, len(self.samples), self.batch_size):
            chunk = self.samples[start:start + self.batch_size]
            images = [s.load_image() for s in chunk]
            texts = [prompt_for(self.processor, s.question) for s in chunk]
            # Left padding whatever the tokenizer's default: the answer position (the first new token's logits)
            # is the last column, which is the last prompt token only when every prompt ends there.
            inputs = self.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt",
                                    **(processor_kwargs or {}))
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            yield _Batch(chunk, inputs, self.lengths[start:start + len(chunk)])

    def warm_up(self) -> None:
        """One untimed ``generate`` on the first batch, keeping every token: first-call costs (allocations, lazy
        inits) would otherwise land in the first row's milliseconds.  It measures nothing; the budget context
        comes from the adapter (:func:`_reference`)."""
        from ..integrations.hf import apply

        batch = next(self.batches())
        with warnings.catch_warnings(), torch.inference_mode(), apply(self.model, no_stages()):
            warnings.simplefilter("ignore", ArrcocWarning)
            self.model.generate(**batch.inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id)

    def run(self, spec: PipelineSpec, on_batch: Callable[[int], None], processor_kwargs: dict[str, Any] | None = None,
            context: Any = None) -> Totals:
        """Every sample through ``generate`` inside ``apply(model, spec)``; each call's report added up."""
        from ..integrations.hf import apply

        totals = Totals()
        with warnings.catch_warnings(), torch.inference_mode(), \
                apply(self.model, spec, tokenizer=self.tokenizer) as run, (context or nullcontext()):
            warnings.simplefilter("ignore", ArrcocWarning)  # collected from the stage records (Totals.warnings)
            for batch in self.batches(processor_kwargs):
                start = clock(self.device)
                out = self.model.generate(**batch.inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          return_dict_in_generate=True, output_logits=True,
                                          pad_token_id=self.tokenizer.pad_token_id)
                total_ms = (clock(self.device) - start) * 1e3
                new = out.sequences[:, batch.inputs["input_ids"].shape[1]:]
                predictions = [self.tokenizer.decode(row[:k], skip_special_tokens=True)
                               for row, k in zip(new.tolist(), batch.lengths)]
                totals.add(run.report, predictions, torch.log_softmax(out.logits[0].float(), -1).cpu(), total_ms)
                on_batch(len(batch.samples))
        return totals


# -------------------------------------------------------------------- main
def evaluate(
    pipelines: Sequence[Any] = (),
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    n: int = 1000,
    out: str | Path | None = None,
    model: Any = None,
    data: Any = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    baselines: bool = True,
    device: str | None = None,
    progress: bool = True,
    restart: bool = False,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
    processes: int = 1,
) -> EvalResult:
    """Evaluate ``pipelines`` (names, YAML paths, dicts or specs; default: every shipped pipeline) at each budget.

    ``model``: a local HF checkpoint directory, a ``(model, processor)`` pair, or ``None`` for the shipped
    ToyVQA model; ``data``: ``toyvqa`` / ``toyvqa:<split>`` (default: the test split), a JSONL file or a folder
    with ``metadata.jsonl``, or a list of :class:`~arrcoc.evaluation.data.EvalSample`.  With ``out``, rows go
    to ``out/results.csv`` as they finish (a rerun skips them), then ``results.md`` and the plots.

    ``processes > 1`` spawns that many local ranks (gloo) and shards the questions among them; under
    ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) this process is one rank (docs/eval.md, "Many processes").
    Either way the rows are those of one process; the milliseconds are measured per rank.
    """
    began = time.perf_counter()
    budgets = check_budgets(budgets)
    if batch_size < 1:
        raise InputError(f"arrcoc eval: batch_size must be >= 1, got {batch_size}")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise InputError(f"arrcoc eval: processes must be an integer >= 1, got {processes!r}")
    where = env_world()
    if where is not None and processes > 1:
        raise InputError(f"arrcoc eval: this process is rank {where[0]} of {where[1]} already (torchrun / accelerate "
                         f"launch); --nproc {processes} spawns processes of its own: use one or the other")
    methods = methods_for(pipelines, baselines)
    samples = list(data) if isinstance(data, list) else load_samples(data, n)
    if (where is not None or processes > 1) and out is None:
        raise InputError("arrcoc eval: a data-parallel run needs an output folder (--out): each process keeps its "
                         "shard of the results there, and rank 0 writes the tables")
    out_dir = make_out_dir(out)   # before the model loads: a bad --out fails in a second, not after a minute
    if processes > 1:
        if model is not None and not isinstance(model, (str, Path)):
            raise InputError("arrcoc eval: a data-parallel run loads the model in every process; pass a checkpoint "
                             f"folder (or nothing, for the shipped model), not a {type(model).__name__}")
        return _launch(dict(pipelines=list(pipelines), budgets=budgets, n=n, out=out_dir, model=model,
                                    data=data, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    baselines=baselines, device=device, progress=progress, restart=restart,
                                    plots=plots, log=log), processes)
    n = len(samples)
    types = question_types(samples)
    if where is not None:
        return _run_rank(
            where, methods=methods, budgets=budgets, samples=samples, types=types, out_dir=out_dir, model=model,
            device=device, data=describe(data) if not isinstance(data, list) else "samples", batch_size=batch_size,
            max_new_tokens=max_new_tokens, restart=restart, plots=plots, progress=progress,
            say=log or (lambda message: None), began=began)
    if out_dir is not None:
        if restart:
            shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
        else:
            check_world(out_dir, 1)
    m, processor, description = load_model(model, device)
    runner = _Runner(m, processor, samples, batch_size, max_new_tokens)
    fingerprint = run_fingerprint(m, description, describe(data) if not isinstance(data, list) else "samples",
                                  samples, runner.max_new_tokens, batch_size)
    say = log or (lambda message: None)
    rows: list[dict[str, Any]] = []
    if out_dir is not None:
        # A row that is not done (an unknown status: edited by hand) is computed again, and replaced.
        rows = [r for r in resume(out_dir, fingerprint, restart, say) if r["status"] in DONE]
        # results.csv holds a budget at the precision of its label (0.333333 for 1/3): a resumed row takes the
        # budget asked for, as a row computed now has it, so both are one column of the tables and of row().
        asked = {row_key("", b)[1]: b for b in budgets}
        for r in rows:
            if r["method"] != ALL_TOKENS:
                r["budget"] = asked.get(row_key("", r["budget"])[1], r["budget"])
    done = {row_key(r["method"], r["budget"]) for r in rows}

    configs = [(meth, b) for meth in methods for b in ([1.0] if meth.name == ALL_TOKENS else budgets)]
    pending = [(meth, b) for meth, b in configs if row_key(meth.name, b) not in done and meth.name != ALL_TOKENS]
    reference = load_reference(out_dir, fingerprint, say)
    bar = _Progress(progress, total=(len(pending) + (reference is None)) * n)
    try:
        if reference is None or pending:
            runner.warm_up()
        if reference is None:
            reference = _reference(runner, bar)
            save_reference(out_dir, fingerprint, reference)
        scoring = Scoring(samples, types, reference)
        if row_key(ALL_TOKENS, 1.0) not in done:
            rows.append(scoring.reference_row(methods[0]))
            say(_summary(rows[-1]))
            save_rows(out_dir, rows, types)
        for meth, budget in pending:
            bar.describe(f"{meth.name} @ {budget:g}")
            try:
                row = _evaluate_one(runner, meth, budget, scoring, bar)
            except ArrcocError as exc:
                raise type(exc)(f"arrcoc eval: {meth.name} at budget {budget:g}: {exc}") from exc
            except Exception as exc:  # a pipeline that cannot run is an error, never a silent skip
                raise ModelError(f"arrcoc eval: {meth.name} at budget {budget:g} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            rows.append(row)
            say(_summary(row))
            save_rows(out_dir, rows, types)
    finally:
        bar.stop()
    order = {row_key(meth.name, b): i for i, (meth, b) in enumerate(configs)}
    rows.sort(key=lambda r: order.get(row_key(r["method"], r["budget"]), len(order)))
    result = EvalResult(rows=rows, out=out_dir, question_types=types, seconds=time.perf_counter() - began)
    if out_dir is not None:
        write_rows(out_dir / "results.csv", rows, types)
        write_outputs(result, fingerprint, plots=plots)
    return result


def _reference(runner: _Runner, bar: "_Progress") -> Reference:
    """The uncompressed run: its totals, and the budget context of its images from the model's adapter."""
    from ..integrations.hf import adapter_for

    bar.describe(ALL_TOKENS)
    totals = runner.run(no_stages(), bar.advance)
    visual_in = totals.visual_tokens_in
    if len(set(visual_in)) != 1:
        raise BudgetError(
            f"arrcoc eval: budgets are fractions of one visual-token count per image, but this model gives images "
            f"{sorted(set(visual_in))[:5]} tokens (e.g. LLaVA-NeXT, Qwen2-VL); use a LLaVA-1.5-style model"
        )
    adapter = adapter_for(runner.model)
    first = next(runner.batches()).inputs   # the processor's inputs, as the run had them: no forward
    image_inputs = {k: first[k] for k in adapter.image_input_names if k in first}
    context = adapter.budget_context(first["pixel_values"], image_inputs)[0]
    if context["original"] != visual_in[0]:   # the adapter's count disagrees with the model's own prompt
        raise ModelError(f"arrcoc eval: the {adapter.family} adapter counts {context['original']} visual tokens per "
                         f"image, but the model's prompt holds {visual_in[0]}; its budget context is wrong")
    return Reference(ids=[s.id for s in runner.samples], totals=totals, original=int(visual_in[0]),
                     grid=tuple(context["grid"]), has_cls=bool(context["has_cls"]), layers=int(context["layers"]),
                     encoder_layers=int(context["encoder_layers"]))


def _evaluate_one(runner: _Runner, method: Method, budget: float, scoring: Scoring, bar: "_Progress"
                  ) -> dict[str, Any]:
    """The row of ``method`` at ``budget``: downsampling through the processor, a pipeline through its budget
    plan (an ``unreachable`` row where the budget rules cannot reach ``budget``)."""
    totals, params, unreachable = _measure(runner, method, budget, scoring.reference, bar)
    if totals is None:
        return scoring.unreachable(method, budget, unreachable)
    return scoring.row(method, budget, totals, params)


def _measure(runner: _Runner, method: Method, budget: float, reference: Reference, bar: "_Progress"
             ) -> tuple[Totals | None, dict[str, Any], str]:
    """``(totals, params, "")`` of ``method`` at ``budget`` on the runner's questions, or ``(None, {}, why)``
    where the budget rules cannot reach ``budget``."""
    if method.name == DOWNSAMPLE:
        from ..integrations.hf import adapter_for

        tokens = max(round(budget * reference.original), 1)
        kwargs, context, grid = adapter_for(runner.model).downsampling(runner.processor, tokens)
        params = {"image": {"grid": list(grid), **kwargs.get("crop_size", {})}}
        return runner.run(no_stages(), bar.advance, processor_kwargs=kwargs, context=context), params, ""
    try:
        plan = plan_budget(method.spec, budget, **reference.budget_context)
    except BudgetError as exc:
        bar.advance(len(runner.samples))
        return None, {}, str(exc)
    return runner.run(plan.spec, bar.advance), plan.params, ""


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['method']} @ {float(row['budget']):g}: {row['status']}: {row['note']}"
    return (f"{row['method']} @ {float(row['budget']):g}: accuracy {row['accuracy']:.1%}, loyalty "
            f"{row['loyalty']:.3f}, KL {row['kl']:.4f}, {row['visual_tokens']:.1f} visual tokens, "
            f"{row['prefill_ms']:.2f} ms prefill / image")


class _Progress:
    """A rich progress bar over every (method, budget) still to run, on stderr; nothing when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]arrcoc eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.bar.add_task("", total=total)
        self.bar.start()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, k: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, k)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------- data-parallel runs
#: Test hook (tests/evaluation/test_eval_parallel.py): ``"RANK:ROWS"`` makes rank RANK, once it has recorded
#: ROWS rows in this process, write its PID to ``halted`` in its shard folder and wait to be killed.
HALT_ENV = "ARRCOC_EVAL_TEST_HALT"
#: Ranks finish at different times and wait for each other; a rank that dies is the launcher's to end
#: (torchrun, accelerate, :func:`_launch` all stop the others), so the collectives may wait long.
_TIMEOUT = timedelta(days=7)


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world, local_rank)`` set by torchrun / accelerate launch / :func:`_launch`; None in one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise InputError(f"arrcoc eval: WORLD_SIZE / RANK / LOCAL_RANK must be integers ({exc})") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise InputError(f"arrcoc eval: RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


class _Group:
    """The gloo process group the ranks exchange their outcomes over (CPU objects, whatever the model's device)."""

    def __init__(self, rank: int, world: int) -> None:
        import torch.distributed as dist

        self.dist, self.rank, self.world = dist, rank, world
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=_TIMEOUT)
            self.group = None
        else:  # the caller's group (maybe NCCL): a gloo one beside it for Python objects
            self.group = dist.new_group(backend="gloo", timeout=_TIMEOUT)

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def _halt_after() -> tuple[int, int] | None:
    value = os.environ.get(HALT_ENV)
    if not value:
        return None
    rank, rows = value.split(":")
    return int(rank), int(rows)


def _run_rank(
    where: tuple[int, int, int], *, methods: list[Method], budgets: list[float], samples: list[EvalSample],
    types: list[str], out_dir: Path, model: Any, device: str | None, data: str, batch_size: int,
    max_new_tokens: int | None, restart: bool, plots: bool, progress: bool, say: Callable[[str], None],
    began: float,
) -> Any:
    """This rank's part of a data-parallel :func:`~.runner.evaluate`; rank 0 also merges and writes the tables."""
    rank, world, local = where
    if not isinstance(model, (str, Path)) and model is not None:
        raise InputError("arrcoc eval: a data-parallel run loads the model in every process; pass a checkpoint "
                         f"folder (or nothing, for the shipped model), not a {type(model).__name__}")
    if not restart:
        check_world(out_dir, world)   # read-only, before any collective: every rank raises the same error at once
    group = _Group(rank, world)
    try:
        if restart and rank == 0:
            shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
            for name in ("results.csv", "reference.pt", "run.json"):
                (out_dir / name).unlink(missing_ok=True)
        group.barrier()   # rank 0's --restart is done before any rank opens its shard

        mine = shard_samples(samples, batch_size, rank, world)
        configs = [(meth, b) for meth in methods for b in ([1.0] if meth.name == ALL_TOKENS else budgets)]
        records: dict[str, Any] = {}
        fingerprint: dict[str, Any] = {}
        if mine or rank == 0:
            if (device is None and torch.cuda.is_available()) or device == "cuda":
                # one GPU per local rank (torchrun / accelerate); ranks share them round robin when fewer
                device = f"cuda:{local % max(torch.cuda.device_count(), 1)}"
            m, processor, description = load_model(model, device)
            # The longest answer over all questions, not the shard's: every call generates as in one process.
            new_tokens = _Runner(m, processor, samples, batch_size, max_new_tokens).max_new_tokens
            fingerprint = run_fingerprint(m, description, data, samples, new_tokens, batch_size) | {"processes": world}
            if rank == 0:
                resume(out_dir, fingerprint, restart=False, say=say)   # run.json: settings checked, written
            folder = shard_dir(out_dir, rank, world)
            folder.mkdir(parents=True, exist_ok=True)
            records = _evaluate_shard(_Runner(m, processor, mine, batch_size, new_tokens), folder, configs, types,
                                      run_fingerprint(m, description, data, mine, new_tokens, batch_size)
                                      | {"rank": rank, "processes": world},
                                      rank, progress and rank == 0, say)
        gathered = group.gather(records)
        rows = None
        if rank == 0:
            rows = merge_outcomes(gathered, methods, configs, samples, types, batch_size, world)
        rows = group.broadcast(rows)
    finally:
        group.close()
    result = EvalResult(rows=rows, out=out_dir, question_types=types, seconds=time.perf_counter() - began)
    if rank == 0:
        write_rows(out_dir / "results.csv", rows, types)
        write_outputs(result, fingerprint, plots=plots)
    return result


def _evaluate_shard(runner: Any, folder: Path, configs: list[tuple[Method, float]], types: list[str],
                    fingerprint: dict[str, Any], rank: int, progress: bool, say: Callable[[str], None]
                    ) -> dict[str, Any]:
    """Every (method, budget) on this rank's questions, skipping the rows its shard store already holds."""
    resume(folder, fingerprint, restart=False, say=say)   # the shard's run.json: same settings, or an error
    records = load_outcomes(folder, say)
    ids = [s.id for s in runner.samples]
    halt = _halt_after()
    recorded = 0

    def finished(method: str, budget: float, record: dict[str, Any], seconds: float) -> None:
        nonlocal recorded
        records[outcome_key(method, budget)] = record
        save_outcomes(folder, records)
        append_ledger(folder, method, budget, rank, ids, seconds)
        recorded += 1
        if halt is not None and halt == (rank, recorded):
            atomic_write(folder / "halted", f"{os.getpid()}\n".encode())
            while True:   # the test kills this process by its PID
                time.sleep(1)

    pending = [(m, b) for m, b in configs if m.name != ALL_TOKENS and outcome_key(m.name, b) not in records]
    reference = load_reference(folder, fingerprint, say) if outcome_key(ALL_TOKENS, 1.0) in records else None
    bar = _Progress(progress, total=(len(pending) + (reference is None)) * len(runner.samples))
    if reference is None or pending:
        runner.warm_up()
    if reference is None:
        began = time.perf_counter()
        reference = _reference(runner, bar)
        save_reference(folder, fingerprint, reference)
        finished(ALL_TOKENS, 1.0, call_record(reference.totals, ids, {}, context=reference.budget_context),
                 time.perf_counter() - began)
    scoring = Scoring(runner.samples, types, reference)
    for meth, budget in pending:
        bar.describe(f"{meth.name} @ {budget:g}")
        began = time.perf_counter()
        try:
            totals, params, unreachable = _measure(runner, meth, budget, reference, bar)
        except ArrcocError as exc:
            raise type(exc)(f"arrcoc eval: {meth.name} at budget {budget:g}: {exc}") from exc
        except Exception as exc:  # a pipeline that cannot run is an error, never a silent skip
            raise ModelError(f"arrcoc eval: {meth.name} at budget {budget:g} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        kl = scoring.kl(totals) if totals is not None else None
        finished(meth.name, budget, call_record(totals, ids, params, unreachable, kl=kl), time.perf_counter() - began)
        say(f"rank {rank}: {meth.name} @ {budget:g} done")
    bar.stop()
    return records


# ------------------------------------------------------------------ --nproc
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankLog:
    """A picklable ``log`` for a spawned rank: stderr lines prefixed with the rank."""

    def __init__(self, rank: int, world: int) -> None:
        self.prefix = f"[rank {rank}/{world}] "

    def __call__(self, line: str) -> None:
        print(self.prefix + line, file=sys.stderr, flush=True)


def _child(rank: int, world: int, port: int, threads: int, kwargs: dict[str, Any], queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        result = evaluate(**kwargs)
    except ArrcocError as exc:
        try:   # the error itself for the parent to raise, when it survives pickling (an unusual __init__ may not)
            payload: ArrcocError = pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001
            payload = ModelError(f"{type(exc).__name__}: {exc}")
        queue.put(("error", rank, payload))
        sys.exit(1)
    if rank == 0:
        queue.put(("result", rank, result))


def _launch(kwargs: dict[str, Any], processes: int) -> Any:
    """``processes`` local ranks (spawned, gloo) running ``evaluate(**kwargs)``; rank 0's result.

    The first rank to fail stops the others (as torchrun does); its :class:`ArrcocError` is raised here, and
    the rows every rank finished stay in its shard for the next run to resume.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    threads = max(1, torch.get_num_threads() // processes)
    procs = []
    for rank in range(processes):
        child_kwargs = dict(kwargs, progress=kwargs.get("progress", True) and rank == 0,
                            log=RankLog(rank, processes) if kwargs.get("log") is not None else None)
        procs.append(ctx.Process(target=_child, args=(rank, processes, port, threads, child_kwargs, queue),
                                 name=f"arrcoc-eval-rank{rank}"))
    for p in procs:
        p.start()
    messages: list[tuple[str, int, Any]] = []
    failed: tuple[int, int] | None = None
    try:
        while any(p.is_alive() for p in procs):
            while not queue.empty():
                messages.append(queue.get())
            failed = failed or next(((r, p.exitcode) for r, p in enumerate(procs)
                                     if p.exitcode not in (None, 0)), None)
            if failed is not None:
                break
            time.sleep(0.1)
    finally:
        for p in procs:   # a failed rank (or Ctrl-C here) stops the rest, as torchrun does
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
    while not queue.empty():
        messages.append(queue.get())
    for kind, rank, payload in messages:
        if kind == "error":
            raise payload
    failed = failed or next(((r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
    result = next((payload for kind, rank, payload in messages if kind == "result"), None)
    if failed is not None or result is None:
        rank, code = failed or (0, None)
        raise ModelError(f"arrcoc eval: rank {rank} of {processes} exited with code {code}; the rows each rank "
                         "finished are kept in its shard (OUT/shards): run the same command again to resume")
    return result
