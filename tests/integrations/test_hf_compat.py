"""arrcoc.integrations.hf.compat: the differences between the supported transformers releases (5.18 .. 5.x).

The whole integration suite runs on the lowest supported release in CI's vLLM lane (.ci/vllm-env) and on the
newest in the main lane; these tests pin down each difference on whichever release is installed by also
emulating the other side of it.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import arrcoc  # noqa: E402
from arrcoc.errors import ModelError  # noqa: E402
from arrcoc.integrations.hf import compat  # noqa: E402
from tiny_models import llava_batch, tiny_llava  # noqa: E402

FASTV = {"encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}


def _generate(model, batch):
    with arrcoc.hf.apply(model, FASTV) as run:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    return out, run.report.kv_cache_bytes


def test_in_llm_masks_follow_the_cache_keyword_of_the_installed_create_causal_mask(monkeypatch):
    """5.24 renamed create_causal_mask's ``past_key_values`` to ``cache``: the engine's masks (built after
    pruning) must reach the builder under whichever name it declares.  The installed builder is replaced by
    one declaring the OTHER name (as the other side of 5.24 does) that delegates to the real one: the
    generation must be the same, token for token and in KV-cache bytes."""
    import transformers.masking_utils as masking

    real = masking.create_causal_mask
    real_keyword = "cache" if "cache" in inspect.signature(real).parameters else "past_key_values"
    other = "past_key_values" if real_keyword == "cache" else "cache"
    seen = []

    def emulated(config, inputs_embeds, attention_mask, position_ids=None, layer_idx=None, **kwargs):
        assert set(kwargs) == {other}, f"called with {sorted(kwargs)}, the builder declares {other!r}"
        seen.append(layer_idx)
        return real(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, layer_idx=layer_idx, **{real_keyword: kwargs[other]})

    # The signature is what compat reads: the emulated builder declares only the other keyword.
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for name in ("config", "inputs_embeds", "attention_mask", other, "position_ids", "layer_idx")]
    emulated.__signature__ = inspect.Signature(parameters)
    model = tiny_llava()
    batch = llava_batch([(3, 5), (2, 9)])
    expected, expected_bytes = _generate(model, batch)
    monkeypatch.setattr(masking, "create_causal_mask", emulated)
    got, got_bytes = _generate(model, batch)
    assert seen and set(seen) <= {2, 3}, seen  # prefill mask at layer 2 and decode masks of layers >= 2
    assert torch.equal(got, expected)
    assert got_bytes == expected_bytes


@pytest.mark.parametrize("version", ["5.18.0", "5.19.0", "5.20.0.dev0", "5.25.0", "5.99.1"])
def test_supported_releases_pass_the_version_check(version):
    compat.check_version(version)


@pytest.mark.parametrize("version", ["5.17.0", "5.16.1", "5.0.0", "4.57.6"])
def test_releases_without_mm_encoder_outputs_are_refused_naming_the_range(version):
    with pytest.raises(ModelError) as err:
        compat.check_version(version)
    message = str(err.value)
    assert f"found {version}" in message
    assert "transformers >= 5.18, < 6" in message and "mm_encoder_outputs" in message


def test_the_installed_release_is_supported():
    """The release this suite runs on passes the check (CI runs it on the lowest and the newest)."""
    compat.check_version()
    assert compat._release(transformers.__version__) >= compat.MIN_VERSION


def test_cache_lookups_read_either_keyword():
    cache = object()
    assert compat.cache_of({"cache": cache}) is cache
    assert compat.cache_of({"past_key_values": cache}) is cache
    assert compat.cache_of({"cache": None, "past_key_values": cache}) is cache
    assert compat.cache_of({}) is None

    class New:
        cache = "new"

    class Old:
        past_key_values = "old"

    assert compat.output_cache(New()) == "new" and compat.output_cache(Old()) == "old"


def test_importing_arrcoc_hf_on_an_older_release_is_a_clear_error(monkeypatch):
    """Without the check, 5.17 fails only inside generate ("model_kwargs are not used by the model:
    ['mm_encoder_outputs']"); the import names the range instead."""
    import importlib
    import sys

    # sys.modules' entry, not this module's binding: transformers may swap its lazy module object after import.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.17.0")
    for name in [m for m in sys.modules if m == "arrcoc.integrations.hf" or m.startswith("arrcoc.integrations.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModelError, match=r"transformers >= 5\.18, < 6 .* found 5\.17\.0"):
        importlib.import_module("arrcoc.integrations.hf")
