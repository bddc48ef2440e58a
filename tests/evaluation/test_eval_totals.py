"""The typed records under ``arrcoc eval``: totals added up from reports, the reference.pt cache, the budget context.

* :class:`~arrcoc.evaluation.totals.Totals` adds each call's ``Report`` exactly (sums worked out by hand);
* ``reference.pt`` written in the format of the first version (the untyped accumulator dict, as the eval before
  the typed record pickled it) still loads, with the same numbers, and round-trips;
* the budget context comes from the model's adapter without a forward, and equals what the tower's forward
  gives (grid, class token) and what the vLLM plugin derives from the config (depths).
* the modules of :mod:`arrcoc.evaluation` form layers: each imports only the ones below it.
"""

from __future__ import annotations

import ast
import io
import sys
from pathlib import Path

import pytest
import torch

from arrcoc.evaluation import store
from arrcoc.evaluation.data import EvalSample
from arrcoc.evaluation.methods import Method
from arrcoc.evaluation.totals import Reference, Scoring, Totals
from arrcoc.errors import ModelError
from arrcoc.state import StageRecord

#: arrcoc.evaluation's modules, lowest first: each may import only those before it.
LAYERS = ["data", "methods", "totals", "store", "output", "runner", "__init__"]
FINGERPRINT = {"model": "m", "model_fingerprint": "f", "data": "d", "n": 3, "samples": "s", "max_new_tokens": 4,
               "batch_size": 2}


def _evaluation_imports(source: str) -> set[str]:
    """The modules of :mod:`arrcoc.evaluation` that ``source`` (one of them) imports, however it spells the import
    (relative at any depth, absolute, ``import ...``, inside functions); ``__init__`` for the package itself."""
    found = set()

    def add(name: str, names: list[str]) -> None:
        parts = name.split(".")
        if parts[:2] != ["arrcoc", "evaluation"]:
            if name == "arrcoc" and "evaluation" in names:   # from arrcoc import evaluation
                found.add("__init__")
            return
        if len(parts) > 2:
            found.add(parts[2])
        elif not names:   # import arrcoc.evaluation
            found.add("__init__")
        else:   # from arrcoc.evaluation import x: a module of it, or a name of its __init__
            found.update(n if n in LAYERS else "__init__" for n in names)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = ["arrcoc", "evaluation"][:3 - node.level] if node.level else []   # the package of a module here
            name = ".".join(base + ([node.module] if node.module else []))
            add(name, [a.name for a in node.names])
    return found


def test_the_layer_check_sees_every_way_of_importing_a_module():
    for source in ("from .runner import evaluate", "from . import runner", "from ..evaluation.runner import x",
                   "from ..evaluation import runner", "from arrcoc.evaluation.runner import x",
                   "import arrcoc.evaluation.runner", "def f():\n    from .runner import x"):
        assert _evaluation_imports(source) == {"runner"}, source
    for source in ("from .. import evaluation", "from arrcoc.evaluation import evaluate", "import arrcoc.evaluation",
                   "from arrcoc import evaluation"):
        assert _evaluation_imports(source) == {"__init__"}, source
    assert _evaluation_imports("from ..errors import InputError\nimport torch\nfrom .data import x") == {"data"}


