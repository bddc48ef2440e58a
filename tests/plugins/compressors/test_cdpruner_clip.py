"""CDPruner's official CLIP-text relevance (``clip:``): equal to the official code on a tiny random CLIP model.

The reference below is written from Theia-4869/CDPruner @ 9541616 with plain transformers: ``load_text_tower``
(``clip_encoder.py`` l.39-48: CLIPTokenizerFast, CLIPTextModelWithProjection, the visual projection of
CLIPVisionModelWithProjection, float32), ``forward`` (l.61-98: 77-token rows, ``post_layernorm`` then
``visual_projection``), the loader's suffix removal (``model_vqa_loader.py`` l.110) and ``encode_images``
(``llava_arch.py`` l.141-184) for one image.  The CLIP model is built from configs and saved to a temporary
directory: no download.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import arrcoc  # noqa: E402
from arrcoc import ops  # noqa: E402
from arrcoc.errors import InputError, MissingInputError, ModelError  # noqa: E402
from arrcoc.state import TokenState  # noqa: E402
from arrcoc_plugins.compressors.cdpruner import (  # noqa: E402
    ANSWER_SUFFIX, CDPruner, clip_text_embeds, clip_text_rows, load_clip,
)

SUFFIX = "\nAnswer the question using a single word or phrase."
VISION, PROJECTION = 32, 16  # the tiny CLIP's vision width (tiny_llava's tower) and joint space


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


def save_tiny_clip(folder, *, text_projection: int = PROJECTION, vision_width: int = VISION, seed: int = 0) -> str:
    """A random CLIPModel (2-layer text tower of width 24, 77 positions; 1-layer vision tower) with a byte-level
    CLIP tokenizer, saved to ``folder``.  ``text_projection`` other than the image one: a checkpoint whose text
    tower projects elsewhere (written by hand, as no CLIPModel can hold one)."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP (the legacy pooling takes the argmax id)
    CLIPTokenizerFast(vocab=vocab, merges=merges).save_pretrained(folder)
    # eos_token_id 2 as in openai's CLIP configs: transformers pools the argmax id (the legacy rule).
    text = dict(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                projection_dim=PROJECTION)
    vision = dict(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=28, patch_size=14, projection_dim=PROJECTION)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION))
    with torch.no_grad():  # a layer norm that is not the identity (its default init is)
        model.vision_model.post_layernorm.weight.normal_(1.0, 0.5)
        model.vision_model.post_layernorm.bias.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    if text_projection != PROJECTION:
        weights = load_file(f"{folder}/model.safetensors")
        weights["text_projection.weight"] = torch.randn(text_projection, 24)
        save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["text_config"]["projection_dim"] = text_projection
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


QUESTIONS = [
    "What colour is the cat on the mat?" + SUFFIX,
    "Is there a dog?",
    "How many birds sit on the wire and the fence?" + SUFFIX,
]


