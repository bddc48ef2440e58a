"""The ``arrcoc`` command, run in-process with click's runner.

Text that comes from plugins, params and errors is printed through rich, whose
markup would swallow anything that looks like a tag (``list[int]``,
``[unmerged A, all B]``): it must come out as written.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from arrcoc import cli
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor
from arrcoc.registry import Registry, using_registry


@pytest.fixture
def run(monkeypatch):
    # wide consoles: no wrapping inside table cells
    monkeypatch.setattr(cli, "console", Console(width=2000))
    monkeypatch.setattr(cli, "err_console", Console(width=2000, stderr=True))

    def invoke(*args: str):
        return CliRunner().invoke(cli.main, list(args))

    return invoke


def test_show_prints_types_defaults_and_descriptions_as_written(run):
    result = run("show", "tome")
    assert result.exit_code == 0, result.output
    assert "int | list[int]" in result.output  # not "int | list"
    assert "tome.merge's [unmerged A, all B]" in result.output
    result = run("show", "timm_vit")
    assert result.exit_code == 0, result.output
    assert "list[int]" in result.output and "(per_token 'cls_attn')" in result.output


def test_list_filters_and_unknown_kind_is_one_error_line(run):
    result = run("list", "compressor", "--filter", "to*")
    assert result.exit_code == 0 and "tome" in result.output and "visionzip" not in result.output
    result = run("list", "compresor")
    assert result.exit_code == 2
    assert "error: unknown plugin kind 'compresor' (did you mean 'compressor'?)" in result.output


def test_errors_are_printed_as_written(run):
    result = run("run", "nope[abc]", "--image", "x.png")
    assert result.exit_code == 2
    assert "unknown pipeline 'nope[abc]'" in result.output and "Traceback" not in result.output


def test_validate_reports_each_file(run, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("name: g\nencoder: {use: timm_vit}\ncompress:\n  - {use: tome, r: 4}\n")
    bad.write_text("encoder: {use: timm_vit}\ncompress:\n  - {use: tomee}\n")
    result = run("validate", str(good), str(bad))
    assert result.exit_code == 1
    assert f"ok {good}: g (timm_vit -> tome)" in result.output
    assert f"invalid {bad}:3: compress[0]: unknown compressor 'tomee' (did you mean 'tome'?)" in result.output


def test_validate_refuses_hostile_files_fast(run, tmp_path):
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
    ) + "encoder: {use: timm_vit, model_kwargs: {x: *i}}\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: café\nencoder: timm_vit\n".encode("latin-1"))
    start = time.perf_counter()
    result = run("validate", str(laughs), str(latin))
    assert time.perf_counter() - start < 5.0
    assert result.exit_code == 1, result.output
    assert f"invalid {laughs}: the YAML expands to more than 10000 nodes" in result.output
    assert f"invalid {latin}:1: a pipeline file must be UTF-8 text, but byte 0xe9 at offset 9" in result.output


class FastToMe(Compressor):
    """A third party's class claiming the built-in name 'tome'."""

    name = "tome"

    def __call__(self, state):
        return state


class FastToMeModule:
    @hookimpl
    def arrcoc_register_plugins(self, register):
        register(FastToMe)


def test_a_name_two_plugins_claim_is_an_error_in_every_command(run, tmp_path):
    registry = Registry()  # the installed plugins, and a third party claiming 'tome'
    registry.register(FastToMeModule(), name="fast_tome")
    conflict = ("compressor 'tome' is provided twice: by tome (arrcoc_plugins.compressors.tome.ToMe) and by "
                "fast_tome (test_cli.FastToMe)")
    spec = tmp_path / "uses_tome.yaml"
    spec.write_text("encoder: {use: timm_vit}\ncompress:\n  - {use: tome, r: 2}\n")
    with using_registry(registry):
        for args, code, prefix in [
            (("run", "tome", "--image", "x.png", "--device", "cpu"), 2, "error: "),
            (("bench", str(spec), "--image", "x.png", "--device", "cpu"), 2, f"error: {spec}:3: compress[0]: "),
            (("show", "tome"), 2, "error: "),
            (("validate", str(spec)), 1, f"invalid {spec}:3: compress[0]: "),
            (("list", "compressor"), 0, "conflict "),
        ]:
            result = run(*args)
            assert result.exit_code == code, (args, result.output)
            assert prefix + conflict in result.output, (args, result.output)


def test_run_json_trace(run, tmp_path):
    spec = tmp_path / "small.yaml"
    spec.write_text(
        "name: small\nencoder:\n  use: timm_vit\n  model: vit_tiny_patch16_224\n"
        "  model_kwargs: {depth: 2, img_size: 64}\n  layer: -1\ncompress:\n  - {use: tome, r: 4, metric: tokens}\n"
    )
    image = tmp_path / "a.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()).save(image)
    result = run("run", str(spec), "--image", str(image), "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["pipeline"] == "small" and payload["tokens_shape"] == [1, 12, 192]
    assert [(r["stage"], r["tokens_in"], r["tokens_out"]) for r in payload["trace"]] == [
        ("encoder", [17], [17]), ("compress[0]", [17], [13])]


def test_run_says_in_llm_stages_do_not_run_standalone(run, tmp_path):
    spec = tmp_path / "llm.yaml"
    spec.write_text(
        "name: llm\nencoder:\n  use: timm_vit\n  model: vit_tiny_patch16_224\n"
        "  model_kwargs: {depth: 2, img_size: 64}\n  layer: -1\nllm:\n  - {use: pyramiddrop, layers: [2, 4]}\n"
    )
    image = tmp_path / "a.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()).save(image)
    result = run("run", str(spec), "--image", str(image), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "note llm[0] (pyramiddrop): in-LLM stages run only inside a model" in result.output
    assert "17 -> 17 tokens per image" in result.output


def test_bench_times_every_stage(run, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "name: tiny\nencoder: {use: timm_vit, model: vit_tiny_patch16_224, model_kwargs: {depth: 2, img_size: 64}}\n"
        "compress:\n  - {use: tome, r: 4}\n"
    )
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 30, 40)).save(image)
    result = run("bench", str(spec), "--image", str(image), "--batch", "3", "--repeats", "2", "--warmup", "0",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "tiny on cpu: batch 3, 2 runs" in result.output
    assert "compress[0]" in result.output and "17" in result.output and "13" in result.output  # 16+1 -> 12+1
    assert "images/s" in result.output


def test_run_compares_several_queries_on_one_image_one_figure_row_each(run, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    image = tmp_path / "scene.png"
    Image.fromarray(__import__("arrcoc.toyvqa", fromlist=["sample"]).sample("test", 11).image).save(image)
    figure = tmp_path / "fig.png"
    result = run("run", "arr_coc", "--image", str(image), "--query", "what colour is the triangle?",
                 "--query", "what shape is the purple object?", "--device", "cpu", "--json", "--out", str(figure))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["images"] == [str(image)] * 2
    assert payload["query"] == ["what colour is the triangle?", "what shape is the purple object?"]
    assert payload["tokens_shape"][0] == 2
    data = figure.read_bytes()
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1600, 880)   # two rows


def test_run_refuses_queries_that_do_not_pair_with_the_images(run, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(image)
    result = run("run", "tome", "--image", str(image), "--image", str(image), "--image", str(image),
                 "--query", "a", "--query", "b")
    assert result.exit_code != 0
    assert "got 2 --query for 3 --image" in result.output