def test_each_evaluation_module_imports_only_the_layers_below_it():
    import arrcoc.evaluation

    folder = Path(arrcoc.evaluation.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(LAYERS)   # a new module takes its place here
    for i, name in enumerate(LAYERS):
        imported = _evaluation_imports((folder / f"{name}.py").read_text(encoding="utf-8"))
        above = imported - set(LAYERS[:i])
        assert not above, f"arrcoc/evaluation/{name}.py imports {sorted(above)}, which are not below it"


def report(layer_visual, flops, kv, prefill_ms, llm_ms, warnings=()):
    from arrcoc.integrations.hf.report import Report

    records = [StageRecord(stage="compress.0", plugin="p", tokens_in=(4,), tokens_out=(2,), ms=0.0,
                           warnings=tuple(warnings))]
    return Report(batch=len(layer_visual[0]), pre_llm=records, layer_visual=layer_visual, layer_flops=flops,
                  kv_cache_bytes=kv, prefill_ms=prefill_ms, llm_prefill_ms=llm_ms)


def two_calls() -> Totals:
    totals = Totals()
    totals.add(report([[6, 4], [3, 2]], [100, 50], 1000, 2.5, 1.5, ["few tokens"]), ["a", "b"],
               torch.log_softmax(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), -1), 7.0)
    totals.add(report([[5], [1]], [30, 20], 400, 1.0, 0.5, ["few tokens", "other"]), ["c"],
               torch.log_softmax(torch.tensor([[1.0, 1.0]]), -1), 3.0)
    return totals


def test_totals_add_each_calls_report():
    totals = two_calls()
    assert totals.predictions == ["a", "b", "c"]
    assert totals.layer_visual.tolist() == [15.0, 6.0] and totals.layer_visual.dtype == torch.float64
    assert totals.prefill_flops == 200 and totals.kv_cache_bytes == 1400
    assert (totals.prefill_ms, totals.llm_prefill_ms, totals.total_ms) == (3.5, 2.0, 10.0)
    assert totals.warnings == {"few tokens": 2, "other": 1}
    assert totals.visual_tokens_in == [6, 4, 5]
    assert totals.logprobs.shape == (3, 2)
    assert torch.equal(totals.logprobs[2], torch.log(torch.tensor([0.5, 0.5])))
    assert Totals().logprobs.shape == (0,)


def test_a_row_is_scored_from_the_totals():
    samples = [EvalSample(id=str(i), image="x.png", question="q", answer=a, qtype=t)
               for i, (a, t) in enumerate([("a", "colour"), ("B.", "colour"), ("x", "shape")])]
    reference = Reference(ids=["0", "1", "2"], totals=two_calls(), original=6, grid=(2, 3), has_cls=True, layers=2,
                          encoder_layers=1)
    scoring = Scoring(samples, ["colour", "shape"], reference)
    method = Method("m", "method", None, "moved")
    own = scoring.reference_row(method)
    assert own["accuracy"] == pytest.approx(2 / 3) and own["loyalty"] == 1.0 and own["kl"] == 0.0
    assert own["visual_tokens_layers"] == "5.00;2.00" and own["visual_tokens"] == 3.5
    assert own["visual_fraction"] == pytest.approx(3.5 / 6) and own["visual_tokens_in"] == 5.0
    assert own["prefill_gflops"] == pytest.approx(200 / 3 / 1e9) and own["kv_bytes"] == pytest.approx(1400 / 3)
    assert own["note"] == "moved; warning: few tokens (+1 more)"
    assert (own["acc_colour"], own["acc_shape"]) == (1.0, 0.0)
    other = Totals()
    other.add(report([[1, 1, 1], [1, 1, 1]], [1], 3, 3.0, 3.0), ["a", "x", "c"],
              torch.log_softmax(torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 1.0]]), -1), 3.0)
    row = scoring.row(method, 0.5, other, {"compress.0": {"keep": 1}})
    assert row["loyalty"] == pytest.approx(2 / 3) and row["params"] == '{"compress.0": {"keep": 1}}'
    p = reference.logprobs.double()
    expected = (p.exp() * (p - other.logprobs.double())).sum(-1).mean()
    assert row["kl"] == pytest.approx(float(expected), abs=1e-12) and row["kl"] > 0
    unreachable = scoring.unreachable(method, 0.05, "too few")
    assert unreachable["status"] == "unreachable" and unreachable["accuracy"] is None
    assert unreachable["acc_shape"] is None and unreachable["note"] == "too few"