def make_state(B=3, N=40, D=48, seed=0, counts=None, dtype=torch.float32, questions=QUESTIONS):
    """Projected tokens [B, N, D] and the tower's features [B, N, 32] (independent random), one question each."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, D, generator=g).to(dtype)
    features = torch.randn(B, N, VISION, generator=g).to(dtype)
    state = TokenState.from_patches(tokens, (1, N), per_token={"tower_features": features})
    if counts is not None:  # ragged: image b keeps its first counts[b] tokens
        idx = torch.arange(N).expand(B, -1).contiguous()
        state = ops.keep(state, idx, idx < torch.tensor(counts)[:, None])
    return state.with_meta(query_text=tuple(questions[:B]))


class Official:
    """``load_text_tower`` + ``forward`` + ``encode_images`` of the official code, one image, plain torch."""

    def __init__(self, folder: str):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast, CLIPVisionModelWithProjection

        vision = CLIPVisionModelWithProjection.from_pretrained(folder)
        self.post_layernorm = vision.vision_model.post_layernorm
        self.visual_projection = vision.visual_projection
        self.text_tokenizer = CLIPTokenizerFast.from_pretrained(folder)
        self.text_tower = CLIPTextModelWithProjection.from_pretrained(folder)
        self.max_position_embeddings = self.text_tower.config.max_position_embeddings

    @torch.no_grad()
    def text_embeds(self, question: str, strip: bool = True) -> torch.Tensor:
        if strip:
            question = question.replace("\nAnswer the question using a single word or phrase.", "")
        text_inputs = self.text_tokenizer(text=question, return_tensors="pt")
        text_segment = (text_inputs.input_ids.shape[1] - 1) // self.max_position_embeddings + 1
        text_padding = self.max_position_embeddings * text_segment - text_inputs.input_ids.shape[1]
        text_inputs = {
            k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, self.max_position_embeddings)
            for k, v in text_inputs.items()
        }
        return self.text_tower(**text_inputs).text_embeds

    @torch.no_grad()
    def image_embeds(self, features: torch.Tensor) -> torch.Tensor:
        # The tower's own post_layernorm runs in the tower's dtype (fp16 in LLaVA); the projection in float32.
        dtype = features.dtype if features.dtype != torch.float64 else torch.float32
        norm = copy.deepcopy(self.post_layernorm).to(dtype)
        image_embeds = norm(features.to(norm.weight.dtype))
        return self.visual_projection(image_embeds.float())

    @torch.no_grad()
    def relevance(self, features, question, negate=True):
        image_embeds = self.image_embeds(features)[None]
        text_embeds = self.text_embeds(question)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        relevance = torch.matmul(image_embeds, text_embeds.t())
        relevance = (-relevance if negate else relevance).mean(dim=-1)
        return (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())

    @torch.no_grad()
    def picks(self, x, features, question, T, negate=True):
        x = x[None]
        B, N, _ = x.shape
        image_normalized = (x / x.norm(dim=-1, keepdim=True)).float()
        similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
        relevance = self.relevance(features, question, negate)
        kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
        cis = torch.zeros((T, B, N))
        di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
        select_idx = torch.empty((T, B), dtype=torch.long)
        for i in range(T):
            j = torch.argmax(di2s, dim=-1)
            select_idx[i] = j
            eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
                / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
            cis[i, :, :] = eis
            di2s -= torch.square(eis)
            di2s[torch.arange(B), j] = -float("inf")
        return torch.sort(select_idx.t()).values[0].tolist()


@pytest.fixture(scope="module")
def official(clip_dir):
    return Official(clip_dir)


def kept(out: TokenState, b: int) -> list[int]:
    return out.positions[b, : int(out.counts[b]), 1].round().long().tolist()


def relevance_of(plugin: CDPruner, state: TokenState) -> torch.Tensor:
    """The plugin's relevance [B, N] (its own CLIP inputs through the shared normalisation)."""
    from arrcoc_plugins.compressors.cdpruner import cdpruner_relevance

    embeds, query, query_mask = plugin._clip_inputs(state)
    return cdpruner_relevance(embeds, query, query_mask, state.mask, negate=plugin.params.negate)


# ------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("negate", [True, False])
def test_matches_the_official_clip_relevance_and_dpp(clip_dir, official, negate, dtype):
    state = make_state(dtype=dtype, seed=1)
    for k in (6, 12):
        plugin = arrcoc.create("compressor", "cdpruner", keep=k, negate=negate, clip=clip_dir)
        out = plugin(state).check()
        r = relevance_of(plugin, state)
        for b in range(state.B):
            features, question = state.per_token["tower_features"][b], QUESTIONS[b]
            torch.testing.assert_close(r[b], official.relevance(features, question, negate)[0], rtol=0, atol=2e-6)
            expected = official.picks(state.tokens[b], features, question, k, negate)
            assert kept(out, b) == expected
            assert torch.equal(out.tokens[b, :k], state.tokens[b, expected])  # selection only, original order


