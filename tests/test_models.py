"""``arrcoc:<name>``: models shipped in the package, usable wherever a model directory is."""

from __future__ import annotations

import re

import pytest

import arrcoc
from arrcoc.errors import ModelError
from arrcoc.models import resolve_model, shipped_model_dir


def test_a_shipped_name_resolves_to_its_package_directory_and_anything_else_is_unchanged(tmp_path, monkeypatch):
    path = shipped_model_dir("toyvqa")
    assert (path / "config.json").is_file() and path.name == "model" and path.parent.name == "toyvqa"
    assert resolve_model("arrcoc:toyvqa") == str(path)
    assert resolve_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arrcoc:toyvqa").mkdir()
    assert resolve_model("./arrcoc:toyvqa") == "./arrcoc:toyvqa"   # a path that happens to contain the prefix


@pytest.mark.parametrize("missing", ["./arrcoc:toyvqa", "/no/such/llava", "../llava", "~/no_such_llava_x", "a/b/c",
                                     "models\\llava"])
def test_a_local_path_that_does_not_exist_is_a_model_error_saying_so(missing, tmp_path, monkeypatch):
    """Was transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=rf"^model directory {re.escape(repr(missing))} does not exist; pass a local "
                                         r"Hugging Face checkpoint directory, a hub id \('org/name'\), or "
                                         r"arrcoc:toyvqa \(the ToyVQA LLaVA that ships inside arrcoc, no download\)$"):
        resolve_model(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match=r"^model 'file' is a file, not a model directory; pass a local"):
        resolve_model("file")


def test_an_unknown_shipped_name_lists_what_ships():
    with pytest.raises(ModelError, match=r"arrcoc:llava: no such shipped model; shipped: arrcoc:toyvqa"):
        resolve_model("arrcoc:llava")


def test_encoder_query_encoder_and_hf_load_accept_the_shipped_name():
    pytest.importorskip("transformers")
    import torch

    import arrcoc.toyvqa as toyvqa

    encoder = arrcoc.create("encoder", "hf_vision", model="arrcoc:toyvqa")
    query_encoder = arrcoc.create("query_encoder", "hf_text", model="arrcoc:toyvqa")
    pixels = torch.from_numpy(toyvqa.sample("test", 0).image).permute(2, 0, 1)[None].float() / 255
    state = encoder.encode(pixels)
    assert state.tokens.shape == (1, 256, 192) and state.cls is not None
    query, mask = query_encoder.encode(["what colour is the star ?"], dim=192, device=torch.device("cpu"),
                                       dtype=torch.float32)
    assert query.shape == (1, 6, 192) and mask.tolist() == [[True] * 6]
    model, processor = arrcoc.hf.load("arrcoc:toyvqa")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.tokenizer.padding_side == "left"


def test_the_shipped_name_and_its_directory_share_one_loaded_model():
    # hf_vision's docstring: encoder and query encoder share the model, whichever way each names it
    pytest.importorskip("transformers")
    from arrcoc.integrations.hf.vision import load_vlm

    assert load_vlm("arrcoc:toyvqa", "float32") is load_vlm(str(shipped_model_dir("toyvqa")), "float32")
