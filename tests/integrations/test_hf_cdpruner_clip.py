"""CDPruner's official CLIP-text relevance (``clip:``) inside tiny VLMs (tiny_models) and in a standalone pipeline.

Inside LLaVA-1.5 the stage reads the tower's layer -2 patch features before the projector
(``per_token["tower_features"]``) and the prompt's text after the image decoded with the tokenizer given to
``arrcoc.hf.apply``; the DPP similarity stays on the projected features.  The expectation is the official
``encode_images`` written below for one image on the model's own features, with the CLIP embeddings computed
as the official ``forward`` does (plain transformers), fed back through a hand-built prompt.  A tiny random
CLIP model and a word-level tokenizer for the tiny LLaVA's ids are built here and saved to temporary
folders: no download.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc.errors import InputError, MissingInputError  # noqa: E402
from tiny_models import BOS, IMAGE, N0, left_pad, tiny_llava, tiny_llava_next, tiny_qwen2_vl  # noqa: E402


SUFFIX = "\nAnswer the question using a single word or phrase."
NEW = 6
#: The tiny LLaVA's text ids after the image, as words (a word-level tokenizer decodes them).
WORDS = {30: "what", 31: "colour", 32: "is", 33: "the", 34: "cat", 35: "how", 36: "many", 37: "dogs", 38: "?",
         39: "sit", 40: "on", 41: "a", 42: "red", 43: "mat", 60: SUFFIX}
QUESTIONS = [[30, 31, 32, 33, 34, 38, 60], [35, 36, 37, 39, 40, 41, 42, 43, 38], [34, 38, 60]]


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP ``bytes_to_unicode``: one printable character per byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_tiny_clip(folder, vision_width: int = 32) -> str:
    """A random CLIPModel (text tower of width 24, 77 positions; vision width ``vision_width``: tiny_llava's tower
    is 32 wide) with a byte-level CLIP tokenizer, saved to ``folder`` (as test_cdpruner_clip.py)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizerFast(vocab=vocab, merges=[]).save_pretrained(folder)
    text = dict(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, projection_dim=16)
    vision = dict(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=28, patch_size=14, projection_dim=16)
    torch.manual_seed(1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():  # not the identity, nor the tiny LLaVA tower's own (default) layer norm
        model.vision_model.post_layernorm.weight.normal_(1.0, 0.5)
        model.vision_model.post_layernorm.bias.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return str(folder)


def word_tokenizer(folder):
    """A real transformers tokenizer over the tiny LLaVA's vocabulary (200 ids): WORDS, the rest ``t<id>``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {WORDS.get(i, f"t{i}"): i for i in range(200)}
    vocab["<s>"], vocab["<pad>"] = 1, 0
    del vocab["t0"], vocab["t1"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                        bos_token="<s>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("words"))


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def batch(pre=(3, 2, 6), seed=1) -> dict:
    ids, mask = left_pad([[BOS, *range(5, 5 + p), *[IMAGE] * N0, *q] for p, q in zip(pre, QUESTIONS)])
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def spec(**params) -> dict:
    return {"encoder": {"use": "timm_vit"}, "compress": [{"use": "cdpruner", **params}]}


@torch.no_grad()
def run_model(model, inputs):
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, out.logits[0]


@torch.no_grad()
def official_picks(x, features, question, clip_dir, T):
    """Official ``forward`` (clip_encoder.py l.61-98; the CLIP parts as ``load_text_tower`` loads them) and
    ``encode_images`` (llava_arch.py l.141-184) for one image: x [N, D] projected features, features [N, C] the
    tower's layer -2 patch features, question the text after the image."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir)
    text_tokenizer = CLIPTokenizerFast.from_pretrained(clip_dir)
    text_tower = CLIPTextModelWithProjection.from_pretrained(clip_dir)
    question = question.replace("\nAnswer the question using a single word or phrase.", "")
    text_inputs = text_tokenizer(text=question, return_tensors="pt")
    text_segment = (text_inputs.input_ids.shape[1] - 1) // 77 + 1
    text_padding = 77 * text_segment - text_inputs.input_ids.shape[1]
    text_inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, 77)
                   for k, v in text_inputs.items()}
    text_embeds = text_tower(**text_inputs).text_embeds
    image_embeds = vision.visual_projection(vision.vision_model.post_layernorm(features.float()).float())
    N = x.shape[0]
    xn = (x / x.norm(dim=-1, keepdim=True)).float()
    similarity = xn @ xn.t()
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(image_embeds @ text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    cis = torch.zeros(T, N)
    di2s = torch.diagonal(kernel).clone()
    picks = []
    for i in range(T):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis.square()
        di2s[j] = -float("inf")
    return sorted(picks)


def test_keep_everything_is_the_unmodified_model(model, clip_dir, tokenizer):
    inputs = batch()
    ref_tokens, ref_logits = run_model(model, inputs)
    with arrcoc.hf.apply(model, spec(keep=1.0, clip=clip_dir), tokenizer=tokenizer) as run:
        tokens, logits = run_model(model, inputs)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens) and run.state.counts.tolist() == [N0] * 3


