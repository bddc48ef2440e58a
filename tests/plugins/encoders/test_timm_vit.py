"""timm_vit encoder against timm itself and hand-computed attention.

Tiny random models (depth 2-3) keep each test fast; every reference runs the
model's own modules (``model.forward_features``, ``blk(x)``, the block's
``qkv`` projection) so the encoder is compared with timm, not with itself.
"""

from __future__ import annotations

import pytest
import torch

import arrcoc
from arrcoc.errors import MissingInputError, ModelError, ParamsError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Params
from arrcoc.registry import Registry, using_registry

TINY = "vit_tiny_patch16_224"


def encoder(**params):
    params.setdefault("model", TINY)
    params.setdefault("model_kwargs", {"depth": 2})
    return arrcoc.create("encoder", "timm_vit", **params)


def pixels(B: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def embed(model, x):
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def manual_attention(blk, x):
    """Per-head ``softmax(q k^T * scale)`` of a timm Block on its input ``x``, and the keys."""
    attn, h = blk.attn, blk.norm1(x)
    B, N, C = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1), k


# ------------------------------------------------------- equality with timm
@pytest.mark.parametrize(
    "model_kwargs",
    [
        {"depth": 2},                                                # class token
        {"depth": 2, "class_token": False, "global_pool": "avg"},   # no class token
        {"depth": 2, "init_values": 0.1, "qk_norm": True},          # layer scale + qk-norm
    ],
)
@pytest.mark.parametrize("outputs", [frozenset(), frozenset({"keys", "cls_attention"})])
def test_last_layer_with_norm_equals_forward_features(model_kwargs, outputs):
    enc = encoder(model_kwargs=model_kwargs, layer=-1, norm=True)
    # with outputs the encoder runs its own attention instead of blk(x): it must not change the tokens
    enc.configure(outputs & enc.provides)
    x = pixels()
    with torch.no_grad():
        state = enc.encode(x).check()
        ref = enc.model.forward_features(x)
    P = enc.prefix
    assert P == (0 if model_kwargs.get("class_token") is False else 1)
    assert state.tokens.shape == (2, 196, 192) and state.grid == (14, 14)
    torch.testing.assert_close(state.tokens, ref[:, P:], atol=1e-5, rtol=1e-5)
    if P:
        torch.testing.assert_close(state.cls, ref[:, 0], atol=1e-5, rtol=1e-5)
    else:
        assert state.cls is None
    assert state.meta["num_heads"] == 3


