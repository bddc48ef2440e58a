"""TokenState: construction validation, from_patches, check(), copies and dtype moves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arrcoc import ops
from arrcoc.errors import StateError
from arrcoc.state import NonFiniteStateError, TokenState

B, H, W, D = 2, 3, 4, 8
N = H * W


def fields(**changes):
    """Valid constructor arguments of a fresh 3x4 state, with ``changes`` applied."""
    g = torch.Generator().manual_seed(0)
    base = dict(
        tokens=torch.randn(B, N, D, generator=g),
        mask=torch.ones(B, N, dtype=torch.bool),
        size=torch.ones(B, N),
        positions=torch.zeros(B, N, 2),
        origin=torch.arange(N).expand(B, N).clone(),
        grid=(H, W),
    )
    base.update(changes)
    return base


def fresh(cls: bool = True, **per_token) -> TokenState:
    g = torch.Generator().manual_seed(1)
    return TokenState.from_patches(
        torch.randn(B, N, D, generator=g), (H, W),
        cls_token=torch.randn(B, D, generator=g) if cls else None, per_token=per_token,
    )


def test_valid_fields_build():
    state = TokenState(**fields())
    assert (state.B, state.N, state.D) == (B, N, D)
    assert state.grid == (H, W) and state.dtype == torch.float32


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(tokens=torch.randn(B, N)), r"TokenState\.tokens: expected a floating tensor \[B, N, D\], got tensor of shape \[2, 12\]"),
        (dict(tokens=torch.ones(B, N, D, dtype=torch.int64)), r"TokenState\.tokens: .*dtype torch\.int64"),
        (dict(tokens=[[1.0]]), r"TokenState\.tokens: .*got list"),
        (dict(mask=torch.ones(B, N, dtype=torch.uint8)), r"TokenState\.mask: expected shape \[2, 12\] dtype torch\.bool, got shape \[2, 12\] dtype torch\.uint8"),
        (dict(mask=torch.ones(B, N + 1, dtype=torch.bool)), r"TokenState\.mask: .*got shape \[2, 13\]"),
        (dict(mask=None), r"TokenState\.mask: expected a tensor \[2, 12\], got NoneType"),
        (dict(size=torch.ones(B, N, dtype=torch.float64)), r"TokenState\.size: .*dtype torch\.float32, got .*torch\.float64"),
        (dict(size=torch.ones(B, N, 1)), r"TokenState\.size: expected shape \[2, 12\] .*got shape \[2, 12, 1\]"),
        (dict(positions=torch.zeros(B, N, 3)), r"TokenState\.positions: expected shape \[2, 12, 2\] .*got shape \[2, 12, 3\]"),
        (dict(origin=torch.arange(N, dtype=torch.int32).expand(B, N)), r"TokenState\.origin: .*dtype torch\.int64, got .*torch\.int32"),
        (dict(origin=torch.arange(N + 1).expand(B, N + 1)), r"TokenState\.origin: expected shape \[2, 12\] .*got shape \[2, 13\]"),
        (dict(grid=(0, N)), r"TokenState\.grid: expected \(H0, W0\) >= 1, got \(0, 12\)"),
        (dict(grid=(2, 3)), r"TokenState\.origin: expected shape \[2, 6\]"),  # grid and origin disagree
        (dict(cls=torch.randn(B, D + 1)), r"TokenState\.cls: expected shape \[2, 8\] .*got shape \[2, 9\]"),
        (dict(cls=torch.randn(B, D, dtype=torch.float64)), r"TokenState\.cls: .*dtype torch\.float32, got .*torch\.float64"),
        (dict(per_token={"score": torch.randn(B, N - 1)}), r"TokenState\.per_token\['score'\]: expected a tensor \[B=2, N=12, \.\.\.\], got tensor of shape \[2, 11\]"),
        (dict(per_token={"score": 3.0}), r"TokenState\.per_token\['score'\]: .*got float"),
        (dict(query=torch.randn(B, 4, 5)), r"TokenState\.query_mask: expected a tensor \[2, 4\], got NoneType"),
        (dict(query=torch.randn(B, 4, 5), query_mask=torch.ones(B, 3, dtype=torch.bool)), r"TokenState\.query_mask: expected shape \[2, 4\]"),
        (dict(query=torch.randn(B + 1, 4, 5), query_mask=torch.ones(B + 1, 4, dtype=torch.bool)), r"TokenState\.query: expected a floating tensor \[B=2, T, Dq\], got tensor of shape \[3, 4, 5\]"),
        (dict(query_mask=torch.ones(B, 4, dtype=torch.bool)), r"TokenState\.query_mask is set but query is None"),
        (dict(images=torch.rand(B, 1, 16, 16)), r"TokenState\.images: expected \[B=2, 3, H, W\], got tensor of shape \[2, 1, 16, 16\]"),
    ],
)
def test_bad_fields_raise_state_error_naming_the_field(changes, match):
    with pytest.raises(StateError, match=match):
        TokenState(**fields(**changes))


@pytest.mark.parametrize(
    "name, value",
    [
        ("mask", torch.ones(B, N, dtype=torch.bool, device="meta")),
        ("size", torch.ones(B, N, device="meta")),
        ("positions", torch.zeros(B, N, 2, device="meta")),
        ("origin", torch.zeros(B, N, dtype=torch.int64, device="meta")),
        ("cls", torch.zeros(B, D, device="meta")),
    ],
)
def test_field_on_another_device_is_an_error(name, value):
    with pytest.raises(StateError, match=rf"TokenState\.{name}: on meta, but tokens are on cpu"):
        TokenState(**fields(**{name: value}))


def test_per_token_and_query_on_another_device_are_errors():
    with pytest.raises(StateError, match=r"TokenState\.per_token\['k'\]: on meta, tokens on cpu"):
        TokenState(**fields(per_token={"k": torch.zeros(B, N, device="meta")}))
    with pytest.raises(StateError, match=r"TokenState\.query_mask: on meta"):
        TokenState(**fields(query=torch.zeros(B, 2, 3), query_mask=torch.ones(B, 2, dtype=torch.bool, device="meta")))


# --------------------------------------------------------------- from_patches
def test_from_patches_raster_positions_arange_origin_unit_sizes():
    state = fresh(cls=True, score=torch.arange(B * N, dtype=torch.float32).view(B, N))
    expected_pos = torch.tensor([[r, c] for r in range(H) for c in range(W)], dtype=torch.float32)
    assert torch.equal(state.positions, expected_pos.expand(B, N, 2))
    assert torch.equal(state.origin, torch.arange(N).expand(B, N))
    assert torch.equal(state.size, torch.ones(B, N))
    assert state.size.dtype == torch.float32 and state.origin.dtype == torch.int64
    assert state.mask.all() and state.mask.dtype == torch.bool
    assert state.grid == (H, W) and state.cls.shape == (B, D)
    assert torch.equal(state.per_token["score"], torch.arange(B * N, dtype=torch.float32).view(B, N))
    state.check()


def test_from_patches_rejects_tokens_that_do_not_fill_the_grid():
    with pytest.raises(StateError, match=r"from_patches: 12 tokens do not fill a 3x5 grid \(15 patches\)"):
        TokenState.from_patches(torch.randn(B, N, D), (3, 5))
    with pytest.raises(StateError, match=r"from_patches: expected tokens \[B, N0, D\], got tensor of shape \[12, 8\]"):
        TokenState.from_patches(torch.randn(N, D), (H, W))


def test_from_patches_validates_cls_token():
    with pytest.raises(StateError, match=r"TokenState\.cls"):
        TokenState.from_patches(torch.randn(B, N, D), (H, W), cls_token=torch.randn(B, 1, D))


# ---------------------------------------------------------------------- check
def test_check_accepts_packed_ragged_state():
    state = fresh()
    index = torch.tensor([[0, 3, 5], [2, 7, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    ragged = ops.keep(state, index, valid).check()
    assert ragged.counts.tolist() == [3, 2]


def test_check_catches_non_prefix_mask():
    state = fresh()
    mask = state.mask.clone()
    mask[0, 2] = False  # a hole: real tokens are no longer a prefix
    origin = state.origin.clone()
    origin[0, 2] = -1
    bad = dataclasses.replace(state, mask=mask, origin=origin)  # construction reads no values: check() does
    with pytest.raises(StateError, match=r"TokenState\.mask: real tokens must form a prefix of each row"):
        bad.check()


def test_check_catches_non_positive_size():
    state = fresh()
    size = state.size.clone()
    size[1, 4] = 0.0
    with pytest.raises(StateError, match=r"TokenState\.size: every real token must stand for > 0 patches"):
        dataclasses.replace(state, size=size).check()


@pytest.mark.parametrize("value, match", [(N, r"values must lie in \[-1, 12\), got \[0, 12\]"),
                                          (-2, r"values must lie in \[-1, 12\), got \[-2, 11\]")])
def test_check_catches_origin_out_of_range(value, match):
    state = fresh()
    origin = state.origin.clone()
    origin[0, 0] = value
    with pytest.raises(StateError, match=r"TokenState\.origin: " + match):
        dataclasses.replace(state, origin=origin).check()


def test_check_accepts_a_state_with_no_tokens_left():
    empty = ops.keep(fresh(), torch.zeros(B, 1, dtype=torch.int64), torch.zeros(B, 1, dtype=torch.bool)).check()
    assert empty.N == 0 and (empty.origin == -1).all() and empty.token_counts() == (1, 1)


def test_check_catches_origin_pointing_at_padding():
    state = ops.keep(fresh(), torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[True] * 3, [True, True, False]]))
    origin = state.origin.clone()
    origin[1, 5] = 2  # slot 2 of image 1 is padding
    with pytest.raises(StateError, match=r"TokenState\.origin: a patch points at a padded token slot"):
        dataclasses.replace(state, origin=origin).check()


def ragged() -> TokenState:
    """Image 0 keeps 3 tokens, image 1 keeps 2 (slot 2 is padding)."""
    return ops.keep(fresh(), torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[True] * 3, [True, True, False]]))


def with_hole(state: TokenState) -> dict:
    mask = state.mask.clone()
    mask[0, 1] = False  # a hole: real tokens are no longer a prefix
    return {"mask": mask}


def origin_set(value: int, b: int = 0, patch: int = 0):
    def change(state: TokenState) -> dict:
        origin = state.origin.clone()
        origin[b, patch] = value
        return {"origin": origin}
    return change


def size_set(value: float):
    def change(state: TokenState) -> dict:
        size = state.size.clone()
        size[1, 1] = value
        return {"size": size}
    return change


@pytest.mark.parametrize("change, match", [
    (with_hole, r"TokenState\.mask: real tokens must form a prefix of each row"),
    (origin_set(3), r"TokenState\.origin: values must lie in \[-1, 3\), got \[-1, 3\]"),
    (origin_set(-5), r"TokenState\.origin: values must lie in \[-1, 3\), got \[-5, 2\]"),
    (origin_set(2, b=1, patch=5), r"TokenState\.origin: a patch points at a padded token slot"),
    (size_set(0.0), r"TokenState\.size: every real token must stand for > 0 patches"),
    (size_set(float("nan")), r"TokenState\.size: every real token must stand for > 0 patches \(a finite number\)"),
    (size_set(float("inf")), r"TokenState\.size: every real token must stand for > 0 patches \(a finite number\)"),
])
def test_replace_checks_the_values_of_hand_made_bookkeeping(change, match):
    """``replace(mask=...)``, ``(origin=...)``, ``(size=...)`` are refused at once, not at the next check()."""
    state = ragged()
    with pytest.raises(StateError, match=match):
        state.replace(**change(state))


def test_replace_accepts_consistent_bookkeeping():
    state = ragged()
    mask = state.mask.clone()
    mask[0, 2] = False  # image 0 drops its last token: still a prefix ...
    origin = state.origin.clone()
    origin[0][origin[0] == 2] = -1  # ... and no patch points at it
    out = state.replace(mask=mask, origin=origin)
    assert out.counts.tolist() == [2, 2]
    out.check()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_catches_non_finite_real_tokens_and_class_token(value):
    state = ragged()
    tokens = state.tokens.clone()
    tokens[1, 1, 3] = value
    with pytest.raises(NonFiniteStateError, match=r"^TokenState: NaN or inf in real tokens of images \[1\]; tokens "
                                                  r"must be finite$") as caught:
        dataclasses.replace(state, tokens=tokens).check()
    assert caught.value.images == [1] and isinstance(caught.value, StateError)
    cls = state.cls.clone()
    cls[0, 0] = value
    with pytest.raises(NonFiniteStateError, match=r"NaN or inf in the class token;") as caught:
        dataclasses.replace(state, cls=cls).check()
    assert caught.value.images == []
    with pytest.raises(NonFiniteStateError, match=r"NaN or inf in real tokens of images \[1\] and the class token"):
        dataclasses.replace(state, tokens=tokens, cls=cls).check()
    padded = state.tokens.clone()
    padded[1, 2] = value  # slot 2 of image 1 is padding: anything may be there
    dataclasses.replace(state, tokens=padded).check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("at", [0, D - 1])
def test_non_finite_values_are_found_in_any_dtype_and_channel(dtype, at):
    for value in (float("nan"), float("inf"), -float("inf")):
        tokens = torch.randn(B, N, D).to(dtype)
        tokens[0, 7, at] = value
        with pytest.raises(NonFiniteStateError, match=r"NaN or inf in real tokens of images \[0\]"):
            TokenState.from_patches(tokens, (H, W)).check()
    TokenState.from_patches(torch.zeros(B, N, 0, dtype=dtype), (H, W)).check()  # no channel: nothing to check


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_from_patches_reads_no_values_and_check_refuses_non_finite_ones(value):
    """Construction never syncs the device; the pipeline's check after the encoder is where NaN is caught."""
    tokens = torch.randn(B, N, D)
    tokens[1, 5, 0] = value
    state = TokenState.from_patches(tokens, (H, W))
    with pytest.raises(NonFiniteStateError, match=r"^TokenState: NaN or inf in real tokens of images \[1\]"):
        state.check()
    cls = torch.randn(B, D)
    cls[0, 1] = value
    with pytest.raises(NonFiniteStateError, match=r"^TokenState: NaN or inf in the class token"):
        TokenState.from_patches(torch.randn(B, N, D), (H, W), cls_token=cls).check()


