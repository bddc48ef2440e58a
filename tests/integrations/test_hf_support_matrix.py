"""The support matrix of docs/hf.md: every method on every model family, batch > 1, runs or refuses clearly.

Each family gets a batch of two prompts of different lengths whose images
differ (LLaVA-NeXT: crop grids 1x2 and 2x1; Qwen2-VL: 8x12 and 6x6
patches).  "runs": ``generate`` succeeds and the LLM sees fewer visual
tokens than the model alone would; "refuses": an ``ArrcocError`` whose
message says why, when the ``with`` block is entered or at the first call.
"""

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from tiny_models import IMAGE, left_pad, tiny_llava, tiny_llava_next, tiny_qwen2_vl





def _text(pre, post):
    return list(range(5, 5 + pre)), list(range(20, 20 + post))


def _batch(rows, extra):
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, **extra}


def llava():
    model = tiny_llava(torch.float32)
    rows = [[1, *a, *[IMAGE] * 64, *b] for a, b in (_text(3, 5), _text(1, 9))]
    return model, _batch(rows, {"pixel_values": torch.randn(2, 3, 112, 112)}), 64




def llava_next():
    model = tiny_llava_next(torch.float32)
    sizes = torch.tensor([[50, 100], [90, 40]])
    per = arrcoc.hf.adapter_for(model).tokens_per_image(None, {"image_sizes": sizes})
    rows = [[1, *a, *[IMAGE] * n, *b] for n, (a, b) in zip(per, (_text(3, 5), _text(1, 9)))]
    return model, _batch(rows, {"pixel_values": torch.randn(2, 5, 3, 56, 56), "image_sizes": sizes}), 16


def qwen2_vl():
    model = tiny_qwen2_vl(torch.float32)
    grids = torch.tensor([[1, 8, 12], [1, 6, 6]])
    rows = [[1, *a, 902, *[900] * n, 903, *b] for n, (a, b) in zip((24, 9), (_text(3, 5), _text(1, 9)))]
    batch = _batch(rows, {"pixel_values": torch.randn(96 + 36, 1176), "image_grid_thw": grids})
    batch["mm_token_type_ids"] = (batch["input_ids"] == 900).int()
    return model, batch, 9


FAMILIES = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl}
NO_CLS = "no class token"
NO_RECEIVED = "gives no 'attention received' signal"

