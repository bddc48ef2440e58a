"""What works without vLLM, in both environments: importing ``arrcoc.vllm`` and ``engine_args`` import
nothing of vLLM; ``arrcoc serve`` without vLLM says what to install; ``register`` is idempotent."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner


def test_engine_args_import_no_vllm():
    code = ("import sys, json, arrcoc.vllm\n"
            "args = arrcoc.vllm.engine_args('sparsevlm', tokens_per_image=64, model='arrcoc:toyvqa')\n"
            "print(json.dumps({'args': args, 'vllm': sorted(m for m in sys.modules if m.split('.')[0] == 'vllm')}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["vllm"] == []
    overrides = result["args"]["hf_overrides"]
    assert overrides == {"architectures": ["ArrcocLlavaForConditionalGeneration"], "arrcoc_pipeline": "sparsevlm",
                         "arrcoc_tokens_per_image": 64}
    # sparsevlm reads the prompt's text: the processor cache would share one prompt's inputs with another
    assert result["args"]["mm_processor_cache_gb"] == 0


def test_engine_args_without_model_defer_the_architecture():
    import arrcoc.vllm

    args = arrcoc.vllm.engine_args("random_keep", tokens_per_image=64)
    assert "mm_processor_cache_gb" not in args  # not query-aware: every cache stays on
    config = type("Config", (), {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})()
    config = args["hf_overrides"](config)
    assert config.architectures == ["ArrcocLlavaForConditionalGeneration"]
    assert (config.arrcoc_pipeline, config.arrcoc_tokens_per_image) == ("random_keep", 64)
    # vLLM first calls the function on a blank probe, only to see whether it changes the model type
    probe = type("Config", (), {"architectures": [""], "model_type": "dummy_llava"})()
    assert args["hf_overrides"](probe).model_type == "dummy_llava"


def test_a_pipeline_file_travels_as_its_content(tmp_path):
    import arrcoc.vllm
    from arrcoc.vllm.settings import spec_from_text

    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nencoder: {use: hf_vision, model: 'arrcoc:toyvqa'}\n"
                    "compress:\n  - {use: random_keep, keep: 0.5, seed: 3}\n")
    text = arrcoc.vllm.engine_args(str(path), tokens_per_image=32, model="arrcoc:toyvqa")["hf_overrides"][
        "arrcoc_pipeline"]
    spec = spec_from_text(text)  # what the engine reads, wherever it runs
    assert spec.name == "mine" and spec.compress[0].params == {"keep": 0.5, "seed": 3}


def test_serve_without_vllm_says_what_to_install(monkeypatch):
    import arrcoc.vllm.serve
    from arrcoc.cli import main

    real = arrcoc.vllm.serve.importlib.util.find_spec
    monkeypatch.setattr(arrcoc.vllm.serve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    result = CliRunner().invoke(main, ["serve", "arrcoc:toyvqa", "--pipeline", "random_keep", "--tokens", "64"])
    assert result.exit_code == 2
    assert 'arrcoc serve needs vLLM, which is not installed: pip install "arrcoc[vllm]"' in result.output


def test_help_lists_serve_without_vllm():
    from arrcoc.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "serve" in result.output


def test_serve_merges_the_users_hf_overrides():
    """vLLM keeps only the last --hf-overrides: a user's own (e.g. a longer context) replaced arrcoc's, and the
    server ran the model without arrcoc (vanilla architecture, every visual token) while arrcoc serve said
    'K visual tokens per image'.  Now the user's keys are merged into arrcoc's."""
    import pytest

    from arrcoc.errors import InputError
    from arrcoc.vllm.serve import vllm_command

    argv = vllm_command("arrcoc:toyvqa", "random_keep", 64,
                        ["--port", "8000", "--hf-overrides", '{"max_position_embeddings": 4096}',
                         '--hf_overrides={"rope_theta": 5}'])
    assert argv.count("--hf-overrides") == 1 and not any(a.startswith("--hf_overrides") for a in argv)
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == {
        "architectures": ["ArrcocLlavaForConditionalGeneration"], "arrcoc_pipeline": "random_keep",
        "arrcoc_tokens_per_image": 64, "max_position_embeddings": 4096, "rope_theta": 5}
    assert argv[-2:] == ["--port", "8000"]
    with pytest.raises(InputError, match="sets arrcoc_tokens_per_image, which arrcoc sets"):
        vllm_command("arrcoc:toyvqa", "random_keep", 64, ["--hf-overrides", '{"arrcoc_tokens_per_image": 8}'])
    with pytest.raises(InputError, match="not valid JSON"):
        vllm_command("arrcoc:toyvqa", "random_keep", 64, ["--hf-overrides", "{oops"])
