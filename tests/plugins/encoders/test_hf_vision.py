"""hf_vision: a HF VLM's tower as the encoder, standalone (from_pretrained) and around a live model."""

import pytest

pytest.importorskip("transformers")

import torch

import arrcoc
from arrcoc.errors import ModelError


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14)
    tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    out = tmp_path_factory.mktemp("llava")
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=63)).save_pretrained(out)
    return str(out)


def _eager_tower(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def test_features_equal_the_models_own(llava_dir):
    enc = arrcoc.create("encoder", "hf_vision", model=llava_dir)
    model = _eager_tower(llava_dir)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        state = enc.encode(pixels)
        ref = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    assert state.grid == (4, 4) and state.tokens.shape == (2, 16, 48)
    torch.testing.assert_close(state.tokens, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_cls_attention_equals_eager_attention(llava_dir, layer):
    enc = arrcoc.create("encoder", "hf_vision", model=llava_dir, attention_layer=layer, project=False)
    enc.configure(frozenset({"cls_attention", "keys"}))
    model = _eager_tower(llava_dir)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        state = enc.encode(pixels)
        out = model.model.vision_tower(pixels, output_attentions=True, return_dict=True)
    ref = out.attentions[layer][:, :, 0, 1:].mean(1)  # CLS row over the patches, head-mean
    torch.testing.assert_close(state.per_token["cls_attn"], ref, atol=1e-5, rtol=1e-5)
    assert state.per_token["keys"].shape == (2, 16, 8)  # head-mean keys: head_dim 8


def test_query_encoder_embeds_in_the_llm_space(llava_dir):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "red", "ball", "where", "is", "the"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>").save_pretrained(llava_dir)
    qe = arrcoc.create("query_encoder", "hf_text", model=llava_dir)
    emb, mask = qe.encode(["where is the red ball", "red"], dim=48, device=torch.device("cpu"), dtype=torch.float32)
    model = _eager_tower(llava_dir)
    table = model.get_input_embeddings().weight
    assert mask.tolist() == [[True] * 5, [True] + [False] * 4]
    torch.testing.assert_close(emb[0], table[[4, 5, 6, 2, 3]].detach())
    with pytest.raises(arrcoc.InputError, match="project: true"):
        qe.encode(["red"], dim=32, device=torch.device("cpu"), dtype=torch.float32)


def test_not_a_vlm_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=10)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="hf_vision: cannot load|no adapter"):
        arrcoc.create("encoder", "hf_vision", model=str(tmp_path))


def test_normalisation_comes_from_a_processor_saved_by_transformers_5(tmp_path):
    # transformers 5 saves a LlavaProcessor's image settings inside processor_config.json (no
    # preprocessor_config.json); a SigLIP-style mean/std there must not be replaced by CLIP's
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from arrcoc.toyvqa.modeling import build_tokenizer

    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=28, patch_size=14)
    tc = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64, pad_token_id=0)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=4)).save_pretrained(tmp_path)
    LlavaProcessor(image_processor=CLIPImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.5]),
                   tokenizer=build_tokenizer(), patch_size=14).save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    enc = arrcoc.create("encoder", "hf_vision", model=str(tmp_path))
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    torch.testing.assert_close(enc.std.flatten(), torch.tensor([0.2, 0.25, 0.5]))


@pytest.mark.parametrize("settings", [{}, {"attention_layer": 99}])
def test_a_standalone_tower_that_needs_processor_inputs_is_refused_first(tmp_path, settings):
    """A Qwen2-VL tower needs ``image_grid_thw`` beside the pixels, which a standalone encoder cannot give: that is
    the error, whatever the tower settings say (an attention layer out of range is moot for such a tower)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903)
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"hf_vision: a standalone qwen2_vl tower needs its processor's inputs "
                                         r"\(image_grid_thw\); use it inside the model with arrcoc.hf.apply"):
        arrcoc.create("encoder", "hf_vision", model=str(tmp_path), **settings)


def test_the_plugin_imports_and_is_listed_without_transformers(tmp_path):
    """``pip install arrcoc`` without transformers (an old install, a trimmed environment): the plugin module imports
    and the registry lists it; only building it needs the model (then arrcoc.hf's own error names the extra)."""
    import subprocess
    import sys

    script = (
        "import importlib.abc, sys\n"
        "class NoTransformers(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'transformers':\n"
        "            raise ImportError('no transformers here')\n"
        "sys.meta_path.insert(0, NoTransformers())\n"
        "import arrcoc_plugins.encoders.hf_vision\n"
        "from arrcoc.errors import ModelError\n"
        "from arrcoc.registry import get_registry\n"
        "registry = get_registry()\n"
        "assert 'hf_vision' in registry.names('encoder'), registry.names('encoder')\n"
        "assert 'hf_vision' not in registry.failures, registry.failures\n"
        "try:\n"
        "    registry.create('encoder', 'hf_vision', model='arrcoc:toyvqa')\n"
        "except ModelError as exc:\n"
        "    print('refused:', exc)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'transformers']\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused: arrcoc.hf needs transformers: pip install 'arrcoc[hf]'"