# ------------------------------------------------------------------- copying
def test_state_is_immutable_and_per_token_read_only():
    state = fresh(score=torch.zeros(B, N))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.tokens = torch.zeros(B, N, D)  # type: ignore[misc]
    with pytest.raises(TypeError):
        state.per_token["new"] = torch.zeros(B, N)  # type: ignore[index]


def test_with_per_token_adds_replaces_and_validates():
    state = fresh(a=torch.zeros(B, N))
    out = state.with_per_token(a=torch.ones(B, N), b=torch.full((B, N, 3), 2.0))
    assert set(out.per_token) == {"a", "b"}
    assert torch.equal(out.per_token["a"], torch.ones(B, N))
    assert torch.equal(state.per_token["a"], torch.zeros(B, N))  # the original is untouched
    assert out.tokens is state.tokens
    with pytest.raises(StateError, match=r"per_token\['c'\]"):
        state.with_per_token(c=torch.zeros(B, N + 1))


def test_replace_validates_and_keeps_other_fields():
    state = fresh()
    tokens = torch.zeros(B, N, D)
    out = state.replace(tokens=tokens)
    assert out.tokens is tokens and out.size is state.size and out.cls is state.cls
    with pytest.raises(StateError, match=r"TokenState\.mask"):
        state.replace(tokens=torch.zeros(B, N + 1, D))
    assert state.with_meta(x=1).meta["x"] == 1 and "x" not in state.meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_to_dtype_moves_token_valued_fields_only(dtype):
    state = fresh().replace(query=torch.randn(B, 2, 5), query_mask=torch.ones(B, 2, dtype=torch.bool))
    out = state.to(dtype=dtype)
    assert out.tokens.dtype == dtype and out.cls.dtype == dtype and out.query.dtype == dtype
    assert out.size.dtype == torch.float32 and out.positions.dtype == torch.float32
    assert out.origin.dtype == torch.int64 and out.mask.dtype == torch.bool
    torch.testing.assert_close(out.tokens.float(), state.tokens.to(dtype).float())
    assert out.to(device="cpu").tokens.device.type == "cpu"


