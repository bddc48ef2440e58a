"""The ToyVQA model: a small LLaVA-1.5-shaped ``LlavaForConditionalGeneration``.

- vision tower: CLIP ViT with a class token, 128 px images, 8 px patches:
  256 patch tokens + CLS; LLaVA reads the hidden states of layer -2 and drops
  CLS (``vision_feature_select_strategy="default"``), so the last block's
  output is never read (as in LLaVA-1.5);
- projector: LLaVA's 2-layer MLP (linear, GELU, linear);
- language model: a small Llama;
- tokenizer: word level over the ToyVQA vocabulary (lowercased, split on
  whitespace and punctuation) plus ``<pad> <s> </s> <unk> <image>``; pads on
  the left, prepends ``<s>``;
- processor: ``LlavaProcessor`` with a ``CLIPImageProcessor`` at 128 px
  (CLIP's mean and std; a 128 x 128 image passes resize and crop unchanged),
  expanding each ``<image>`` into 256 placeholders.

Prompts follow LLaVA-1.5: ``"USER: <image>\\n{question} ASSISTANT:"``; the
answer is the next token, then ``</s>``.

Everything here imports ``transformers`` lazily: ``import arrcoc.toyvqa``
works without the ``hf`` extra, and :func:`load` says how to install it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..errors import InputError, ModelError
from ..images import CLIP_MEAN, CLIP_STD
from .questions import question_words
from .scenes import GRID, IMAGE_SIZE, PATCH

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

PROMPT = "USER: <image>\n{question} ASSISTANT:"
NEXT_TURN = "USER: {question} ASSISTANT:"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))
PROMPT_WORDS: tuple[str, ...] = ("user", ":", "assistant")
IMAGE_TOKENS = GRID * GRID           # placeholders per image: patch tokens, CLS dropped
MAX_LENGTH = 512

# The prompt of LLaVA-1.5 (llava-hf's chat template, reduced to what ToyVQA asks: one image, text turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> tuple[str, ...]:
    """The tokenizer's vocabulary in id order: special tokens, prompt words, ToyVQA words."""
    return tuple(dict.fromkeys(SPECIAL_TOKENS + PROMPT_WORDS + question_words()))


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt for one question about one image."""
    return PROMPT.format(question=question)


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths; the defaults are the shipped model's."""

    vision_width: int = 128
    vision_layers: int = 5          # layer -2 is read: 4 blocks feed the projector
    vision_heads: int = 4
    vision_mlp: int = 512
    text_width: int = 192
    text_layers: int = 3
    text_heads: int = 6
    text_kv_heads: int = 2
    text_mlp: int = 512

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


TINY = ModelSize(vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                 text_width=32, text_layers=1, text_heads=2, text_kv_heads=1, text_mlp=64)


def require_transformers() -> Any:
    """The ``transformers`` module, or a ModelError that says how to get it."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(
            "the ToyVQA model needs Hugging Face transformers (>= 5), which is not installed "
            f"({exc}); install the 'hf' extra: pip install 'arrcoc[hf]'"
        ) from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ModelError(f"the ToyVQA model needs transformers >= 5, found {transformers.__version__}")
    return transformers


# ------------------------------------------------------------------ building
def build_tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`, built offline."""
    transformers = require_transformers()
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    # \w+ and runs of punctuation: "ASSISTANT:" -> "assistant", ":"; "triangle?" -> "triangle", "?"
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=MAX_LENGTH, extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(tokenizer=None):
    """``LlavaProcessor``: CLIP image processor at 128 px and the word-level tokenizer."""
    transformers = require_transformers()
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,   # the CLS token, which "default" then drops: 256 placeholders
        chat_template=CHAT_TEMPLATE,
    )


def build_config(size: ModelSize = ModelSize()):
    """The ``LlavaConfig`` of a fresh model of ``size``."""
    transformers = require_transformers()
    vision = transformers.CLIPVisionConfig(
        hidden_size=size.vision_width, intermediate_size=size.vision_mlp, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3,
    )
    text = transformers.LlamaConfig(
        hidden_size=size.text_width, intermediate_size=size.text_mlp, num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads, num_key_value_heads=size.text_kv_heads,
        vocab_size=len(vocabulary()), max_position_embeddings=MAX_LENGTH,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def build_model(size: ModelSize = ModelSize(), seed: int = 0) -> "LlavaForConditionalGeneration":
    """A freshly initialised model (seeded), with greedy one-word generation defaults."""
    transformers = require_transformers()
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(build_config(size))
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    generation.do_sample, generation.max_new_tokens = False, 2
    return model


# --------------------------------------------------------------------- inputs
def pixel_values(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """``[B, 3, 128, 128]`` model input from uint8 ``[B, 128, 128, 3]`` images.

    The same numbers as the processor's (rescale, CLIP mean and std; resize and
    crop leave 128 x 128 images alone), without PIL: what training uses.
    """
    if not isinstance(images, np.ndarray):
        images = [np.asarray(image) for image in images]
        shapes = {image.shape for image in images}
        if len(shapes) > 1:   # np.stack would say only "all input arrays must have the same shape"
            raise InputError(f"images: expected uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got images of shapes "
                             f"{[list(image.shape) for image in images]}")
        array = np.stack(images)
    else:
        array = images
    if array.ndim != 4 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or array.dtype != np.uint8:
        raise InputError(f"images: expected uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], "
                         f"got {array.dtype} {list(array.shape)}")
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# -------------------------------------------------------------------- shipped
def model_path() -> Path:
    """Directory of the shipped model (config, fp16 safetensors, tokenizer, processor): ``arrcoc:toyvqa``."""
    from ..models import shipped_model_dir

    return shipped_model_dir("toyvqa")


def load(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> tuple["LlavaForConditionalGeneration", "LlavaProcessor"]:
    """``(model, processor)`` from ``path`` (default: the shipped model; ``arrcoc:toyvqa`` names it too) by
    the ordinary ``from_pretrained``.

    The weights ship in fp16; ``dtype`` (default float32, the fast one on CPUs)
    is what they are cast to.  The model is in eval mode.
    """
    from ..models import resolve_model

    transformers = require_transformers()
    path = Path(resolve_model(path)) if path is not None else model_path()
    if not (path / "config.json").is_file():
        raise ModelError(f"ToyVQA model directory: expected {path / 'config.json'}, found none")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    return model, processor