def test_selection_equals_the_official_clip_variant_on_a_hand_built_prompt(model, clip_dir, tokenizer):
    k = 12
    inputs = batch()
    with arrcoc.hf.apply(model, spec(keep=k, clip=clip_dir), tokenizer=tokenizer) as run:
        tokens, logits = run_model(model, inputs)
        state = run.state
    assert state.counts.tolist() == [k] * 3
    # the question reached the stage as text: decoded, answer suffix and all (the stage removes it)
    assert state.meta["query_text"][0] == "what colour is the cat ? " + SUFFIX
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    features = hidden[-2][:, 1:]  # LLaVA-1.5: layer -2, the patches without the class token (official feature_select)
    kept, rows = [], []
    for b in range(3):
        question = tokenizer.decode(QUESTIONS[b])
        picks = official_picks(full[b], features[b], question, clip_dir, k)
        assert torch.equal(state.tokens[b, :k], full[b][picks])  # the same tokens, in original order
        kept.append(full[b][picks])
        rows.append([BOS, *range(5, 5 + (3, 2, 6)[b]), *[IMAGE] * k, *QUESTIONS[b]])
    assert len({tuple(state.positions[b, :k].flatten().tolist()) for b in range(3)}) == 3
    ids_k, mask_k = left_pad(rows)
    fed = {"input_ids": ids_k, "attention_mask": mask_k,
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=kept)}}
    ref_tokens, ref_logits = run_model(model, fed)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(tokens[:, L:], ref_tokens[:, ids_k.shape[1]:])


def test_the_text_differs_from_the_token_relevance(model, clip_dir, tokenizer):
    inputs = batch()
    with arrcoc.hf.apply(model, spec(keep=8, clip=clip_dir), tokenizer=tokenizer) as run:
        run_model(model, inputs)
        clip_positions = run.state.positions
    with arrcoc.hf.apply(model, spec(keep=8)) as run:
        run_model(model, inputs)
        token_positions = run.state.positions
    assert not torch.equal(clip_positions, token_positions)


def test_without_a_tokenizer_or_ids_the_text_is_missing(model, clip_dir, tokenizer):
    inputs = batch()
    with arrcoc.hf.apply(model, spec(keep=8, clip=clip_dir)):
        with pytest.raises(MissingInputError, match="needs the query as text"):
            run_model(model, inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    given = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"],
             "pixel_values": inputs["pixel_values"]}
    with arrcoc.hf.apply(model, spec(keep=8, clip=clip_dir), tokenizer=tokenizer):
        with pytest.raises(MissingInputError, match="needs the query as text"):
            with torch.no_grad():
                model(**given)


def test_llava_next_views_share_the_question(clip_dir, tokenizer):
    model = tiny_llava_next(torch.float32)
    sizes = torch.tensor([[50, 100], [90, 40]])
    per = arrcoc.hf.adapter_for(model).tokens_per_image(None, {"image_sizes": sizes})
    rows = [[1, 5, 6, 7, *[IMAGE] * n, *q] for n, q in zip(per, QUESTIONS)]
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, "image_sizes": sizes,
              "pixel_values": torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(3))}
    with arrcoc.hf.apply(model, spec(keep=4, clip=clip_dir), tokenizer=tokenizer) as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.state.counts.tolist() == [4] * 6
    texts = run.state.meta["query_text"]
    assert len(texts) == 6 and len(set(texts[:3])) == 1 and len(set(texts[3:])) == 1 and texts[0] != texts[3]
    assert out.shape == (2, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)


def test_qwen2_vl_is_refused_by_width(clip_dir, tokenizer):
    # Qwen2-VL's tower merges and projects in one module: its features are the LLM's width, not CLIP's.
    model = tiny_qwen2_vl(torch.float32)
    grids = torch.tensor([[1, 8, 12], [1, 6, 6]])
    rows = [[1, 5, 6, 902, *[900] * n, 903, *range(30, 30 + post)] for n, post in zip((24, 9), (5, 9))]
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, "image_grid_thw": grids,
              "pixel_values": torch.randn(96 + 36, 1176, generator=torch.Generator().manual_seed(4)),
              "mm_token_type_ids": (ids == 900).int()}
    with arrcoc.hf.apply(model, spec(keep=0.5, clip=clip_dir), tokenizer=tokenizer):
        with pytest.raises(InputError, match="the tower's features are 64 wide, but the post_layernorm of .* takes 32"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)


TINY = {"use": "timm_vit", "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 64}}


def test_standalone_pipeline_reads_the_query_strings(tmp_path):
    from arrcoc_plugins.compressors.cdpruner import CDPruner

    clip = save_tiny_clip(tmp_path / "clip192", vision_width=192)  # vit_tiny's width
    pipe = arrcoc.load_pipeline({"name": "cd", "encoder": TINY, "compress": [{"use": "cdpruner", "keep": 5,
                                                                              "clip": clip}]}, device="cpu")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MissingInputError, match="needs the query as text"):
        pipe(images)
    state = pipe(images, query=["a red cat on a mat" + SUFFIX, "two dogs"]).check()
    assert state.counts.tolist() == [5, 5] and state.meta["query_text"] == ("a red cat on a mat" + SUFFIX, "two dogs")
    # the stage saw the encoder's own tokens as tower features (no projector standalone)
    encoded = pipe.encoder.encode(pipe.encoder.preprocess(images))
    assert torch.equal(encoded.per_token["tower_features"], encoded.tokens)
    direct = CDPruner(keep=5, clip=clip)(encoded.with_meta(query_text=("a red cat on a mat", "two dogs")))
    assert torch.equal(direct.positions, state.positions)
    json.dumps(state.meta["query_text"])  # plain strings
