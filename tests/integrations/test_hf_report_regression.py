"""``run.report`` is what it was before the ``arrcoc.hf`` redesign (issue 17): same counts, FLOPs, KV bytes.

``report_before_redesign.json`` holds the reports of the code before the
redesign (commit e8c2bc8) for each family x pipeline x call below, made by
this file's ``__main__`` run against that checkout::

    git worktree add /tmp/before e8c2bc8
    mkdir /tmp/before_path && ln -s /tmp/before/arrcoc /tmp/before_path/arrcoc \\
        && ln -s /tmp/before/plugins /tmp/before_path/arrcoc_plugins \\
        && ln -s /tmp/before/pipelines /tmp/before/arrcoc/pipelines
    cd tests/integrations && PYTHONPATH=/tmp/before_path python test_hf_report_regression.py

Everything but the times is compared exactly: tokens and visual tokens per
decoder layer and sample, FLOPs per layer, KV-cache bytes, the pre-LLM
stages' token counts, the in-LLM stages that ran.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import arrcoc  # noqa: E402
from test_hf_generate_parity import llava_inputs, llava_next_inputs, qwen_inputs  # noqa: E402
from tiny_models import tiny_llava, tiny_llava_next, tiny_qwen2_vl  # noqa: E402

EXPECTED = Path(__file__).with_name("report_before_redesign.json")
ENC = {"use": "timm_vit"}
NEW = 3


def _spec(name: str, compress: list | None = None, llm: list | None = None) -> dict:
    spec: dict[str, Any] = {"name": name, "encoder": ENC}
    if compress:
        spec["compress"] = compress
    if llm:
        spec["llm"] = llm
    return spec


PIPELINES = {
    "random_keep": _spec("random_keep", [{"use": "random_keep", "keep": 0.5}]),
    "hired": _spec("hired", [{"use": "hired", "keep": 0.25}]),
    "prumerge": _spec("prumerge", [{"use": "prumerge"}]),
    "fastv": _spec("fastv", llm=[{"use": "fastv", "layer": 2, "keep": 0.5}]),
    "aim_mask": _spec("aim_mask", llm=[{"use": "aim_prune", "start_layer": 1, "step": 0.25, "mode": "mask"}]),
    "sparsevlm_llm": _spec("sparsevlm_llm", llm=[{"use": "sparsevlm_llm", "layers": [1, 2], "budget": 64}]),
    "aim_prune": _spec("aim_prune", llm=[{"use": "aim_prune", "start_layer": 1, "step": 0.25}]),
    "composed": _spec("composed", [{"use": "random_keep", "keep": 0.5}],
                      [{"use": "fastv", "layer": 1, "keep": 0.5}, {"use": "fastv", "layer": 3, "keep": 0.5}]),
}
FAMILIES = {
    "llava": (tiny_llava, llava_inputs, list(PIPELINES)),
    "llava_next": (tiny_llava_next, llava_next_inputs, ["random_keep", "fastv", "composed"]),
    "qwen2_vl": (tiny_qwen2_vl, qwen_inputs, ["random_keep", "fastv", "aim_mask", "composed"]),
}
CASES = [(family, pipeline, call) for family, (_, _, names) in FAMILIES.items() for pipeline in names
         for call in ("forward", "generate")]


def _summary(report: Any) -> dict[str, Any]:
    return {
        "batch": report.batch,
        "layer_tokens": report.layer_tokens,
        "layer_visual": report.layer_visual,
        "layer_flops": report.layer_flops,
        "kv_cache_bytes": report.kv_cache_bytes,
        "new_tokens": report.new_tokens,
        "pre_llm": [[r.stage, r.plugin, list(r.tokens_in), list(r.tokens_out)] for r in report.pre_llm],
        "llm_stages": sorted(report.llm_stage_ms),
    }


def report_of(family: str, pipeline: str, call: str, models: dict[str, Any]) -> dict[str, Any]:
    build, inputs, _ = FAMILIES[family]
    if family not in models:
        models[family] = build()
    model = models[family]
    batch = inputs(model)
    with warnings.catch_warnings(), torch.no_grad(), arrcoc.hf.apply(model, PIPELINES[pipeline]) as run:
        warnings.simplefilter("ignore")
        if call == "generate":
            model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        else:
            model(**batch)
    return _summary(run.report)


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {}


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads(EXPECTED.read_text(encoding="utf-8"))


@pytest.mark.parametrize("family, pipeline, call", CASES, ids=["-".join(c) for c in CASES])
def test_report_is_what_it_was_before_the_redesign(family, pipeline, call, models, expected):
    got = report_of(family, pipeline, call, models)
    want = expected["-".join((family, pipeline, call))]
    assert got == want


if __name__ == "__main__":  # write the expected reports with the checkout on the path
    sys.path.insert(0, str(Path(__file__).parent))
    print(f"arrcoc from {arrcoc.__file__}", file=sys.stderr)
    made: dict[str, Any] = {}
    out = {"-".join(case): report_of(*case, made) for case in CASES}
    EXPECTED.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(out)} reports to {EXPECTED}", file=sys.stderr)