#: method -> (pipeline sections, {family: None (runs) or the refusal's message fragment}).
MATRIX = {
    "tome": ({"compress": [{"use": "tome", "r": 2}]}, {"qwen2_vl": NO_CLS}),
    "tome (metric: tokens)": ({"compress": [{"use": "tome", "r": 2, "metric": "tokens"}]}, {}),
    "pool": ({"compress": [{"use": "pool", "stride": 2}]}, {"qwen2_vl": "full, uncompressed"}),
    "random_keep": ({"compress": [{"use": "random_keep", "keep": 0.5}]}, {}),
    "hired": ({"compress": [{"use": "hired", "keep": 0.5}]}, {"qwen2_vl": NO_CLS}),
    "prumerge": ({"compress": [{"use": "prumerge"}]}, {"qwen2_vl": NO_CLS}),
    "prumerge_plus": ({"compress": [{"use": "prumerge_plus"}]}, {"qwen2_vl": NO_CLS}),
    "visionzip": ({"compress": [{"use": "visionzip", "dominant": 4, "contextual": 2}]}, {"qwen2_vl": NO_CLS}),
    "sparsevlm (pre-LLM)": ({"compress": [{"use": "sparsevlm", "keep": 0.5}]}, {"qwen2_vl": NO_CLS}),
    "sparsevlm (pre-LLM, w_sal: 0)": ({"compress": [{"use": "sparsevlm", "keep": 0.5, "w_sal": 0.0}]}, {}),
    "aim_merge": ({"compress": [{"use": "aim_merge", "keep": [0.5, 0.5]}]}, {}),
    "cdpruner": ({"compress": [{"use": "cdpruner", "keep": 0.5}]}, {}),
    "divprune": ({"compress": [{"use": "divprune", "keep": 0.5}]}, {}),
    "divprune (selection: view)": ({"compress": [{"use": "divprune", "keep": 0.5, "selection": "view"}]}, {}),
    "scope": ({"compress": [{"use": "scope", "keep": 0.5}]}, {"qwen2_vl": NO_CLS}),
    "vispruner": ({"compress": [{"use": "vispruner", "keep": 8}]}, {"qwen2_vl": NO_CLS}),
    "scope (score: null)": ({"compress": [{"use": "scope", "keep": 0.5, "score": None}]}, {}),
    "scope (score: attn_received)": ({"compress": [{"use": "scope", "keep": 0.5, "score": "attn_received"}]},
                                     {"llava": NO_RECEIVED, "llava_next": NO_RECEIVED}),
    "vispruner (signal: received, attention_map: null)": (
        {"compress": [{"use": "vispruner", "keep": 8, "signal": "received", "attention_map": None}]},
        {"llava": NO_RECEIVED, "llava_next": NO_RECEIVED}),
    "fastv": ({"llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}, {}),
    "sparsevlm_llm": ({"llm": [{"use": "sparsevlm_llm", "layers": [1, 2], "budget": 64, "recycle": False}]},
                      {"qwen2_vl": "multimodal rotary"}),
    "sparsevlm_llm (positions: original)": (
        {"llm": [{"use": "sparsevlm_llm", "layers": [1, 2], "budget": 64, "recycle": False,
                  "positions": "original"}]}, {}),
    "aim_prune (mask)": ({"llm": [{"use": "aim_prune", "start_layer": 1, "step": 0.25}]}, {}),
    "aim_prune (remove)": ({"llm": [{"use": "aim_prune", "start_layer": 1, "step": 0.25, "mode": "remove"}]}, {}),
    "dart": ({"llm": [{"use": "dart", "layer": 2, "keep": 0.5}]}, {}),
    "dart_pre": ({"compress": [{"use": "dart_pre", "keep": 0.5}]}, {}),
    "pyramiddrop": ({"llm": [{"use": "pyramiddrop", "layers": [1, 2], "ratio": 0.5}]}, {"qwen2_vl": "multimodal rotary"}),
    "pyramiddrop (positions: original)": (
        {"llm": [{"use": "pyramiddrop", "layers": [1, 2], "ratio": 0.5, "positions": "original"}]}, {}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, *FAMILIES[request.param]()


def check_cell(model, batch: dict, method: str, refusals: dict[str, str], alone: list[int] | None = None) -> None:
    """One cell of the matrix on one family's batch of 2: "runs" (``generate`` works, every pre-LLM stage is in
    the report with its tokens and time, the LLM sees fewer visual tokens: from layer 0 with pre-LLM stages, by the
    last layer with in-LLM ones, which leave layer 0 as the model has it) or the refusal ``refusals[method]``
    names (an ``ArrcocError`` matching it, when the ``with`` block is entered or at the first call).  ``alone``:
    the visual tokens per prompt the model alone gives its LLM, when the caller knows them."""
    sections, _ = MATRIX[method]
    spec = {"encoder": {"use": "timm_vit", "extra_attention_layers": [0]}, **sections}
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        full = arrcoc.hf.apply(model, {"encoder": {"use": "timm_vit"}})
        with full as plain:
            model(**batch)
        before = plain.report.layer_visual[0]
        assert alone is None or before == alone, (before, alone)
        if method in refusals:
            with pytest.raises(arrcoc.ArrcocError, match=refusals[method]):
                with arrcoc.hf.apply(model, spec):
                    model.generate(**batch, max_new_tokens=3, do_sample=False)
            return
        with arrcoc.hf.apply(model, spec) as run:
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, L + 3) and torch.equal(out[:, :L], batch["input_ids"])
    seen = run.report.layer_visual
    assert len(seen[0]) == 2
    # Every pre-LLM stage is in the report, with its tokens in and out per view / image and its time.
    stages = sections.get("compress", [])
    assert [r.plugin for r in run.report.pre_llm] == [s["use"] for s in stages]
    assert all(r.ms > 0 and len(r.tokens_in) == len(r.tokens_out) for r in run.report.pre_llm)
    if stages:
        assert sum(seen[0]) < sum(before), (before, seen)  # the LLM gets fewer visual tokens
    else:
        assert seen[0] == before and sum(seen[-1]) < sum(before), (before, seen)  # fewer inside the LLM


@pytest.mark.parametrize("method", list(MATRIX))
def test_support_matrix(family, method):
    name, model, batch, _ = family
    refusal = MATRIX[method][1].get(name)
    check_cell(model, batch, method, {} if refusal is None else {method: refusal})