def test_the_answer_suffix_is_removed(clip_dir, official):
    plain = make_state(questions=[q.replace(SUFFIX, "") for q in QUESTIONS])
    suffixed = make_state()
    plugin = CDPruner(keep=8, clip=clip_dir)
    _, text, mask = plugin._clip_inputs(suffixed)
    _, text_plain, _ = plugin._clip_inputs(plain)
    assert torch.equal(text, text_plain) and mask.tolist() == [[True]] * 3
    torch.testing.assert_close(text[0, :1], official.text_embeds(QUESTIONS[0]), rtol=0, atol=1e-6)
    assert [kept(plugin(suffixed), b) for b in range(3)] == [kept(plugin(plain), b) for b in range(3)]
    # remove_text: [] keeps the suffix, which CLIP then reads: other embeddings
    _, text_kept, _ = CDPruner(keep=8, clip=clip_dir, remove_text=[])._clip_inputs(suffixed)
    torch.testing.assert_close(text_kept[0, :1], official.text_embeds(QUESTIONS[0], strip=False), rtol=0, atol=1e-6)
    assert not torch.allclose(text_kept[0], text[0]) and torch.equal(text_kept[1], text[1])  # question 1 has none
    assert CDPruner.Params().remove_text == [ANSWER_SUFFIX] == [SUFFIX]


def test_long_questions_are_cut_into_77_token_rows_and_averaged(clip_dir, official):
    long = "the cat and " * 36  # 5 tokens each, 182 with BOS and EOS: 3 rows of 77
    clip = load_clip(clip_dir)
    ids, attention, rows = clip_text_rows(clip.tokenizer, [long, "Is there a dog?"], 77)
    n = len(clip.tokenizer(long).input_ids)
    assert n == 182 and rows == [3, 1] and ids.shape == (4, 77)
    assert ids.flatten()[:n].tolist() == clip.tokenizer(long).input_ids  # in order, no truncation
    assert attention[:3].sum() == n and not bool(ids[:3].flatten()[n:].any()) and not bool(attention[2, n - 154:].any())
    embeds, mask = clip_text_embeds(clip, [long, "Is there a dog?", long], "cpu")
    assert mask.tolist() == [[True] * 3, [True, False, False], [True] * 3]
    torch.testing.assert_close(embeds[0], official.text_embeds(long), rtol=0, atol=1e-6)
    assert torch.equal(embeds[0], embeds[2]) and not bool(embeds[1, 1:].any())
    # the relevance is the mean over the three rows (official (-relevance).mean(-1)), not over the first
    state = make_state(questions=[long, "Is there a dog?", long])
    plugin = CDPruner(keep=10, clip=clip_dir)
    r = relevance_of(plugin, state)
    for b in (0, 2):
        torch.testing.assert_close(r[b], official.relevance(state.per_token["tower_features"][b], long)[0],
                                   rtol=0, atol=2e-6)
        assert kept(plugin(state), b) == official.picks(state.tokens[b], state.per_token["tower_features"][b], long, 10)
    from arrcoc_plugins.compressors.cdpruner import cdpruner_relevance

    image, text, text_mask = plugin._clip_inputs(state)
    first_row_only = cdpruner_relevance(image, text[:, :1], text_mask[:, :1], state.mask)
    assert not torch.allclose(first_row_only[0], r[0], atol=1e-3)


def test_ragged_batch_equals_per_image_runs(clip_dir, official):
    counts = [40, 23, 11]
    state = make_state(counts=counts, seed=2)
    plugin = CDPruner(keep=0.4, clip=clip_dir)
    out = plugin(state).check()
    assert out.counts.tolist() == [16, 9, 4]
    for b, n in enumerate(counts):
        features = state.per_token["tower_features"][b, :n]
        one = TokenState.from_patches(state.tokens[b:b + 1, :n].contiguous(), (1, n),
                                      per_token={"tower_features": features[None].contiguous()})
        single = plugin(one.with_meta(query_text=(QUESTIONS[b],)))
        assert kept(out, b) == kept(single, 0) == official.picks(state.tokens[b, :n], features, QUESTIONS[b],
                                                                 len(kept(out, b)))


