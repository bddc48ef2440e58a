"""``arrcoc.integrations.hf.vision``: the tower of a live model, the settings it takes, the ragged state.

The standalone ``hf_vision`` plugin around it is tested in tests/plugins/encoders/test_hf_vision.py; the
signals (CLS attention, keys) against eager attention there and in the family tests.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import tiny_llava  # noqa: E402
from arrcoc.errors import ModelError, ParamsError  # noqa: E402
from arrcoc.integrations.hf.vision import TowerOptions, VisionTower, ragged_state, tower_options  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def test_tower_features_and_projection_are_the_models_own(model):
    """Features of ``vision_feature_layer`` (-2) without the class token, then the model's own projector."""
    pixels = torch.randn(2, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tower = VisionTower.for_model(model)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        projected = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        state = tower.encode_inputs(pixels, {})
        after = tower.project(state)
        at_once = VisionTower.for_model(model, project=True).encode(pixels)
    assert state.grid == (8, 8) and tower.embed_dim == 32 and state.tokens.shape == (2, 64, 32)
    torch.testing.assert_close(state.tokens, hidden[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(state.cls, hidden[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(after.tokens, projected, rtol=0, atol=1e-12)
    assert after.cls.shape == (2, 64)
    torch.testing.assert_close(at_once.tokens, after.tokens, rtol=0, atol=0)
    assert VisionTower.for_model(model, project=True).embed_dim == 64


def test_tower_never_moves_the_model(model):
    tower = VisionTower.for_model(model)
    assert tower.to("meta") is tower
    assert next(model.parameters()).device.type == "cpu"


def test_tower_options_are_the_encoder_settings_that_carry_over():
    section = {"model": "arrcoc:toyvqa", "dtype": "bfloat16", "project": True, "attention_layer": 1,
               "extra_attention_layers": [0], "cls_attention_heads": "single", "in_blocks": {"use": "tome"}}
    assert tower_options(section) == {"attention_layer": 1, "extra_attention_layers": [0],
                                      "cls_attention_heads": "single"}


def test_the_plugin_offers_every_tower_setting_alike():
    """``hf_vision``'s params repeat the tower's settings (the plugin imports without transformers): same types,
    same defaults (``project`` aside: a standalone encoder projects), same descriptions."""
    from arrcoc_plugins.encoders.hf_vision import HFVisionParams

    for name, field in TowerOptions.model_fields.items():
        theirs = HFVisionParams.model_fields[name]
        assert theirs.annotation == field.annotation, name
        assert theirs.description == field.description, name
        if name != "project":
            assert theirs.get_default(call_default_factory=True) == field.get_default(call_default_factory=True)
    assert (TowerOptions().project, HFVisionParams().project) == (False, True)


def test_bad_settings_are_named(model):
    with pytest.raises(ModelError, match="hf_vision: attention layer 5 is out of range for a tower of 3 layers"):
        VisionTower.for_model(model, attention_layer=5)
    with pytest.raises(ModelError, match="attention layer -4 is out of range"):
        VisionTower.for_model(model, extra_attention_layers=[-4])
    with pytest.raises(ParamsError, match=r"(?s)encoder 'hf_vision': invalid parameters.*cls_attention_heads: Input should be 'mean' or 'single'"):
        VisionTower.for_model(model, cls_attention_heads="max")
    with pytest.raises(ParamsError, match=r"(?s)encoder 'hf_vision': invalid parameters.*model"):
        VisionTower.for_model(model, model="arrcoc:toyvqa")  # a standalone setting, not the tower's


def test_attention_layers_count_from_either_end(model):
    tower = VisionTower.for_model(model, attention_layer=-1, extra_attention_layers=[-3, 0, 2])
    assert (tower.attn_layer, tower.extra_layers) == (2, [0, 2])
    assert VisionTower.for_model(model).attn_layer == 1  # the layer producing hidden state -2 of 3 layers


def test_ragged_state_of_unequal_grids():
    """Image 0 on a 2x3 grid, image 1 on 1x2: one 2x3 grid holds both; image 1's missing patches are -1."""
    features = [torch.arange(12.0).view(6, 2), 100 + torch.arange(4.0).view(2, 2)]
    cls = torch.zeros(2, 2)
    state = ragged_state(features, [(2, 3), (1, 2)], cls, {})
    assert state.grid == (2, 3)
    assert state.mask.tolist() == [[True] * 6, [True, True] + [False] * 4]
    assert state.tokens[0].tolist() == features[0].tolist()
    assert state.tokens[1, :2].tolist() == features[1].tolist() and not state.tokens[1, 2:].any()
    assert state.positions[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert state.positions[1, :2].tolist() == [[0, 0], [0, 1]]
    assert state.origin.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, -1, -1, -1, -1]]


def test_ragged_state_of_equal_grids_is_from_patches():
    features = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    state = ragged_state(features, [(2, 2), (2, 2)], None, {})
    assert state.grid == (2, 2) and bool(state.mask.all())
    assert torch.equal(state.tokens, torch.stack(features))
    assert state.origin.tolist() == [[0, 1, 2, 3]] * 2


def test_two_threads_loading_one_model_share_it(monkeypatch, tmp_path):
    """``load_vlm`` loads once per (directory, dtype) even when two threads ask at once (e.g. two pipelines built
    in parallel, each with ``hf_vision`` and ``hf_text``): the second waits for the first's model instead of
    loading a copy of its own (twice the memory, and an encoder and query encoder on different objects)."""
    import threading

    import transformers

    from arrcoc.integrations.hf.vision import load_vlm

    loads: list[str] = []
    second: dict = {}

    def ask_again():
        second["model"] = load_vlm(str(tmp_path), "bfloat16")

    def fake_from_pretrained(path, dtype):
        loads.append(path)
        if len(loads) == 1:  # while the first load runs, a second thread asks for the same model
            other = threading.Thread(target=ask_again)
            other.start()
            other.join(timeout=2)  # a locked load_vlm keeps it waiting; an unlocked one lets it load a copy
            second["thread"] = other
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake_from_pretrained)
    first = load_vlm(str(tmp_path), "bfloat16")
    second["thread"].join()
    assert loads == [str(tmp_path)]
    assert second["model"] is first