def test_layer_minus_two_equals_blocks_by_hand():
    enc = encoder(model_kwargs={"depth": 3}, layer=-2, norm=False)
    x = pixels()
    with torch.no_grad():
        state = enc.encode(x)
        h = embed(enc.model, x)
        for blk in enc.model.blocks[:-1]:
            h = blk(h)
    torch.testing.assert_close(state.tokens, h[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.cls, h[:, 0], atol=1e-5, rtol=1e-5)
    # norm: true applies the final norm to the same hidden states
    with torch.no_grad():
        normed = encoder(model_kwargs={"depth": 3}, layer=1, norm=True).encode(x)
    torch.testing.assert_close(normed.tokens, enc.model.norm(h)[:, 1:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------ attention and keys
def test_cls_attention_and_keys_equal_manual_computation():
    enc = encoder(model_kwargs={"depth": 3}, layer=1)
    enc.configure(frozenset({"cls_attention", "keys"}))
    x = pixels()
    with torch.no_grad():
        state = enc.encode(x)
        h = enc.model.blocks[0](embed(enc.model, x))
        weights, k = manual_attention(enc.model.blocks[1], h)
    cls_attn = state.per_token["cls_attn"]
    assert cls_attn.shape == (2, 196)
    torch.testing.assert_close(cls_attn, weights[:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    # a softmax row over 197 keys, of which the class token's own column is left out
    assert bool((cls_attn.sum(1) < 1).all()) and bool((cls_attn > 0).all())
    torch.testing.assert_close(state.per_token["keys"], k.mean(1)[:, 1:], atol=1e-5, rtol=1e-5)
    assert state.per_token["keys"].shape == (2, 196, 64)


@pytest.mark.parametrize("layer, attention_layer", [(1, 1), (0, 1)])
def test_single_head_full_width_cls_attention(layer, attention_layer):
    # cls_attention_heads: single = one head over the full width (PruMerge's q_proj / k_proj attention)
    enc = encoder(model_kwargs={"depth": 2}, layer=layer, attention_layer=attention_layer, cls_attention_heads="single")
    enc.configure(frozenset({"cls_attention", "keys"}))
    x = pixels()
    with torch.no_grad():
        state = enc.encode(x)
        h = embed(enc.model, x)
        for blk in enc.model.blocks[:attention_layer]:
            h = blk(h)
        blk = enc.model.blocks[attention_layer]
        q, k, _ = blk.attn.qkv(blk.norm1(h)).chunk(3, dim=-1)  # heads concatenated: [B, N, C]
        weights = ((q[:, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    torch.testing.assert_close(state.per_token["cls_attn"], weights[:, 0, 1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.per_token["keys"], k[:, 1:], atol=1e-5, rtol=1e-5)


def test_nothing_is_computed_unless_configured():
    state = encoder(layer=-1).encode(pixels(1))
    assert dict(state.per_token) == {}
    assert "attention_maps" not in state.meta


def test_attention_layer_may_be_the_next_block():
    # PruMerge: hidden states of block 0, CLS attention of block 1 over them
    enc = encoder(model_kwargs={"depth": 3}, layer=0, attention_layer=1)
    enc.configure(frozenset({"cls_attention", "keys"}))
    x = pixels()
    with torch.no_grad():
        state = enc.encode(x)
        h = enc.model.blocks[0](embed(enc.model, x))
        weights, k = manual_attention(enc.model.blocks[1], h)
    torch.testing.assert_close(state.tokens, h[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.per_token["cls_attn"], weights[:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.per_token["keys"], k.mean(1)[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match=r"attention of block 2 is asked for, but the encoder stops after block 0"):
        encoder(model_kwargs={"depth": 3}, layer=0, attention_layer=2)


def test_extra_attention_layers():
    enc = encoder(model_kwargs={"depth": 3}, layer=-1, extra_attention_layers=[0, -2])
    enc.configure(frozenset({"cls_attention"}))
    x = pixels()
    with torch.no_grad():
        state = enc.encode(x)
        h = embed(enc.model, x)
        expected = {}
        for i, blk in enumerate(enc.model.blocks):
            expected[i] = manual_attention(blk, h)[0][:, :, 0, 1:].mean(1)
            h = blk(h)
    assert set(state.per_token) == {"cls_attn", "cls_attn@0", "cls_attn@1"}
    torch.testing.assert_close(state.per_token["cls_attn@0"], expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.per_token["cls_attn@1"], expected[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.per_token["cls_attn"], expected[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.tokens, h[:, 1:], atol=1e-5, rtol=1e-5)  # layer -1, no norm


def test_attention_maps_in_meta():
    enc = encoder(model_kwargs={"depth": 2, "img_size": 64}, layer=-1)
    enc.configure(frozenset({"attention_maps"}))
    x = pixels(size=64)
    with torch.no_grad():
        state = enc.encode(x)
        h = embed(enc.model, x)
        expected = []
        for blk in enc.model.blocks:
            expected.append(manual_attention(blk, h)[0].mean(1))
            h = blk(h)
    maps = state.meta["attention_maps"]
    assert len(maps) == 2 and state.meta["num_prefix_tokens"] == 1 and state.meta["num_heads"] == 3
    for got, want in zip(maps, expected):
        assert got.shape == (2, 17, 17)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 17))
    torch.testing.assert_close(state.tokens, h[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match=r"attention_maps .* cannot be combined with in_blocks"):
        encoder(in_blocks={"use": "tome", "r": 2}).configure(frozenset({"attention_maps"}))


# -------------------------------------------------------------- weights
def test_checkpoint_loads_into_a_differently_seeded_model(tmp_path):
    import timm

    torch.manual_seed(123)
    source = timm.create_model(TINY, depth=2).eval()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    x = pixels()
    loaded = encoder(checkpoint=str(path), seed=7, layer=-1, norm=True)
    other = encoder(seed=7, layer=-1, norm=True)
    with torch.no_grad():
        ref = source.forward_features(x)
        got, unloaded = loaded.encode(x), other.encode(x)
    torch.testing.assert_close(got.tokens, ref[:, 1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unloaded.tokens, ref[:, 1:], atol=1e-3)
    # a checkpoint of another architecture is a ModelError naming both
    torch.save(timm.create_model(TINY, depth=3).state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ModelError, match=r"cannot load checkpoint .*deeper\.pth.* into 'vit_tiny_patch16_224'"):
        encoder(checkpoint=str(tmp_path / "deeper.pth"))


def test_seed_makes_random_weights_reproducible():
    x = pixels(1)
    with torch.no_grad():
        a, b = encoder(seed=3).encode(x), encoder(seed=3).encode(x)
        c = encoder(seed=4).encode(x)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_runs_and_is_close_to_float32(dtype):
    x = pixels(1, size=64)
    kwargs = dict(model_kwargs={"depth": 2, "img_size": 64}, layer=-1, norm=True)
    low, high = encoder(dtype=dtype, **kwargs), encoder(**kwargs)
    low.configure(frozenset({"cls_attention", "keys"}))
    with torch.no_grad():
        state = low.encode(low.preprocess(x.sigmoid()))
        ref = high.encode(high.preprocess(x.sigmoid()))
    torch_dtype = getattr(torch, dtype)
    assert state.tokens.dtype == torch_dtype and state.cls.dtype == torch_dtype
    assert state.per_token["cls_attn"].dtype == torch_dtype
    torch.testing.assert_close(state.tokens.float(), ref.tokens, atol=0.1, rtol=0.05)


def test_preprocess_resizes_and_normalises():
    enc = encoder(model_kwargs={"depth": 1, "img_size": 64}, layer=-1)
    out = enc.preprocess(torch.full((1, 3, 128, 96), 0.5))
    assert out.shape == (1, 3, 64, 64)
    mean = torch.tensor(enc.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(enc.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ((0.5 - mean) / std).expand(1, 3, 64, 64))
    assert enc.input_size == (64, 64) and enc.grid == (4, 4) and enc.input_tokens() == 17 and enc.embed_dim == 192


# ----------------------------------------------------------------- errors
def test_unknown_model_suggests_the_nearest():
    with pytest.raises(ParamsError, match=r"unknown timm model 'vit_tiny_patch16_22' \(did you mean 'vit_tiny_patch16_224'\?\)"):
        encoder(model="vit_tiny_patch16_22")


@pytest.mark.parametrize("field, value", [("layer", 2), ("layer", -3), ("attention_layer", 5), ("extra_attention_layers", [7])])
def test_layer_out_of_range(field, value):
    name = field
    with pytest.raises(ModelError, match=rf"timm_vit: {name}={value if not isinstance(value, list) else value[0]} is out of range "
                                         r"for 'vit_tiny_patch16_224' with 2 blocks \(valid: -2\.\.1\)"):
        encoder(**{field: value})


def test_missing_checkpoint_and_unknown_kwargs():
    with pytest.raises(ParamsError, match=r"checkpoint file '/nonexistent/w\.pth' does not exist"):
        encoder(checkpoint="/nonexistent/w.pth")
    with pytest.raises(ModelError, match=r"timm_vit: cannot create 'vit_tiny_patch16_224' \(TypeError"):
        encoder(model_kwargs={"depth": 2, "no_such_kwarg": 1})
    with pytest.raises(ParamsError, match=r"unknown parameter \(did you mean 'layer'\?\)"):
        encoder(layers=-1)


class _NeedsCls(Compressor):
    """A test compressor that needs the CLS attention."""

    name = "needs_cls_test"
    Params = Params
    needs = frozenset({"cls_attention"})

    def __call__(self, state):
        return state


class _TestPlugins:
    @staticmethod
    @hookimpl
    def arrcoc_register_plugins(register):
        register(_NeedsCls)


@pytest.fixture
def registry_with_test_plugin():
    registry = Registry()
    registry.register(_TestPlugins(), name="needs_cls_test")
    with using_registry(registry):
        yield registry


def test_cls_attention_on_a_model_without_class_token_is_a_missing_input(registry_with_test_plugin):
    spec = {
        "encoder": {"use": "timm_vit", "model": TINY, "layer": -1, "model_kwargs": {"depth": 1, "img_size": 32,
                    "class_token": False, "global_pool": "avg"}},
        "compress": [{"use": "needs_cls_test"}],
    }
    with pytest.raises(MissingInputError, match=r"compress\[0\] \(needs_cls_test\) needs 'cls_attention'.*has no class token"):
        arrcoc.load_pipeline(spec, device="cpu")
    # with a class token the same pipeline builds, and the encoder is told to compute the CLS attention
    spec["encoder"]["model_kwargs"] = {"depth": 1, "img_size": 32}
    pipeline = arrcoc.load_pipeline(spec, device="cpu")
    assert pipeline.encoder.outputs == frozenset({"cls_attention"})
    state = pipeline(torch.rand(1, 3, 32, 32))
    assert state.per_token["cls_attn"].shape == (1, 4)


def test_in_blocks_compressor_needing_more_than_keys_is_refused_when_built():
    with pytest.raises(ModelError, match=r"in_blocks 'prumerge' needs \['cls_attention'\], which is not available"):
        arrcoc.create("encoder", "timm_vit", model="vit_tiny_patch16_224", model_kwargs={"depth": 2},
                      in_blocks={"use": "prumerge"})


@pytest.mark.parametrize(
    ("model_kwargs", "layer", "r", "expected"),
    [
        ({"depth": 2}, -1, [1, 1, 1], "r has 3 entries, one per block, but 'vit_tiny_patch16_224' runs 2 blocks; "
                                      "the entries past the first 2 would never apply"),
        ({"depth": 3}, -2, [1, 1, 1], "r has 3 entries, one per block, but 'vit_tiny_patch16_224' runs 2 blocks of "
                                      "its 3 (layer=-2 stops after block 1); the entries past the first 2 would "
                                      "never apply"),
    ],
)
def test_an_in_blocks_schedule_longer_than_the_blocks_that_run_is_refused(model_kwargs, layer, r, expected):
    with pytest.raises(ModelError) as info:
        encoder(model_kwargs=model_kwargs, layer=layer, in_blocks={"use": "tome", "r": r})
    assert str(info.value) == f"timm_vit: in_blocks 'tome': {expected}"
    assert encoder(model_kwargs=model_kwargs, layer=layer, in_blocks={"use": "tome", "r": r[:-1]}).in_blocks


class RoundsParams(Params):
    keep: list[int] = [1, 1, 1]
    per_layer: list[int] = [0]


class Rounds(Compressor):
    """Lists that are rounds, not a per-block schedule, in a compressor that overrides in_block."""

    name = "rounds_test"
    Params = RoundsParams

    def __call__(self, state):
        return state

    def in_block(self, state, layer, num_layers):
        return state


class PerLayer(Rounds):
    """The same, saying that only ``per_layer`` is per block."""

    name = "per_layer_test"
    per_block_params = frozenset({"per_layer"})


class _Schedules:
    @staticmethod
    @hookimpl
    def arrcoc_register_plugins(register):
        register(Rounds)
        register(PerLayer)


def test_a_compressor_says_which_params_are_per_block():
    registry = Registry()
    registry.register(_Schedules(), name="schedules")
    with using_registry(registry):
        with pytest.raises(ModelError, match=r"in_blocks 'rounds_test': keep has 3 entries, one per block, but"):
            encoder(in_blocks={"use": "rounds_test"})  # by default every list of a class overriding in_block
        assert encoder(in_blocks={"use": "per_layer_test"}).in_blocks.block_schedules() == {"per_layer": [0]}
        with pytest.raises(ModelError, match=r"in_blocks 'per_layer_test': per_layer has 3 entries"):
            encoder(in_blocks={"use": "per_layer_test", "per_layer": [1, 2, 3]})