def test_the_clip_relevance_differs_from_the_token_relevance(clip_dir):
    # The variant reaches the stage: other picks than the relevance of the tokens to a query of their width.
    state = make_state(seed=3)
    g = torch.Generator().manual_seed(3)
    with_query = state.replace(query=torch.randn(3, 4, 48, generator=g), query_mask=torch.ones(3, 4, dtype=torch.bool))
    clip_out = CDPruner(keep=8, clip=clip_dir)(with_query)
    token_out = CDPruner(keep=8)(with_query)
    assert any(kept(clip_out, b) != kept(token_out, b) for b in range(3))
    assert CDPruner(clip=clip_dir).requirements() == frozenset({"query_text", "tower_features"})
    assert CDPruner().requirements() == frozenset({"query"}) and CDPruner.Params().clip is None


def test_loaded_once_per_process_and_device(clip_dir):
    assert load_clip(clip_dir) is load_clip(clip_dir)
    clip = load_clip(clip_dir)
    assert clip.context == 77 and clip.vision_width == VISION
    assert clip.visual_projection.weight.dtype == torch.float32 and clip.text_tower.dtype == torch.float32


def test_a_relative_folder_is_cached_as_the_folder_it_names(tmp_path, monkeypatch):
    # The cache is keyed by the folder a reference resolves to: the same relative name in another working
    # directory is another model (here another vision width), not the one loaded first.
    for sub, width in (("a", VISION), ("b", 24)):
        (tmp_path / sub).mkdir()
        save_tiny_clip(tmp_path / sub / "clip", vision_width=width)
    monkeypatch.chdir(tmp_path / "a")
    assert load_clip("clip").vision_width == VISION
    monkeypatch.chdir(tmp_path / "b")
    assert load_clip("clip").vision_width == 24
    assert load_clip(str(tmp_path / "b" / "clip")) is load_clip("clip")  # one folder, one load


# ----------------------------------------------------------------- errors
def test_a_folder_that_is_not_a_clip_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelError, match="expected a CLIP model .*got model_type 'llama'"):
        CDPruner(keep=4, clip=str(tmp_path / "llama"))(make_state())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot read a model config from"):
        CDPruner(keep=4, clip=str(tmp_path / "empty"))(make_state())
    with pytest.raises(ModelError, match="does not exist"):
        CDPruner(keep=4, clip=str(tmp_path / "missing"))(make_state())


def test_a_text_projection_of_another_width_is_refused(tmp_path):
    folder = save_tiny_clip(tmp_path, text_projection=8)
    with pytest.raises(ModelError, match="projects the text to 8 channels but the images to 16"):
        CDPruner(keep=4, clip=folder)(make_state())


def test_features_of_another_width_are_refused(tmp_path):
    folder = save_tiny_clip(tmp_path, vision_width=24)
    with pytest.raises(InputError, match="the tower's features are 32 wide, but the post_layernorm of .* takes 24"):
        CDPruner(keep=4, clip=folder)(make_state())


def test_missing_text_or_tower_features_are_named(clip_dir):
    state = make_state()
    plugin = CDPruner(keep=4, clip=clip_dir)
    with pytest.raises(MissingInputError, match=r"needs the question as text \(state.meta\['query_text'\]\)"):
        plugin(TokenState.from_patches(state.tokens, (1, 40), per_token=dict(state.per_token)))
    with pytest.raises(MissingInputError, match=r"per_token\['tower_features'\]"):
        plugin(TokenState.from_patches(state.tokens, (1, 40)).with_meta(query_text=tuple(QUESTIONS)))
    with pytest.raises(InputError, match=r"one string per row \(3\)"):
        plugin(state.with_meta(query_text=("a", "b")))
