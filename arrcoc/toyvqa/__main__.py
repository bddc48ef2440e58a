"""``python -m arrcoc.toyvqa``: train | evaluate | baselines | export | show."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cli import MAX_THREADS
from ..errors import ArrcocError

console = Console()
err_console = Console(stderr=True)


class _Group(click.Group):
    """An ArrcocError is one red line and exit code 2, as in the ``arrcoc`` command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ArrcocError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """ToyVQA: the procedural VQA task and the small LLaVA trained on it."""


def accuracy_table(title: str, columns: dict[str, Any]) -> Table:
    """One row per question type, one column per predictor (``Accuracy`` objects)."""
    from .questions import QUESTION_TYPES

    table = Table(title=title)
    table.add_column("question type")
    for name in columns:
        table.add_column(name, justify="right")
    for qtype in QUESTION_TYPES:
        table.add_row(qtype, *(f"{acc.of(qtype):.1%}" for acc in columns.values()))
    table.add_row("[bold]overall", *(f"[bold]{acc.overall:.1%}" for acc in columns.values()))
    return table


class _FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through: no comparison fails)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@main.command()
@click.option("--out", default="runs/toyvqa", show_default=True, type=click.Path(file_okay=False),
              help="Directory for checkpoints, the log and the final model.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: the recipe's).")
@click.option("--batch-images", type=click.IntRange(min=1), default=None, help="Images per step.")
@click.option("--questions-per-image", type=click.IntRange(min=1), default=None, help="Conversation turns per image.")
@click.option("--lr", type=_FiniteRange(min=0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--grounding-weight", type=_FiniteRange(min=0), default=None, help="Weight of the grounding loss (0: off).")
@click.option("--attention-weight", type=_FiniteRange(min=0), default=None, help="Weight of the attention losses (0: off).")
@click.option("--seed", type=click.IntRange(min=0, max=(1 << 63) - 1), default=None,
              help="Seed of the initialisation.")
@click.option("--tiny", is_flag=True, help="A tiny model (for smoke tests), not the shipped size.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
              help="torch threads (default: torch's).")
def train(out: str, steps, batch_images, questions_per_image, lr, grounding_weight, attention_weight, seed, tiny, resume,
          checkpoint_every, threads) -> None:
    """Train the ToyVQA model end to end (CPU) and save it in OUT."""
    from dataclasses import replace

    from .modeling import TINY
    from .train import TrainConfig, train as run_training

    config = TrainConfig()
    changes = {"steps": steps, "batch_images": batch_images, "questions_per_image": questions_per_image,
               "lr": lr, "grounding_weight": grounding_weight, "attention_weight": attention_weight, "seed": seed}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    if tiny:
        config = replace(config, size=TINY)
    path = run_training(out, config, resume=resume, checkpoint_every=checkpoint_every, threads=threads)
    summary = json.loads((path / "train_summary.json").read_text())
    console.print(f"saved {path}: {summary['parameters']:,} parameters, {summary['wall_s'] / 60:.1f} min wall, "
                  f"{summary['cpu_s'] / 60:.1f} min CPU, {summary['threads']} threads")


@main.command()
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="Model directory (default: the shipped model, also named arrcoc:toyvqa).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--n", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Weights are cast to this dtype after loading (computation too).")
@click.option("--grounding-scenes", type=click.IntRange(min=0), default=100, show_default=True,
              help="Also measure word-patch alignment on this many scenes.")
@click.option("--json", "as_json", type=click.Path(dir_okay=False), default=None, help="Also write the numbers here.")
def evaluate(model_dir, split, n, batch_size, dtype, grounding_scenes, as_json) -> None:
    """Accuracy on a split, overall and per question type (greedy next-token answers)."""
    import torch

    from .evaluation import evaluate as run_eval, grounding_alignment
    from .modeling import load

    model, processor = load(model_dir, dtype=getattr(torch, dtype))
    result = run_eval(model, processor, split=split, n=n, batch_size=batch_size)
    console.print(accuracy_table(f"ToyVQA {split}, {n} questions, {dtype}", {"model": result.accuracy}))
    payload = {"split": split, "n": n, "dtype": dtype, **result.accuracy.as_dict()}
    if grounding_scenes:
        alignment = grounding_alignment(model, split=split, n=grounding_scenes, batch_size=batch_size)
        for key, value in alignment.items():
            console.print(f"{key}: {value:.1%}" if isinstance(value, float) else f"{key}: {value}")
        payload["grounding"] = alignment
    if as_json:
        with open(as_json, "w") as f:
            json.dump(payload, f, indent=2)


@main.command()
@click.option("--n-train", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--n-test", type=click.IntRange(min=1), default=2_000, show_default=True)
def baselines(n_train: int, n_test: int) -> None:
    """Accuracy of image-blind predictors: what priors alone get."""
    from .data import baselines as run_baselines

    scores = run_baselines(n_train, n_test, progress=True)
    console.print(accuracy_table(f"ToyVQA test, {n_test} questions: image-blind baselines fitted on {n_train} train "
                                 "questions", scores))


@main.command()
# not exists=True: SOURCE may be arrcoc:toyvqa, and load() names a directory without config.json
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
def export(source: str, target: str, dtype: str) -> None:
    """Copy the model in SOURCE (a directory or arrcoc:toyvqa) to TARGET with its weights in DTYPE (the package
    ships float16)."""
    import torch

    from .train import export as run_export

    path = run_export(source, target, getattr(torch, dtype))
    console.print(f"wrote {path}")


@main.command()
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Save the image (PNG).")
@click.option("--scale", type=click.IntRange(min=1), default=1, show_default=True,
              help="Enlarge the saved image this many times (nearest neighbour); 1 keeps the model's 128 px.")
def show(split: str, index: int, out: str | None, scale: int) -> None:
    """Print a sample's question, answer and object records."""
    from .data import sample

    s = sample(split, index)
    console.print(f"[bold]{escape(s.question.text)}[/]  ->  [green]{s.question.answer}[/]  "
                  f"({s.question.qtype}, seed {s.seed}, background {s.scene.background})")
    table = Table()
    for column in ("#", "object", "centre (row, col)", "patches", "target"):
        table.add_column(column)
    for i, o in enumerate(s.objects):
        table.add_row(str(i), o.name, f"({o.centre[0]:.1f}, {o.centre[1]:.1f})", str(list(o.patches)),
                      "yes" if i in s.question.targets else "")
    console.print(table)
    if out:
        from PIL import Image

        Image.fromarray(s.image).resize((s.image.shape[1] * scale, s.image.shape[0] * scale), Image.NEAREST).save(out)
        console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