def test_token_counts_include_the_class_token():
    state = ops.keep(fresh(cls=True), torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0]]),
                     torch.tensor([[True] * 4, [True, True, False, False]]))
    assert state.counts.tolist() == [4, 2]
    assert state.token_counts() == (5, 3)
    no_cls = state.replace(cls=None)
    assert no_cls.token_counts() == (4, 2)


def test_image_is_one_trimmed_row_of_a_ragged_batch():
    state = TokenState.from_patches(torch.randn(2, 6, 4), (2, 3), cls_token=torch.randn(2, 4),
                                    per_token={"score": torch.arange(12.0).view(2, 6)})
    index = torch.tensor([[0, 2, 4], [1, 5, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    ragged = ops.keep(state, index, valid)
    second = ragged.image(1).check()
    assert second.B == 1 and second.N == 2 and second.token_counts() == (3,)
    assert torch.equal(second.tokens[0], state.tokens[1, [1, 5]])
    assert torch.equal(second.per_token["score"][0], torch.tensor([7.0, 11.0]))
    assert torch.equal(second.cls[0], state.cls[1])
    assert second.origin[0].tolist() == [-1, 0, -1, -1, -1, 1]
    assert torch.equal(ragged.image(-2).tokens, ragged.image(0).tokens)
    with pytest.raises(StateError, match="index 2 out of range for a batch of 2"):
        ragged.image(2)


def test_image_keeps_its_own_question_text():
    """``meta['query_text']`` holds one string per row: the image alone gets its own (a stage reading it, e.g.
    cdpruner's clip, checks one string per row), and ops that move tokens keep it."""
    state = TokenState.from_patches(torch.randn(3, 6, 4), (2, 3)).with_meta(query_text=("a cat", "a dog", "a mat"),
                                                                            views=[(1, 2)])
    index = torch.tensor([[0, 2, 4], [1, 5, 0], [3, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    ragged = ops.keep(state, index, valid)
    assert ragged.meta["query_text"] == ("a cat", "a dog", "a mat")
    merged = ops.merge(ragged, torch.tensor([[1], [1], [0]]), torch.tensor([[0], [0], [0]]),
                       torch.tensor([[True], [True], [False]]))
    assert merged.meta["query_text"] == ("a cat", "a dog", "a mat")
    assert [ragged.image(b).meta["query_text"] for b in range(3)] == [("a cat",), ("a dog",), ("a mat",)]
    assert ragged.image(-1).meta["query_text"] == ("a mat",)
    assert ragged.image(1).meta["views"] == [(1, 2)]  # other meta: as it is
    assert "query_text" not in ragged.replace(meta={}).image(0).meta


# ------------------------------------------------------------------ LLMContext
def _llm_state(B: int = 2, N: int = 5) -> TokenState:
    from arrcoc.state import LLMContext

    state = TokenState.from_patches(torch.randn(B, N, 4), (1, N))
    context = LLMContext(layer=2, num_layers=4, input_visual_counts=torch.tensor([N, N - 2]),
                         input_visual=torch.randn(B, N, 4), input_visual_mask=torch.ones(B, N, dtype=torch.bool),
                         visual_columns=torch.arange(N).expand(B, N) + 3, sequence_mask=torch.ones(B, N + 6, dtype=torch.bool))
    mask = torch.arange(N)[None] < torch.tensor([[N], [N - 2]])
    return ops.keep(state, torch.arange(N).expand(B, N), mask).replace(llm=context)


def test_llm_context_follows_image_and_to():
    state = _llm_state()
    one = state.image(1)
    assert one.llm.layer == 2 and one.llm.num_layers == 4
    assert one.llm.input_visual_counts.tolist() == [3]
    assert torch.equal(one.llm.input_visual, state.llm.input_visual[1:2])
    assert one.llm.visual_columns.tolist() == [[3, 4, 5]]  # trimmed to the prompt's real visual tokens
    assert one.llm.sequence_mask.shape == (1, 11)
    half = state.to(dtype=torch.float64)
    assert half.llm.input_visual.dtype == torch.float64 and half.llm.visual_columns.dtype == torch.int64
    assert state.to("cpu").llm.layer == 2


def test_llm_context_require_and_type_are_checked():
    from arrcoc.errors import MissingInputError

    state = _llm_state()
    assert state.llm.require("input_visual", "here") is state.llm.input_visual
    with pytest.raises(MissingInputError, match=r"here: state.llm.attn_logits is missing.*'attn_logits'"):
        state.llm.require("attn_logits", "here")
    with pytest.raises(MissingInputError, match=r"state.llm.text_mask is missing.*'attn_from_text'"):
        state.llm.require("text_mask", "here")
    with pytest.raises(StateError, match="TokenState.llm: expected an LLMContext or None, got dict"):
        state.replace(llm={"layer": 2})


def test_states_the_ops_build_are_valid_frozen_states_like_a_validated_construction():
    # Ops build their output with TokenState._derive (no second validation); it must be the state a validated
    # construction of the same parts gives: same fields, frozen, read-only per_token, the input untouched.
    state = fresh(score=torch.arange(B * N, dtype=torch.float32).view(B, N), keys=torch.randn(B, N, 3))
    index = torch.tensor([[5, 1, 7], [0, 11, 2]])
    out = ops.keep(state, index)
    rebuilt = TokenState(**{f.name: getattr(out, f.name) for f in dataclasses.fields(TokenState)})  # validates
    for f in dataclasses.fields(TokenState):
        if f.name == "per_token":
            assert out.per_token.keys() == rebuilt.per_token.keys() == {"score", "keys"}
            assert all(torch.equal(out.per_token[k], rebuilt.per_token[k]) for k in out.per_token)
        elif isinstance(getattr(out, f.name), torch.Tensor):
            assert torch.equal(getattr(out, f.name), getattr(rebuilt, f.name)), f.name
        else:
            assert getattr(out, f.name) == getattr(rebuilt, f.name), f.name
    assert torch.equal(out.per_token["score"], torch.tensor([[5.0, 1.0, 7.0], [12.0, 23.0, 14.0]]))
    assert out.check() is out
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.tokens = torch.zeros(B, 3, D)  # type: ignore[misc]
    with pytest.raises(TypeError):
        out.per_token["new"] = torch.zeros(B, 3)  # type: ignore[index]
    assert state.N == N and set(state.per_token) == {"score", "keys"}  # the input is untouched
    # every public construction still validates, an op's output included
    with pytest.raises(StateError, match="TokenState.size"):
        dataclasses.replace(out, size=torch.ones(B, N))
    with pytest.raises(StateError, match=r"per_token\['bad'\]"):
        out.with_per_token(bad=torch.zeros(B, N))
