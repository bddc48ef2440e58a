"""`arrcoc generate MODEL_DIR`: a tiny LLaVA saved with its processor, loaded through from_pretrained."""

import json

import pytest

pytest.importorskip("transformers")

import torch
from click.testing import CliRunner

from arrcoc.cli import main

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "what", "colour", "is", "the", "ball",
         "?", "\n"] + [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    out = tmp_path_factory.mktemp("tiny_llava")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=fast, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=56, patch_size=14)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=len(WORDS), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=4)).save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def test_generate_prints_answer_and_report(model_dir, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    result = CliRunner().invoke(main, ["generate", model_dir, "--pipeline", "fastv", "--image", str(image),
                                       "--image", str(image), "--prompt", "what colour is the ball ?",
                                       "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{\"answers\"")))
    assert len(data["answers"]) == 2
    report = data["report"]
    # 4x4 = 16 image tokens; FastV (layer 2, keep 0.5) leaves 8 from layer 2 on.
    assert report["layer_visual"] == [[16, 16], [16, 16], [8, 8]]
    assert report["new_tokens"] == 3 and report["kv_cache_bytes"] > 0


def test_generate_unsupported_model_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=10)).save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_text("{}")  # a tokenizer file: the family is what is refused
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "llama"), "--pipeline", "fastv",
                                       "--image", str(image), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "cannot load" in result.output or "no adapter" in result.output


def _image(tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    return str(image)


def test_two_image_placeholders_for_one_image_are_a_usage_error(model_dir, tmp_path):
    """Was the processor's raw ValueError traceback, after the model had loaded."""
    result = CliRunner().invoke(main, ["generate", model_dir, "--pipeline", "fastv", "--image", _image(tmp_path),
                                       "--prompt", "USER: <image> <image>\nwhat colour is the ball ? ASSISTANT:"])
    assert result.exit_code == 2, result.output
    assert "--prompt 1: holds 2 '<image>' placeholders, but each prompt goes with one --image" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("missing", ["/no/such/dir/llava", "./no_such_llava", "~/no_such_llava_dir", "a/b/c",
                                     "~no_such_user_x/llava"])   # (that one was a raw RuntimeError from expanduser)
def test_a_model_directory_that_does_not_exist_says_so(missing, tmp_path):
    """Was transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    for command in (["generate", missing, "--pipeline", "fastv", "--image", _image(tmp_path), "--prompt", "hi"],
                    ["eval", "random_keep", "--model", missing, "--n", "1", "--budgets", "0.5",
                     "--out", str(tmp_path / "out"), "--no-baselines"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert f"model directory '{missing}' does not exist; pass a local Hugging Face checkpoint directory, a hub " \
               "id ('org/name'), or arrcoc:toyvqa (the ToyVQA LLaVA that ships inside arrcoc" in result.output
        assert "Repo id" not in result.output


def test_a_model_directory_without_tokenizer_files_names_them(model_dir, tmp_path):
    """Was transformers' guess that sentencepiece or tiktoken is not installed."""
    import shutil

    copy = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, copy)
    (copy / "tokenizer.json").unlink()
    result = CliRunner().invoke(main, ["generate", str(copy), "--pipeline", "fastv", "--image", _image(tmp_path),
                                       "--prompt", "hi"])
    assert result.exit_code == 2, result.output
    assert (f"model directory '{copy}' holds no tokenizer file (tokenizer.json, tokenizer.model, spiece.model, "
            "vocab.json, vocab.txt or *.tiktoken) (it holds: ") in result.output
    assert "sentencepiece" not in result.output and "tiktoken library" not in result.output
    (copy / "config.json").unlink()
    result = CliRunner().invoke(main, ["generate", str(copy), "--pipeline", "fastv", "--image", _image(tmp_path),
                                       "--prompt", "hi"])
    assert result.exit_code == 2 and "holds no config.json and no tokenizer file" in result.output, result.output


def test_hf_load_names_the_missing_tokenizer_files(model_dir, tmp_path):
    """arrcoc.hf.load, the Python twin of the CLI: was transformers' guess that sentencepiece is missing."""
    import shutil

    import arrcoc
    from arrcoc.errors import ModelError

    copy = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"holds no tokenizer file \(tokenizer\.json, "):
        arrcoc.hf.load(str(copy))


def test_a_processor_refusing_the_inputs_is_one_error_line(model_dir, tmp_path, monkeypatch):
    """Whatever else a model's processor refuses (its own ValueError) is an InputError, not a traceback."""
    from arrcoc.integrations import hf

    real_load = hf.load

    class Refusing:
        def __init__(self, processor):
            self.processor = processor

        def __call__(self, **kwargs):
            raise ValueError("Image features and image tokens do not match: tokens: 3, features 16")

        def __getattr__(self, name):
            return getattr(self.processor, name)

    monkeypatch.setattr(hf, "load", lambda *a, **k: (lambda m, p: (m, Refusing(p)))(*real_load(*a, **k)))
    result = CliRunner().invoke(main, ["generate", model_dir, "--pipeline", "fastv", "--image", _image(tmp_path),
                                       "--prompt", "hi"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"the processor of {model_dir} refused the prompts" in text
    assert "with 1 images: Image features and image tokens do not match" in text