def _first_version_file(path: Path, totals: Totals) -> None:
    """reference.pt as the eval wrote it before the typed totals: the accumulator dict under ``acc``."""
    acc = {"predictions": totals.predictions, "logprobs": totals.logprobs, "layers": totals.layer_visual,
           "flops": totals.prefill_flops, "kv": totals.kv_cache_bytes, "prefill_ms": totals.prefill_ms,
           "llm_prefill_ms": totals.llm_prefill_ms, "total_ms": totals.total_ms, "warnings": totals.warnings,
           "visual_in": totals.visual_tokens_in}
    reference = {"ids": ["0", "1", "2"], "predictions": totals.predictions, "logprobs": totals.logprobs,
                 "original": 6, "grid": (2, 3), "has_cls": True, "layers": 2, "encoder_layers": 1, "acc": acc}
    buffer = io.BytesIO()
    torch.save({"fingerprint": FINGERPRINT, "reference": reference}, buffer)
    path.write_bytes(buffer.getvalue())


def _same(a: Reference, b: Reference) -> None:
    assert (a.ids, a.original, a.grid, a.has_cls, a.layers, a.encoder_layers) == \
        (b.ids, b.original, b.grid, b.has_cls, b.layers, b.encoder_layers)
    ta, tb = a.totals, b.totals
    assert torch.equal(ta.logprobs, tb.logprobs) and torch.equal(ta.layer_visual, tb.layer_visual)
    for name in ("predictions", "prefill_flops", "kv_cache_bytes", "prefill_ms", "llm_prefill_ms", "total_ms",
                 "warnings", "visual_tokens_in"):
        assert getattr(ta, name) == getattr(tb, name), name


def test_reference_pt_of_the_first_version_loads_and_round_trips(tmp_path):
    expected = Reference(ids=["0", "1", "2"], totals=two_calls(), original=6, grid=(2, 3), has_cls=True, layers=2,
                         encoder_layers=1)
    _first_version_file(tmp_path / "reference.pt", expected.totals)
    _same(store.load_reference(tmp_path, FINGERPRINT), expected)
    written = tmp_path / "again"
    written.mkdir()
    store.save_reference(written, FINGERPRINT, expected)
    _same(store.load_reference(written, FINGERPRINT), expected)
    # the file the typed record writes is the first version's, key for key
    old, new = (torch.load(p / "reference.pt", weights_only=True) for p in (tmp_path, written))
    assert old.keys() == new.keys() and old["reference"].keys() == new["reference"].keys()
    assert old["reference"]["acc"].keys() == new["reference"]["acc"].keys()
    # other settings: not this run's reference (computed again), silently as before
    assert store.load_reference(written, {**FINGERPRINT, "n": 4}) is None


def test_reference_pt_of_an_unknown_layout_is_said_and_computed_again(tmp_path):
    totals = two_calls()
    _first_version_file(tmp_path / "reference.pt", totals)
    saved = torch.load(tmp_path / "reference.pt", weights_only=True)
    saved["reference"]["acc"]["tokens"] = 3          # a later version's field this one does not know
    torch.save(saved, tmp_path / "reference.pt")
    said: list[str] = []
    assert store.load_reference(tmp_path, FINGERPRINT, said.append) is None
    assert said == [f"{tmp_path / 'reference.pt'}: cannot be read (ValueError: unknown totals fields tokens); the "
                    "uncompressed run is computed again"]


# ------------------------------------------------------------ budget context
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))  # tiny_models: the tiny VLMs


def test_the_toy_models_budget_context_is_its_towers_without_a_forward(toy):
    pytest.importorskip("transformers")
    from arrcoc.integrations.hf import adapter_for

    model, processor = toy
    adapter = adapter_for(model)
    pixels = torch.zeros(2, 3, *[processor.image_processor.crop_size[k] for k in ("height", "width")])
    calls = []
    handle = adapter.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        contexts = adapter.budget_context(pixels, {})
    finally:
        handle.remove()
    assert calls == []   # nothing ran
    out = adapter.encode_images(pixels[:1], {}, keep_hidden=False)   # what the eval's second forward read
    cfg = model.config
    assert contexts == [{"original": out.features[0].shape[0], "grid": tuple(out.grids[0]),
                         "layers": cfg.text_config.num_hidden_layers, "has_cls": out.cls is not None,
                         # the block producing LLaVA's feature layer, counted (arrcoc.vllm's llava context)
                         "encoder_layers": cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1)}] * 2


