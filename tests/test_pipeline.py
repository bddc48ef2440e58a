"""Pipeline runs: wiring, trace, determinism, image and query inputs, input errors, devices.

The encoder is a two-block ``vit_tiny_patch16_224`` at 64x64 pixels (4x4
patches + a class token), randomly initialised with a fixed seed.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

import arrcoc
from arrcoc.errors import ArrcocWarning, BudgetError, InputError, MissingInputError, StageError, StateError
from arrcoc.hookspecs import hookimpl
from arrcoc.images import load_images
from arrcoc.plugin import Compressor, Encoder, Params, QueryEncoder, Scorer
from arrcoc.registry import Registry, using_registry
from arrcoc.state import TokenState


class QueryDot(Scorer):
    """Scores tokens by their dot product with the mean query embedding."""

    name = "query_dot"
    needs = frozenset({"query"})

    def __call__(self, state: TokenState) -> TokenState:
        return state.with_per_token(scores=query_dot(state.tokens, state.query, state.query_mask))


def query_dot(tokens: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(query.dtype)[..., None]
    mean = (query * w).sum(1) / w.sum(1)
    return torch.einsum("bnd,bd->bn", tokens, mean)


class ReadsQuestion(Compressor):
    """Reads the question as text only (as cdpruner's clip): records each row's string as a per-token length."""

    name = "reads_question"
    needs = frozenset({"query_text"})

    def __call__(self, state: TokenState) -> TokenState:
        lengths = torch.tensor([len(t) for t in state.meta["query_text"]], dtype=torch.float32)
        return state.with_per_token(question_length=lengths[:, None].expand(state.B, state.N).to(state.device))


class NeedsFoo(Compressor):
    """Needs a per-token field 'foo' that only MakesFoo provides."""

    name = "needs_foo"
    needs = frozenset({"foo"})

    def __call__(self, state):
        return state


class MakesFoo(Compressor):
    """Provides per_token 'foo'."""

    name = "makes_foo"
    provides = frozenset({"foo"})

    def __call__(self, state):
        return state.with_per_token(foo=state.tokens[..., 0])


class ReturnsNone(Compressor):
    """A broken stage: returns nothing."""

    name = "returns_none"

    def __call__(self, state):
        return None


class Boom(Compressor):
    """A broken stage: raises an exception arrcoc does not know."""

    name = "boom"

    def __call__(self, state):
        raise RuntimeError("index 99 is out of bounds")


class RaisesBudget(Compressor):
    """Refuses its budget, naming itself as plugins do."""

    name = "raises_budget"

    def __call__(self, state):
        raise BudgetError("raises_budget: keep=99 tokens, but an image has only 16")


class RunsOutOfMemory(Compressor):
    name = "out_of_memory"

    def __call__(self, state):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


class BadInit(Compressor):
    name = "bad_init"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        raise ValueError("needs a GPU library")

    def __call__(self, state):
        return state


class Broken(Compressor):
    """Returns a state a stage must not: chosen by `how`."""

    name = "broken"

    class Params(Params):
        how: Literal["nan", "inf_cls", "holes", "batch", "origin"] = "nan"

    def __call__(self, state):
        how = self.params.how
        if how == "nan":
            tokens = state.tokens.clone()
            tokens[-1, 0, 0] = float("nan")
            return state.replace(tokens=tokens)
        if how == "inf_cls":
            return state.replace(cls=torch.full_like(state.cls, float("inf")))
        if how == "holes":  # a real token after a padded slot: not a prefix mask
            mask = state.mask.clone()
            mask[:, 0] = False
            return dataclasses.replace(state, mask=mask)  # (state.replace would refuse it inside the stage)
        if how == "batch":
            return state.image(0)
        return dataclasses.replace(state, origin=torch.full_like(state.origin, state.N))


class NanEncoder(Encoder):
    """Average-pooled pixels, with a NaN in image 1."""

    name = "nan_encoder"
    embed_dim = 3

    def encode(self, pixels):
        tokens = torch.nn.functional.avg_pool2d(pixels, 16).flatten(2).transpose(1, 2).contiguous()
        tokens[1:, 2] = float("nan")
        return TokenState.from_patches(tokens, (pixels.shape[-2] // 16, pixels.shape[-1] // 16))


class ZeroText(QueryEncoder):
    """Encodes every word as a zero vector, except words starting with 'x'."""

    name = "zero_text"

    def encode(self, queries, *, dim, device, dtype):
        T = max(len(q.split()) for q in queries)
        emb = torch.zeros(len(queries), T, dim, device=device, dtype=dtype)
        mask = torch.zeros(len(queries), T, dtype=torch.bool, device=device)
        for b, q in enumerate(queries):
            for t, word in enumerate(q.split()):
                mask[b, t] = True
                emb[b, t, 0] = 1.0 if word.startswith("x") else 0.0
        return emb, mask


class WrongText(QueryEncoder):
    """Returns embeddings without a batch axis."""

    name = "wrong_text"

    def encode(self, queries, *, dim, device, dtype):
        return torch.ones(3, dim), torch.ones(3, dtype=torch.bool)


class Provider:
    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def arrcoc_register_plugins(self, register):
        for cls in self.classes:
            register(cls)


@pytest.fixture(scope="module", autouse=True)
def registry():
    from arrcoc_plugins.compressors import tome
    from arrcoc_plugins.encoders import timm_vit
    from arrcoc_plugins.query_encoders import toy_text

    reg = Registry(load_entry_points=False)
    for name, module in [("timm_vit", timm_vit), ("tome", tome), ("toy_text", toy_text)]:
        reg.register(module, name=name)
    reg.register(Provider(QueryDot, ReadsQuestion, NeedsFoo, MakesFoo, ReturnsNone, Boom, RaisesBudget, RunsOutOfMemory, BadInit,
                          Broken, NanEncoder, ZeroText, WrongText), name="testplugins")
    assert reg.failures == {}
    with using_registry(reg):
        yield reg


ENCODER = {
    "use": "timm_vit",
    "model": "vit_tiny_patch16_224",
    "model_kwargs": {"depth": 2, "img_size": 64},
    "layer": -1,
}
SPEC = {"name": "small", "encoder": ENCODER, "compress": [{"use": "tome", "r": 4}]}
QUERY_SPEC = {"name": "query", "encoder": ENCODER, "query_encoder": {"use": "toy_text"}, "score": [{"use": "query_dot"}]}


def pixels(b: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Pixels that survive a PNG round trip exactly (multiples of 1/255)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def pipe():
    return arrcoc.load_pipeline(SPEC, device="cpu")


@pytest.fixture(scope="module")
def query_pipe():
    return arrcoc.load_pipeline(QUERY_SPEC, device="cpu")


# ------------------------------------------------------------------ wiring
def test_run_pipeline_returns_a_traced_state():
    state = arrcoc.run_pipeline(SPEC, pixels(), device="cpu")
    assert isinstance(state, TokenState)
    assert state.tokens.shape == (2, 12, 192)  # 16 patches, 4 merged away; the class token apart
    assert state.cls is not None and state.cls.shape == (2, 192)
    assert state.grid == (4, 4)
    assert bool(state.mask.all())
    assert torch.equal(state.size.sum(1), torch.full((2,), 16.0))  # every patch lives in some token
    assert bool((state.origin >= 0).all())
    assert [(r.stage, r.plugin, r.tokens_in, r.tokens_out, r.warnings) for r in state.trace] == [
        ("encoder", "timm_vit", (17, 17), (17, 17), ()),
        ("compress[0]", "tome", (17, 17), (13, 13), ()),
    ]
    assert all(r.ms > 0 for r in state.trace)


def test_pipeline_equals_its_stages_run_by_hand():
    images = pixels()
    state = arrcoc.run_pipeline(SPEC, images, device="cpu")
    encoder = arrcoc.create("encoder", "timm_vit", **{k: v for k, v in ENCODER.items() if k != "use"})
    encoder.configure(frozenset({"keys"}))  # what tome (metric: keys) asks of it
    tome = arrcoc.create("compressor", "tome", r=4)
    with torch.inference_mode():
        expected = tome(encoder.encode(encoder.preprocess(images)))
    assert torch.equal(state.tokens, expected.tokens)
    assert torch.equal(state.origin, expected.origin)
    assert torch.equal(state.size, expected.size)
    assert torch.equal(state.images, images)


def test_load_once_run_twice_is_deterministic(pipe):
    images = pixels()
    first, second = pipe(images), pipe(images)
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.origin, second.origin)
    rebuilt = arrcoc.load_pipeline(SPEC, device="cpu")(images)  # seeded initialisation
    assert torch.equal(first.tokens, rebuilt.tokens)
    assert [r.tokens_out for r in first.trace] == [r.tokens_out for r in second.trace]


def test_repr_and_built_stages(pipe):
    assert repr(pipe) == "Pipeline('small': timm_vit -> tome, device=cpu)"
    assert [label for label, _ in pipe.stages] == ["compress[0]"]
    assert pipe.query_encoder is None and pipe.llm == []


def test_llm_stages_are_built_but_not_run():
    class LateDrop(Compressor):
        name = "late_drop_p"
        stage = "llm"

        def __call__(self, state):
            raise AssertionError("an llm stage must not run in Pipeline")

    registry = arrcoc.get_registry()
    registry.register(Provider(LateDrop), name="late")
    try:
        pipe = arrcoc.load_pipeline({**SPEC, "llm": [{"use": "late_drop_p"}]}, device="cpu")
        assert [label for label, _ in pipe.llm] == ["llm[0]"]
        assert [r.stage for r in pipe(pixels(1)).trace] == ["encoder", "compress[0]"]
    finally:
        registry.unregister("late")


# ------------------------------------------------------------------ images
def test_paths_pil_and_tensors_give_the_same_result(pipe, tmp_path):
    images = pixels(2)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        to_pil(image).save(paths[-1])
    expected = pipe(images)
    for given in ([str(p) for p in paths], paths, [to_pil(im) for im in images], [images[0], images[1]]):
        state = pipe(given)
        assert torch.equal(state.images, images)
        assert torch.equal(state.tokens, expected.tokens)
    one = pipe(str(paths[0]))
    assert torch.equal(one.tokens, pipe(images[0]).tokens)  # a [3, H, W] tensor is a batch of one
    assert torch.equal(one.tokens, pipe(to_pil(images[0])).tokens)
    assert torch.equal(one.tokens, expected.tokens[:1])  # batching does not change an image's result


def test_other_sizes_are_resized(pipe, tmp_path):
    small = pixels(1, 40, 72)
    path = tmp_path / "wide.png"
    to_pil(small[0]).save(path)
    from_file = pipe(path)
    assert from_file.images.shape == (1, 3, 64, 64)  # files and PIL images: resized on loading
    assert from_file.trace[-1].tokens_out == (13,)
    from_tensor = pipe(small)
    assert from_tensor.images.shape == (1, 3, 40, 72)  # a batch tensor: resized by the encoder
    assert from_tensor.tokens.shape == (1, 12, 192)
    mixed = pipe([small[0], pixels(1)[0]])  # list entries of other sizes are resized to the input size
    assert mixed.images.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pixel_tensors_of_any_float_dtype_are_float32_pixels(pipe, dtype):
    images = pixels(1, 40, 72)  # another size: the encoder resizes it (no half-precision resize on CPU)
    assert load_images(images.to(dtype)).dtype == torch.float32
    state = pipe(images.to(dtype))
    assert state.images.dtype == torch.float32
    torch.testing.assert_close(state.images, images.to(dtype).float())
    if dtype == torch.float64:  # exact pixels: the same tokens as float32 ones
        assert torch.equal(state.tokens, pipe(images).tokens)


def test_rgba_and_grey_images_are_converted_to_rgb(pipe):
    grey = Image.fromarray(np.full((64, 64), 128, dtype=np.uint8), mode="L")
    rgba = Image.fromarray(np.full((64, 64, 4), 128, dtype=np.uint8), mode="RGBA")
    for image in (grey, rgba):
        state = pipe(image)
        assert torch.allclose(state.images, torch.full((1, 3, 64, 64), 128 / 255))


def test_list_of_different_sizes_without_a_fixed_input_size():
    with pytest.raises(InputError, match=r"images: sizes differ \[\(3, 32, 32\), \(3, 64, 64\)\]"):
        load_images([torch.rand(3, 64, 64), torch.rand(3, 32, 32)], size=None)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp / "missing.png", r"images\[0\]: image file '.*missing\.png' does not exist"),
        (lambda tmp: tmp, r"images\[0\]: '.*' is not a file"),
        (lambda tmp: _text_file(tmp), r"images\[0\]: '.*notes\.png' is not a readable image \(UnidentifiedImageError: cannot identify"),
        (lambda tmp: torch.rand(64, 64), r"images: expected a float tensor \[B, 3, H, W\] \(or \[3, H, W\]\) of pixels in \[0, 1\], got shape \[64, 64\]"),
        (lambda tmp: torch.rand(1, 4, 64, 64), r"got shape \[1, 4, 64, 64\]"),
        (lambda tmp: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"images: expected floating pixels in \[0, 1\], got dtype torch\.uint8"),
        (lambda tmp: torch.full((1, 3, 64, 64), float("nan")), r"images: pixels contain NaN or inf"),
        (lambda tmp: torch.rand(1, 3, 64, 64) * 255, r"images: pixels must lie in \[0, 1\] \(arrcoc normalises them for the model\), got \[.*, 2\d\d\]"),
        (lambda tmp: torch.rand(1, 3, 64, 64) - 0.5, r"pixels must lie in \[0, 1\].*got \[-0\.\d+, "),
        (lambda tmp: torch.rand(0, 3, 64, 64), r"images: empty image batch \[0, 3, 64, 64\]"),
        (lambda tmp: [], r"images: expected a path, image bytes, a PIL image, a tensor or a non-empty list of them, got an empty sequence"),
        (lambda tmp: [pixels(1)[0], 3], r"images\[1\]: expected a path, image bytes, a PIL image or a tensor, got int"),
        (lambda tmp: [pixels(2)], r"images\[0\]: a list entry must be one image \[3, H, W\], got \[2, 3, 64, 64\]"),
        (lambda tmp: {"image": 1}, r"images: expected a path, image bytes, a PIL image, a tensor or a non-empty list of them, got dict"),
    ],
)
def test_bad_images_raise_input_error(pipe, tmp_path, make, expected):
    with pytest.raises(InputError, match=expected):
        pipe(make(tmp_path))


def _text_file(tmp):
    path = tmp / "notes.png"
    path.write_text("this is not an image")
    return path


# ----------------------------------------------------------------- queries
def test_query_strings_go_through_the_query_encoder(query_pipe):
    from arrcoc_plugins.query_encoders.toy_text import encode_words

    images = pixels()
    state = query_pipe(images, query=["red apple", "a blue table"])
    emb, mask = encode_words(["red apple", "a blue table"], 192)
    assert torch.equal(state.query, emb) and torch.equal(state.query_mask, mask)
    assert torch.allclose(state.per_token["scores"], query_dot(state.tokens, emb, mask))
    one = query_pipe(images, query="red apple")  # one string for every image
    assert one.query.shape == (2, 2, 192) and torch.equal(one.query[0], one.query[1])


@pytest.mark.parametrize("shape", [(192,), (3, 192), (1, 3, 192), (2, 3, 192)])
def test_query_tensors_of_every_accepted_shape(query_pipe, shape):
    g = torch.Generator().manual_seed(1)
    query = torch.randn(shape, generator=g)
    state = query_pipe(pixels(), query=query)
    T = 1 if len(shape) == 1 else shape[-2]
    assert state.query.shape == (2, T, 192)
    assert bool(state.query_mask.all()) and state.query_mask.shape == (2, T)
    expected = query.reshape(-1, T, 192).expand(2, T, 192)
    assert torch.equal(state.query, expected)
    assert torch.allclose(state.per_token["scores"], query_dot(state.tokens, expected, state.query_mask))


@pytest.mark.parametrize(
    ("query", "error", "expected"),
    [
        ("   ", InputError, r"query\[0\]: empty query string; pass a question, or query=None"),
        (["cat", ""], InputError, r"query\[1\]: empty query string"),
        (["a", "b", "c"], InputError, r"^query: got a list of 3 strings for 2 images; pass one string \(or a list of "
                                      r"one\) for every image, or a list of 2, one per image$"),
        (torch.randn(3, 4, 192), InputError, r"query: expected embeddings \[D\], \[T, D\] or \[B=2, T, D\], got shape \[3, 4, 192\]"),
        (torch.randn(0, 192), InputError, r"got shape \[1, 0, 192\]"),
        (torch.randn(2, 2, 2, 192), InputError, r"got shape \[2, 2, 2, 192\]"),
        (torch.ones(4, 192, dtype=torch.long), InputError, r"query: expected floating embeddings, got dtype torch\.int64"),
        (torch.full((192,), float("nan")), InputError, r"query: embeddings contain NaN or inf"),
        (5, InputError, r"query: expected a string, a list of strings or a tensor, got int"),
        (["cat", 3], InputError, r"^query\[1\]: expected a string, got int$"),
        (("cat", torch.randn(192)), InputError, r"^query\[1\]: expected a string, got Tensor of shape \[192\] dtype torch\.float32$"),
        ([], InputError, r"^query: got an empty list; pass a string, one string per image, or None$"),
        (np.array(["cat", "dog"]), InputError, r"^query: expected a string, .* got ndarray of shape \[2\] dtype <U3$"),
    ],
)
def test_bad_queries(query_pipe, query, error, expected):
    with pytest.raises(error, match=expected):
        query_pipe(pixels(), query=query)


def test_query_embeddings_as_a_numpy_array(query_pipe):
    query = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
    state = query_pipe(pixels(), query=query)
    assert torch.equal(state.query, torch.from_numpy(query).expand(2, 3, 192))
    assert torch.equal(query_pipe(pixels(), query=("red apple", "blue")).query,
                       query_pipe(pixels(), query=["red apple", "blue"]).query)


def test_a_list_of_one_query_asks_every_image_like_one_string(query_pipe):
    """Issue 16: ``query=["mug"]`` for two images was refused as 'got 1 strings for 2 images; pass one'."""
    one = query_pipe(pixels(), query="red mug")
    listed = query_pipe(pixels(), query=["red mug"])
    assert torch.equal(listed.query, one.query) and torch.equal(listed.query_mask, one.query_mask)
    assert torch.equal(listed.per_token["scores"], one.per_token["scores"])
    assert torch.equal(query_pipe(pixels(), query=("red mug",)).query, one.query)


def test_query_strings_without_a_query_encoder():
    pipe = arrcoc.load_pipeline({"encoder": ENCODER, "score": ["query_dot"]}, device="cpu")
    with pytest.raises(MissingInputError, match=r"<dict>: query strings need a `query_encoder:` section"):
        pipe(pixels(1), query="where is the cat?")


def test_a_query_no_stage_uses_is_ignored_with_a_recorded_warning(pipe):
    with pytest.warns(ArrcocWarning, match="query 'where is the cat\\?' ignored: no stage of pipeline 'small' uses a query"):
        state = pipe(pixels(1), query="where is the cat?")
    assert state.query is None
    assert state.trace[0].warnings == ("query 'where is the cat?' ignored: no stage of pipeline 'small' uses a query "
                                       "(and it has no query_encoder)",)


def test_a_stage_needing_a_query_names_itself():
    pipe = arrcoc.load_pipeline({"encoder": ENCODER, "compress": [{"use": "tome", "r": 2}], "score": ["query_dot"]},
                                device="cpu")
    with pytest.raises(MissingInputError, match=r"^score\[0\] \(query_dot\) needs a query: pass query='\.\.\.'"):
        pipe(pixels(1))
    assert pipe(pixels(1), query=torch.randn(192)).per_token["scores"].shape == (1, 14)


def test_a_stage_reading_the_question_as_text_needs_no_query_encoder():
    """Query strings reach stages as ``meta['query_text']`` (one per image; a list of one or a string asks every
    image); a pipeline whose stages read only the text needs no query_encoder and encodes nothing."""
    pipe = arrcoc.load_pipeline({"encoder": ENCODER, "compress": ["reads_question"]}, device="cpu")
    state = pipe(pixels(2), query=["a red cat", "dogs"])
    assert state.meta["query_text"] == ("a red cat", "dogs") and state.query is None
    assert state.per_token["question_length"][:, 0].tolist() == [9.0, 4.0]
    assert pipe(pixels(2), query="a mug").meta["query_text"] == ("a mug", "a mug")
    assert pipe(pixels(2), query=["a mug"]).meta["query_text"] == ("a mug", "a mug")
    assert pipe(pixels(2), query=["a mug"]).image(1).meta["query_text"] == ("a mug",)


def test_a_stage_reading_the_question_as_text_without_one_names_itself():
    pipe = arrcoc.load_pipeline({"encoder": ENCODER, "compress": ["tome", "reads_question"]}, device="cpu")
    with pytest.raises(MissingInputError, match=r"^compress\[1\] \(reads_question\) needs the query as text: "
                                                r"pass query='\.\.\.' \(strings\)"):
        pipe(pixels(1))
    with pytest.raises(MissingInputError, match=r"\(reads_question\) needs the query as text"):
        pipe(pixels(1), query=torch.randn(192))  # embeddings carry no text
    with pytest.raises(InputError, match=r"query: got a list of 3 strings for 2 images"):
        pipe(pixels(2), query=["a", "b", "c"])


def test_text_and_embedding_stages_share_one_question():
    """A stage reading the text and one reading the encoded query: both from the same strings."""
    pipe = arrcoc.load_pipeline({"encoder": ENCODER, "query_encoder": {"use": "toy_text"},
                                 "compress": ["reads_question"], "score": ["query_dot"]}, device="cpu")
    state = pipe(pixels(2), query=["a red cat", "dogs"])
    assert state.meta["query_text"] == ("a red cat", "dogs")
    assert state.query is not None and state.query.shape[0] == 2
    alone = arrcoc.load_pipeline({"encoder": ENCODER, "query_encoder": {"use": "toy_text"}, "score": ["query_dot"]},
                                 device="cpu")(pixels(2), query=["a red cat", "dogs"])
    assert torch.equal(state.query, alone.query)


# --------------------------------------------------------------- needs/provides
def test_a_need_nobody_provides_fails_when_loading():
    spec = {"encoder": ENCODER, "compress": ["tome", "needs_foo"]}
    with pytest.raises(MissingInputError, match=(
        r"^<dict>: compress\[1\] \(needs_foo\) needs 'foo', which neither the encoder 'timm_vit' "
        r"nor an earlier stage provides"
    )):
        arrcoc.load_pipeline(spec, device="cpu")


def test_an_earlier_stage_can_provide_a_need():
    state = arrcoc.run_pipeline({"encoder": ENCODER, "compress": ["makes_foo", "needs_foo"]}, pixels(1), device="cpu")
    assert torch.equal(state.per_token["foo"], state.tokens[..., 0])


def test_a_stage_must_return_a_state():
    with pytest.raises(StateError, match=r"compress\[0\] \(returns_none\) returned NoneType, expected a TokenState"):
        arrcoc.run_pipeline({"encoder": ENCODER, "compress": ["returns_none"]}, pixels(1), device="cpu")


# ------------------------------------------------------ stages that fail
def test_an_unknown_exception_in_a_stage_names_the_stage():
    with pytest.raises(StageError) as info:
        arrcoc.run_pipeline({"encoder": ENCODER, "compress": ["tome", "boom"]}, pixels(1), device="cpu")
    assert str(info.value) == "compress[1] (boom): RuntimeError: index 99 is out of bounds"
    assert type(info.value.__cause__) is RuntimeError


def test_an_arrcoc_error_in_a_stage_keeps_its_class_and_gets_the_label_once():
    with pytest.raises(BudgetError) as info:
        arrcoc.run_pipeline({"encoder": ENCODER, "compress": ["raises_budget"]}, pixels(1), device="cpu")
    assert str(info.value) == "compress[0] (raises_budget): keep=99 tokens, but an image has only 16"
    assert type(info.value.__cause__) is BudgetError
    assert str(info.value.__cause__) == "raises_budget: keep=99 tokens, but an image has only 16"
    labelled = info.value
    with pytest.raises(BudgetError) as again:
        with arrcoc.pipeline.stage_errors("compress[0]", "raises_budget"):
            raise labelled
    assert again.value is labelled


def test_running_out_of_memory_keeps_its_type_with_the_stage_as_a_note():
    with pytest.raises(torch.OutOfMemoryError) as info:
        arrcoc.run_pipeline({"encoder": ENCODER, "compress": ["out_of_memory"]}, pixels(1), device="cpu")
    assert getattr(info.value, "__notes__", ["in compress[0] (out_of_memory)"]) == ["in compress[0] (out_of_memory)"]


def test_a_plugin_failing_to_build_names_its_stage():
    with pytest.raises(StageError, match=r"^compress\[0\] \(bad_init\): ValueError: needs a GPU library$"):
        arrcoc.load_pipeline({"encoder": ENCODER, "compress": ["bad_init"]}, device="cpu")


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("nan", r"compress\[1\] \(broken\) returned NaN or inf tokens \(images \[1\]\) from finite input"),
        ("inf_cls", r"compress\[1\] \(broken\) returned NaN or inf tokens \(images class token\) from finite input"),
        ("holes", r"compress\[1\] \(broken\) returned an inconsistent state: TokenState\.mask: real tokens must "
                  r"form a prefix of each row"),
        ("batch", r"compress\[1\] \(broken\) returned a state of 1 images on a \(4, 4\) patch grid from 2 images "
                  r"on \(4, 4\); a stage keeps the batch and the grid"),
        ("origin", r"compress\[1\] \(broken\) returned an inconsistent state: TokenState\.origin: values must lie"),
    ],
)
def test_a_stage_returning_a_broken_state_is_blamed_not_the_next_one(how, expected):
    spec = {"encoder": ENCODER, "compress": [{"use": "tome", "r": 1}, {"use": "broken", "how": how}, "tome"]}
    with pytest.raises(StateError, match=f"^{expected}"):
        arrcoc.run_pipeline(spec, pixels(2), device="cpu")


def test_an_encoder_returning_nan_from_finite_pixels_is_blamed():
    # the check after the encoder's stage refuses them
    with pytest.raises(StateError, match=r"^encoder \(nan_encoder\) returned NaN or inf tokens \(images \[1\]\) from "
                                         r"finite input"):
        arrcoc.run_pipeline({"encoder": "nan_encoder"}, pixels(2), device="cpu")


def test_a_query_encoder_failing_or_returning_nonsense_names_itself():
    pipe = arrcoc.load_pipeline({"encoder": ENCODER, "query_encoder": "wrong_text", "score": ["query_dot"]},
                                device="cpu")
    with pytest.raises(StateError, match=(
        r"^query_encoder \(wrong_text\) returned embeddings of shape \[3, 192\] dtype torch\.float32 and a mask of "
        r"shape \[3\] dtype torch\.bool; expected floating \[B=1, T, D\] and bool \[B, T\]$"
    )):
        pipe(pixels(1), query="cat")


# ------------------------------------------------------- zero queries
def test_an_all_zero_query_is_refused():
    with pytest.raises(InputError, match=(
        r"^query: the query of images \[0, 1\] is all zeros: query-guided stages would ignore it without a word"
    )):
        arrcoc.run_pipeline(QUERY_SPEC, pixels(2), query=torch.zeros(3, 192), device="cpu")
    query = torch.randn(2, 3, 192)
    query[1] = 0
    with pytest.raises(InputError, match=r"^query: the query of images \[1\] is all zeros"):
        arrcoc.run_pipeline(QUERY_SPEC, pixels(2), query=query, device="cpu")
    spec = {**QUERY_SPEC, "query_encoder": {"use": "zero_text"}}
    with pytest.raises(InputError, match=r"^query_encoder \(zero_text\): the query of images \[1\] is all zeros"):
        arrcoc.run_pipeline(spec, pixels(2), query=["x cat", "a cat"], device="cpu")


def test_zero_query_tokens_among_others_are_a_recorded_warning():
    query = torch.randn(2, 3, 192)
    query[1, 2] = 0
    message = ("query: query tokens that are zero vectors match nothing and only dilute the query "
               "(image: token indices {1: [2]}); leave them out, or mask them")
    with pytest.warns(ArrcocWarning) as caught:
        state = arrcoc.run_pipeline(QUERY_SPEC, pixels(2), query=query, device="cpu")
    assert [str(w.message) for w in caught] == [message]
    assert state.trace[0].warnings == (message,)


# ---------------------------------------------------------------- warnings
def test_a_clamped_r_is_a_warning_recorded_in_the_trace():
    spec = {"encoder": ENCODER, "compress": [{"use": "tome", "r": 100}]}
    with pytest.warns(ArrcocWarning, match=r"tome: r=100 clamped to \[8\]"):
        state = arrcoc.run_pipeline(spec, pixels(), device="cpu")
    record = state.trace[-1]
    assert record.tokens_out == (9, 9)  # 16 patches: at most 8 merge (as ToMe), + the class token
    assert len(record.warnings) == 1 and record.warnings[0].startswith("tome: r=100 clamped to [8]")
    assert state.trace[0].warnings == ()


def test_no_warning_when_nothing_is_adjusted(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = pipe(pixels(1))
    assert all(r.warnings == () for r in state.trace)


# ----------------------------------------------------------------- devices
def test_device_cpu(pipe):
    assert pipe.device == torch.device("cpu")
    state = pipe(pixels(1))
    assert state.tokens.device.type == "cpu" and state.images.device.type == "cpu"


def test_auto_device():
    pipe = arrcoc.load_pipeline(SPEC, device="auto")
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", 3.5])
def test_bad_device(device):
    with pytest.raises(InputError, match=r"device: expected e\.g\. 'cpu', 'cuda', 'cuda:1' or 'auto', got "):
        arrcoc.load_pipeline(SPEC, device=device)


def test_a_device_this_machine_lacks_is_refused_when_the_pipeline_is_built():
    available = arrcoc.pipeline.available_devices()
    assert available[0] == "cpu" and available == ["cpu", *[f"cuda:{i}" for i in range(torch.cuda.device_count())],
                                                    *(["mps"] if torch.backends.mps.is_available() else [])]
    missing = [f"cuda:{torch.cuda.device_count()}", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"])
    missing += [] if torch.backends.mps.is_available() else ["mps"]
    for device in missing:
        with pytest.raises(InputError) as info:
            arrcoc.load_pipeline(SPEC, device=device)
        message = str(info.value)
        assert message.startswith(f"device {str(torch.device(device))!r} is not available on this machine")
        assert message.endswith(f"; available: {', '.join(available)}")
    with pytest.raises(InputError, match=r"^device 'meta': arrcoc runs on cpu, cuda\[:N\], xpu\[:N\] or mps; available here: cpu"):
        arrcoc.load_pipeline(SPEC, device="meta")
