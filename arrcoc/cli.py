"""The ``arrcoc`` command: run | generate | eval | bench | serve | list | show | validate | schema."""

from __future__ import annotations

import fnmatch
import json
import sys
import warnings
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ArrcocError, ArrcocWarning, InputError

console = Console()
err_console = Console(stderr=True)

#: The most torch threads a --threads option takes: torch.set_num_threads overflows past 2^31 - 1 with a
#: ValueError, and a value such as 100000 is accepted and crashes the process (a segmentation fault at exit).
MAX_THREADS = 1024


class _Group(click.Group):
    """Turns every ArrcocError into one red line and exit code 2 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                # ArrcocWarnings are in the trace, and `run` prints them from there: no second copy on stderr.
                warnings.simplefilter("ignore", ArrcocWarning)
                return super().invoke(ctx)
        except ArrcocError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="arrcoc")
def main() -> None:
    """arrcoc: query-aware visual token reduction pipelines, declared in YAML."""


# --------------------------------------------------------------------- run
@main.command()
@click.argument("pipeline")
@click.option("--image", "images", multiple=True, required=True, help="Image file (repeat for a batch).")
@click.option("--query", "queries", multiple=True,
              help="Question / text query for query-guided stages: one for all images, one per image, "
                   "or several for a single image (one row each: compare questions).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print the trace as JSON.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write a figure, one row per image (needs the viz extra).")
def run(pipeline: str, images: tuple[str, ...], queries: tuple[str, ...], device: str, as_json: bool,
        out: str | None) -> None:
    """Run PIPELINE (a built-in name or a YAML file) and print its trace."""
    from .pipeline import load_pipeline

    inputs, query = _pair_queries(list(images), list(queries))
    with err_console.status(f"building pipeline {pipeline!r}", spinner="dots") if not as_json else _nullcontext():
        pipe = load_pipeline(pipeline, device=device)
    with err_console.status("running", spinner="dots") if not as_json else _nullcontext():
        state = pipe(inputs, query=query)
    if out is not None:
        from arrcoc_plugins.visual.figure import render_figure

        if isinstance(query, list):   # one row per (image, query), titled by its query
            render_figure(state, out, title=pipe.spec.name, index=None, row_titles=query)
        else:
            render_figure(state, out, title=f"{pipe.spec.name}" + (f": {query}" if query else ""), index=None)
    if as_json:
        payload = {
            "pipeline": pipe.spec.name,
            "images": inputs,
            "query": query,
            "device": str(pipe.device),
            "tokens_shape": list(state.tokens.shape),
            "trace": [r.as_dict() for r in state.trace],
            "figure": out,
        }
        click.echo(json.dumps(payload, indent=2))
        return
    table = Table(title=f"{pipe.spec.name} on {pipe.device}", show_lines=False)
    table.add_column("stage")
    table.add_column("plugin", style="cyan")
    table.add_column("tokens in", justify="right")
    table.add_column("tokens out", justify="right", style="bold")
    table.add_column("ms", justify="right")
    for record in state.trace:
        table.add_row(
            record.stage, record.plugin, _counts(record.tokens_in), _counts(record.tokens_out), f"{record.ms:.1f}"
        )
    console.print(table)
    first, last = state.trace[0], state.trace[-1]
    console.print(
        f"{_counts(first.tokens_in)} -> {_counts(last.tokens_out)} tokens per image "
        f"(class token included), {sum(r.ms for r in state.trace):.1f} ms"
    )
    for record in state.trace:
        for note in record.warnings:
            console.print(f"[yellow]warning[/] {record.stage}: {escape(note)}")
    if pipe.llm:
        # An llm: stage acts between decoder layers: a standalone pipeline has none, so it did not run here.
        names = ", ".join(f"{label} ({plugin.name})" for label, plugin in pipe.llm)
        console.print(f"[yellow]note[/] {escape(names)}: in-LLM stages run only inside a model "
                      "(arrcoc generate, arrcoc eval, arrcoc.hf.apply); not run here")
    if out is not None:
        console.print(f"figure written to {out}")


def _pair_queries(images: list[str], queries: list[str]) -> tuple[list[str], str | list[str] | None]:
    """``--image``/``--query`` pairs: no query, one for every image, one per image, or k for one image."""
    if len(queries) <= 1:
        return images, (queries[0] if queries else None)
    if len(images) == 1:
        return images * len(queries), queries
    if len(queries) == len(images):
        return images, queries
    raise click.UsageError(f"got {len(queries)} --query for {len(images)} --image: pass one query, one per "
                           "image, or several queries for a single image")


def _default_needs(info: Any) -> frozenset[str]:
    """What a plugin needs with its default params (stages only: building an encoder loads a model)."""
    if info.kind in ("encoder", "query_encoder"):
        return info.cls.needs
    try:
        return info.cls().requirements()
    except Exception:  # a plugin with required params: show the class-level flags
        return info.cls.needs


def _counts(counts: tuple[int, ...]) -> str:
    return str(counts[0]) if len(set(counts)) == 1 else ",".join(map(str, counts))


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ------------------------------------------------------------------- bench
@main.command()
@click.argument("pipeline")
@click.option("--image", "images", multiple=True, required=True, help="Image file (repeat for a batch).")
@click.option("--query", default=None, help="Question / text query for query-guided stages.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Repeat the images up to this batch size.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
def bench(pipeline: str, images: tuple[str, ...], query: str | None, device: str, batch: int | None,
          repeats: int, warmup: int) -> None:
    """Time PIPELINE stage by stage: median and best ms over --repeats runs, after --warmup runs."""
    import statistics

    from rich.progress import Progress

    from .images import load_images
    from .pipeline import load_pipeline

    with err_console.status(f"building pipeline {pipeline!r}", spinner="dots"):
        pipe = load_pipeline(pipeline, device=device)
    pixels = load_images(list(images), getattr(pipe.encoder, "input_size", None))
    if batch is not None:
        pixels = pixels.repeat((batch + len(pixels) - 1) // len(pixels), 1, 1, 1)[:batch]
    traces = []
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("running", total=warmup + repeats)
        for i in range(warmup + repeats):
            state = pipe(pixels, query=query)
            if i >= warmup:
                traces.append(state.trace)
            progress.advance(task)
    table = Table(title=f"{pipe.spec.name} on {pipe.device}: batch {len(pixels)}, {repeats} runs")
    for column in ("stage", "plugin", "tokens in", "tokens out", "median ms", "best ms"):
        table.add_column(column, justify="left" if column in ("stage", "plugin") else "right")
    for records in zip(*traces):
        first, times = records[0], [r.ms for r in records]
        table.add_row(escape(first.stage), escape(first.plugin), _counts(first.tokens_in), _counts(first.tokens_out),
                      f"{statistics.median(times):.2f}", f"{min(times):.2f}")
    totals = [sum(r.ms for r in trace) for trace in traces]
    console.print(table)
    console.print(f"total {statistics.median(totals):.1f} ms median per batch, "
                  f"{len(pixels) / statistics.median(totals) * 1e3:.1f} images/s")


# -------------------------------------------------------------------- list
# ---------------------------------------------------------------- generate
@main.command()
@click.argument("model_dir")
@click.option("--pipeline", required=True, help="Built-in pipeline name or YAML file run inside the model.")
@click.option("--image", "images", multiple=True, required=True, help="Image file (repeat for a batch).")
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Question; one for all images or one per image. Wrapped as 'USER: <image>\\n... ASSISTANT:' "
              "unless it already holds '<image>'.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--projector", type=click.Choice(["auto", "before", "after"]), default="auto", show_default=True,
              help="Where pre-LLM stages run relative to the projector.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print answers and report as JSON.")
def generate(model_dir: str, pipeline: str, images: tuple[str, ...], prompts: tuple[str, ...], max_new_tokens: int,
             projector: str, device: str, as_json: bool) -> None:
    """Answer PROMPT about IMAGE with the Hugging Face VLM in MODEL_DIR, PIPELINE applied inside it."""
    import torch

    from . import hf
    from .images import load_images
    from .models import check_model_dir
    from .pipeline import _resolve_device

    texts = list(prompts) * len(images) if len(prompts) == 1 else list(prompts)
    if len(texts) != len(images):
        raise InputError(f"--prompt: got {len(prompts)} prompts for {len(images)} images; pass one, or one per image")
    for i, text in enumerate(prompts):
        if text.count("<image>") > 1:  # the processor would fail on it with a raw ValueError after the model loads
            raise InputError(
                f"--prompt {i + 1}: holds {text.count('<image>')} '<image>' placeholders, but each prompt goes with "
                "one --image; write '<image>' once, or leave it out (the prompt is then wrapped as "
                "'USER: <image>\\n... ASSISTANT:')")
    texts = [t if "<image>" in t else f"USER: <image>\n{t} ASSISTANT:" for t in texts]
    model_dir = check_model_dir(model_dir)  # a missing directory or file is named before anything loads
    with err_console.status(f"loading {model_dir}", spinner="dots") if not as_json else _nullcontext():
        model, processor = hf.load(model_dir, device=_resolve_device(device))
    pil = [_to_pil(load_images([image], None)[0]) for image in images]  # sizes may differ: one at a time
    try:
        inputs = processor(images=pil, text=texts, return_tensors="pt", padding=True)
    except (ValueError, TypeError) as exc:  # e.g. placeholders that do not match what the model expects
        raise InputError(f"the processor of {model_dir} refused the prompts {texts!r} with {len(pil)} images: "
                         f"{exc}") from None
    inputs = inputs.to(next(model.parameters()).device)
    with err_console.status("generating", spinner="dots") if not as_json else _nullcontext():
        with torch.inference_mode(), \
                hf.apply(model, pipeline, projector=projector, tokenizer=processor.tokenizer) as run:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if as_json:
        click.echo(json.dumps({"answers": answers, "report": run.report.as_dict()}, default=str))
        return
    for image, answer in zip(images, answers):
        console.print(f"[bold]{escape(image)}[/]: {escape(answer.strip())}", highlight=False)
    console.print(run.report.table())


def _to_pil(pixels: Any) -> Any:
    from PIL import Image

    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


# -------------------------------------------------------------------- eval
@main.command("eval")
@click.argument("pipelines", nargs=-1)
@click.option("--budgets", default="1.0,0.5,0.25,0.125,0.05", show_default=True,
              help="Fractions of the visual tokens the LLM sees (mean over decoder layers), comma-separated.")
# --questions: torchrun's own parser reads `--n` after `-m arrcoc eval` as an ambiguous abbreviation of its options.
@click.option("--n", "--questions", "n", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Questions (--questions under torchrun, whose parser takes --n for its own --nnodes...).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for results.csv, results.md and the plots; a rerun resumes from its results.csv.")
@click.option("--model", "model_dir", default=None,
              help="Local Hugging Face checkpoint (LLaVA-1.5 style); default: the shipped ToyVQA model.")
@click.option("--data", default="toyvqa", show_default=True,
              help="toyvqa[:test|val], a JSONL file (image, question, answer[, type, id]) or a folder with "
              "metadata.jsonl.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens generated per question (default: the longest answer + 1).")
@click.option("--no-baselines", is_flag=True, help="Leave out downsampling, random_keep and pool (all tokens stays).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None, help="torch intra-op threads.")
@click.option("--restart", is_flag=True, help="Discard the results already in --out.")
@click.option("--no-plots", is_flag=True, help="Skip the matplotlib figures.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes (gloo), each evaluating a shard of the questions; the tables are those of one "
              "process. Under torchrun / accelerate launch leave it out: each launched process is a rank.")
def eval_(pipelines: tuple[str, ...], budgets: str, n: int, out: str, model_dir: str | None, data: str,
          batch_size: int, max_new_tokens: int | None, no_baselines: bool, device: str, threads: int | None,
          restart: bool, no_plots: bool, nproc: int) -> None:
    """Accuracy, loyalty and cost of PIPELINES (default: every shipped one) at each budget, against baselines.

    Writes OUT/results.csv (a row per method and budget, as it finishes), OUT/results.md and plots
    (accuracy vs visual tokens, vs prefill ms, per question type). See docs/eval.md; data-parallel:
    --nproc N, or torchrun --nproc-per-node N -m arrcoc eval ... (docs/eval.md, "Many processes").
    """
    import os
    import time

    import torch

    from .errors import BudgetError
    from .evaluation import evaluate

    # Every item counts: an empty one (``""``, ``","``, ``0.5,,0.25``) is a typo, never a budget left out.
    items = [b.strip() for b in budgets.split(",")]
    try:
        if not all(items):
            raise ValueError
        fractions = [float(b) for b in items]
    except ValueError:
        raise BudgetError(f"--budgets: expected comma-separated fractions such as 1.0,0.5,0.25, got {budgets!r}") from None
    if threads is not None:
        torch.set_num_threads(threads)
    began = time.perf_counter()
    result = evaluate(list(pipelines), budgets=fractions, n=n, out=out, model=model_dir, data=data,
                      batch_size=batch_size, max_new_tokens=max_new_tokens, baselines=not no_baselines,
                      device=None if device == "auto" else device, restart=restart, plots=not no_plots,
                      log=lambda line: err_console.print(escape(line), highlight=False),
                      processes=nproc)
    if os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return   # one table, from rank 0 of torchrun / accelerate launch
    table = Table(title=f"arrcoc eval: accuracy (visual tokens per image), {result.rows[0]['n']} questions")
    table.add_column("method")
    from .evaluation.output import accuracy_grid

    shown, grid = accuracy_grid(result.rows, tokens_format=".0f")
    for b in shown:
        table.add_column(f"{b:g}", justify="right")
    for method, kind, cells in grid:
        cells = ["[dim]unreachable[/]" if c == "unreachable" else c for c in cells]
        table.add_row(escape(method) + (" [dim](baseline)[/]" if kind == "baseline" else ""), *cells)
    console.print(table)
    console.print(f"wrote {escape(str(result.out))}/results.csv, results.md{'' if no_plots else ' and plots'} in "
                  f"{time.perf_counter() - began:.0f} s")


# ------------------------------------------------------------------- serve
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model")
@click.option("--pipeline", required=True, help="Built-in pipeline name or YAML file (pre-LLM stages only).")
@click.option("--tokens", type=click.IntRange(min=1), required=True, help="Visual tokens each image keeps (K).")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(model: str, pipeline: str, tokens: int, vllm_args: tuple[str, ...]) -> None:
    """Serve MODEL with vLLM's OpenAI-compatible server, PIPELINE keeping TOKENS visual tokens per image.

    Every other argument goes to `vllm serve` (e.g. --port 8000 --tensor-parallel-size 2). Needs
    pip install "arrcoc[vllm]"; see docs/vllm.md.
    """
    from .vllm.serve import serve as serve_with_vllm  # imports vLLM only when it runs

    serve_with_vllm(model, pipeline, tokens, vllm_args,
                    say=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))


@main.command("list")
@click.argument("kind", required=False)
@click.option("--filter", "pattern", default=None, help="Wildcard on plugin names, e.g. '*zip*'.")
def list_(kind: str | None, pattern: str | None) -> None:
    """List plugins (optionally of one KIND) and pipelines."""
    from .plugin import KINDS
    from .registry import get_registry
    from .spec import available_pipelines
    from .errors import UnknownPluginError, did_you_mean

    if kind is not None and kind not in KINDS:
        raise UnknownPluginError(f"unknown plugin kind {kind!r}{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
    registry = get_registry()
    table = Table(title="plugins")
    for column in ("kind", "name", "stage", "needs", "provided by", "summary"):
        table.add_column(column)
    for info in registry.list(kind, pattern):
        table.add_row(info.kind, f"[cyan]{escape(info.name)}[/]", info.cls.stage,
                      ", ".join(sorted(_default_needs(info))), escape(info.provider), escape(info.summary))
    console.print(table)
    if kind is None:
        pipelines = Table(title="pipelines")
        pipelines.add_column("name", style="cyan")
        pipelines.add_column("file")
        for name, path in sorted(available_pipelines().items()):
            pipelines.add_row(name, str(path))
        console.print(pipelines)
    for name, error in sorted(registry.failures.items()):
        console.print(f"[red]failed to load[/] {escape(name)}: {escape(error)}", highlight=False)
    for conflict_kind, conflict_name in sorted(registry.conflicts):
        if (kind is None or conflict_kind == kind) and (pattern is None or fnmatch.fnmatch(conflict_name, pattern)):
            message = registry.conflict(conflict_kind, conflict_name) or ""
            console.print(f"[red]conflict[/] {escape(message)}", highlight=False)


# -------------------------------------------------------------------- show
@main.command()
@click.argument("name")
@click.option("--kind", default=None, help="Plugin kind, when NAME exists for several kinds.")
def show(name: str, kind: str | None) -> None:
    """Show a plugin's parameters (defaults and docs), or a pipeline's YAML."""
    from .errors import PluginLoadError, UnknownPluginError, did_you_mean
    from .registry import get_registry
    from .spec import available_pipelines, read_pipeline_text

    registry = get_registry()
    matches = [info for info in registry.list(kind) if info.name == name]
    conflict = registry.conflict(kind, name)
    if conflict is not None and not matches:
        raise PluginLoadError(conflict)
    if not matches:
        pipelines = available_pipelines()
        if name in pipelines:
            console.print(f"[bold]{escape(name)}[/] ({escape(str(pipelines[name]))})")
            console.print(read_pipeline_text(pipelines[name]), highlight=False, markup=False)
            return
        names = sorted({i.name for i in registry.list()} | set(pipelines))
        raise UnknownPluginError(f"no plugin or pipeline named {name!r}{did_you_mean(name, names)}")
    for info in matches:
        doc = (info.cls.__doc__ or "").strip()
        console.print(f"[bold cyan]{escape(info.name)}[/] ({info.kind}, stage {info.cls.stage}, from {escape(info.provider)})")
        if doc:
            console.print(doc, highlight=False, markup=False)
        if info.cls.needs:
            console.print(f"needs: {', '.join(sorted(info.cls.needs))}")
        table = Table()
        for column in ("param", "type", "default", "description"):
            table.add_column(column)
        for field_name, field in info.cls.Params.model_fields.items():
            value = None if field.is_required() else field.get_default(call_default_factory=True)
            value = value.as_yaml_dict() if hasattr(value, "as_yaml_dict") else value  # nested plugin: as in YAML
            default = "required" if field.is_required() else repr(value)
            # Cells are rich markup: escape so that `list[int]` or `[unmerged A, all B]` are shown as written.
            table.add_row(field_name, escape(_type_name(field.annotation)), escape(default), escape(field.description or ""))
        console.print(table)
    if conflict is not None:
        console.print(f"[red]conflict[/] {escape(conflict)}", highlight=False)


def _type_name(annotation: Any) -> str:
    import typing

    from .plugin import PluginRef

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    nested = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is typing.Annotated]
    if annotation is PluginRef or PluginRef in nested:
        optional = type(None) in typing.get_args(annotation)
        return "{use: <plugin>, ...}" + (" | None" if optional else "")
    plain = isinstance(annotation, type) and not getattr(annotation, "__args__", None)
    text = annotation.__name__ if plain else str(annotation)
    return text.replace("typing.", "").replace("typing_extensions.", "").replace("NoneType", "None")


# ---------------------------------------------------------------- validate
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
def validate(files: tuple[str, ...]) -> None:
    """Validate pipeline FILES (sections, plugin names, params) without running a model."""
    from .spec import load_yaml

    failed = 0
    for file in files:
        try:
            spec = load_yaml(file)
        except ArrcocError as exc:
            failed += 1
            err_console.print(f"[red]invalid[/] {escape(str(exc))}", highlight=False)
            continue
        stages = " -> ".join(stage.use for _, _, stage in spec.stages())
        console.print(f"[green]ok[/] {escape(f'{file}: {spec.name} ({stages})')}", highlight=False)
    if failed:
        sys.exit(1)


# ------------------------------------------------------------------ schema
@main.command()
def schema() -> None:
    """Print the JSON schema of a pipeline file, with every plugin's parameters."""
    from .spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