@pytest.mark.parametrize("factory", ["tiny_qwen2_vl", "tiny_qwen2_5_vl"])
def test_qwen2_vl_budget_context_is_each_images_merged_grid(factory):
    pytest.importorskip("transformers")
    import tiny_models

    from arrcoc.integrations.hf import adapter_for

    model = getattr(tiny_models, factory)()
    adapter = adapter_for(model)
    grids = torch.tensor([[1, 8, 12], [1, 6, 6]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 1176, dtype=torch.float64)
    contexts = adapter.budget_context(pixels, {"image_grid_thw": grids})
    out = adapter.encode_images(pixels, {"image_grid_thw": grids}, keep_hidden=False)
    blocks, layers = len(model.model.visual.blocks), len(model.model.language_model.layers)
    assert contexts == [{"original": f.shape[0], "grid": tuple(g), "layers": layers, "has_cls": False,
                         "encoder_layers": blocks} for f, g in zip(out.features, out.grids)]
    assert [c["grid"] for c in contexts] == [(4, 6), (3, 3)]


def test_llava_next_has_no_budget_context_and_says_why():
    pytest.importorskip("transformers")
    from tiny_models import tiny_llava_next

    from arrcoc.integrations.hf import adapter_for

    adapter = adapter_for(tiny_llava_next())
    with pytest.raises(ModelError, match=r"^llava_next: an image is a base view plus rows x cols crops"):
        adapter.budget_context(torch.zeros(1, 5, 3, 56, 56), {"image_sizes": torch.tensor([[56, 112]])})


@pytest.mark.parametrize("tower, strategy", [("clip", "default"), ("clip", "full"), ("siglip", "full")])
def test_llava_budget_context_is_what_the_towers_forward_gives(tower, strategy):
    """Every select strategy on towers with and without a class token: the placeholders per image (the class token
    counted when ``full`` keeps it), the grid and the class token are what ``encode_images`` returns."""
    pytest.importorskip("transformers")
    from tiny_models import tiny_llava

    from arrcoc.integrations.hf import adapter_for

    model = tiny_llava(tower=tower, strategy=strategy)
    adapter = adapter_for(model)
    pixels = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    out = adapter.encode_images(pixels[:1], {}, keep_hidden=False)
    original = 64 + (tower == "clip" and strategy == "full")
    assert adapter.tokens_per_image(pixels, {}) == [original] * 2
    assert adapter.budget_context(pixels, {}) == [
        {"original": original, "grid": tuple(out.grids[0]), "layers": 4, "has_cls": out.cls is not None,
         "encoder_layers": 2}] * 2
    assert out.grids[0] == (8, 8) and (out.cls is not None) == (tower == "clip")


def test_llava_budget_context_of_a_tower_that_loses_its_first_patch_is_refused_as_its_forward_is():
    """``default`` on a SigLIP tower (no class token): the model drops the first image patch, so 63 placeholders
    cover no patch grid.  The eval's second forward refused it with encode_images's error; the budget context
    says the same rather than plan budgets for an 8 x 8 grid of 63 tokens."""
    pytest.importorskip("transformers")
    from tiny_models import tiny_llava

    from arrcoc.integrations.hf import adapter_for

    adapter = adapter_for(tiny_llava(tower="siglip"))
    pixels = torch.randn(1, 3, 112, 112, dtype=torch.float64)
    with pytest.raises(ModelError) as forward:
        adapter.encode_images(pixels, {}, keep_hidden=False)
    assert str(forward.value).startswith("llava: vision_feature_select_strategy 'default' drops the first row")
    with pytest.raises(ModelError) as context:
        adapter.budget_context(pixels, {})
    assert str(context.value) == str(forward.value)


def test_a_family_that_does_not_answer_the_budget_context_gets_its_towers_forward():
    """The adapter contract (docs/hf.md, adding a model family) has no ``budget_context``: a family that does not
    implement it gets, as ``arrcoc eval`` gave every family before, the grid and class token of one forward of
    its tower, its placeholders and depths (here the base class's answer on LLaVA-1.5 equals LLaVA's own)."""
    pytest.importorskip("transformers")
    from tiny_models import tiny_llava

    from arrcoc.integrations.hf import adapter_for
    from arrcoc.integrations.hf.adapter import Adapter

    for strategy in ("default", "full"):
        adapter = adapter_for(tiny_llava(strategy=strategy))
        pixels = torch.randn(2, 3, 112, 112, dtype=torch.float64)
        assert Adapter.budget_context(adapter, pixels, {}) == adapter.budget_context(pixels, {})
    with pytest.raises(ModelError) as forward:   # what the tower's forward refuses is refused, with its error
        adapter_for(tiny_llava(tower="siglip")).encode_images(pixels, {}, keep_hidden=False)
    with pytest.raises(ModelError) as context:
        Adapter.budget_context(adapter_for(tiny_llava(tower="siglip")), pixels, {})
    assert str(context.value) == str(forward.value)


# --------------------------------------------------- arrcoc eval end to end
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "what", "colour", "?"] + \
    [f"w{i}" for i in range(8)]


def _tiny_model_dir(folder: Path, family: str) -> str:
    """A tiny LLaVA (SigLIP tower, ``default`` strategy) or LLaVA-NeXT saved with its processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast,
                              SiglipVisionConfig)

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    size = {"shortest_edge": 56}, {"height": 56, "width": 56}
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(WORDS), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                 patch_size=14)
    torch.manual_seed(0)
    if family == "llava_siglip_default":
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(size=size[0], crop_size=size[1]), tokenizer=fast,
                                   patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=0)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=SiglipVisionConfig(**tower), text_config=text,
                                                          image_token_id=4, vision_feature_select_strategy="default"))
    else:
        pinpoints = [[56, 112], [112, 56], [112, 112]]
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(size=size[0], crop_size=size[1], image_grid_pinpoints=pinpoints),
            tokenizer=fast, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
            num_additional_image_tokens=1)
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=CLIPVisionConfig(**tower), text_config=text, image_token_id=4,
            image_grid_pinpoints=pinpoints))
    out = folder / family
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.mark.filterwarnings("ignore::arrcoc.errors.ArrcocWarning")
@pytest.mark.parametrize("family, message", [
    # the tower's own refusal, which the eval's second forward raised before the budget context came from the adapter
    ("llava_siglip_default", r"^llava: vision_feature_select_strategy 'default' drops the first row of the tower's "
                             r"output, and SiglipVisionModel has no class token"),
    # LLaVA-NeXT: the eval failed here before too (its second forward said MissingImageInputError: 'pixel_values come
    # with image_sizes', as it handed the tower no image_sizes); now the reason is said
    ("llava_next", r"^llava_next: an image is a base view plus rows x cols crops"),
])
def test_eval_of_a_model_with_no_budget_context_fails_after_the_reference_run_and_writes_no_row(
        tmp_path, family, message):
    pytest.importorskip("transformers")
    import numpy as np

    from arrcoc.evaluation import evaluate

    model = _tiny_model_dir(tmp_path, family)
    rng = np.random.default_rng(0)
    samples = [EvalSample(id=str(i), image=rng.integers(0, 255, (56, 112, 3), dtype=np.uint8),
                          question="what colour ?", answer=f"w{i}") for i in range(2)]
    with pytest.raises(ModelError, match=message):
        evaluate(["fastv"], budgets=(0.5,), model=model, data=samples, out=tmp_path / "out", batch_size=2,
                 progress=False, plots=False, device="cpu")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.json"]
