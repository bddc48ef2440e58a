"""The in-LLM signals of DART and PyramidDrop inside a tiny LLaVA: ``key_norms``, ``normed_hidden``,
``attn_from_last_here``, the prompt positions in ``state.llm``, and the ``shifted`` decode positions.

A capturing stage (registered for this file only) records the state the engine hands it; each signal is then
recomputed by hand, for one unpadded prompt, from the model's modules on the no-cache reference's sequence
(``test_hf_llm_methods.reference_pass``: what each layer saw, written from the method descriptions, not from
arrcoc's code).  Batch: the 3 left-padded prompts of ``test_hf_llm_methods`` (lengths 73, 76, 72).
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch

transformers = pytest.importorskip("transformers")

import arrcoc  # noqa: E402
from arrcoc import ops  # noqa: E402
from arrcoc.hookspecs import hookimpl  # noqa: E402
from arrcoc.plugin import LLMCompressor, Params  # noqa: E402
from arrcoc.registry import get_registry  # noqa: E402
from test_hf_llm_methods import (  # noqa: E402
    ENC, NEW, first_image, forward_logits, generate, prompt, reference, reference_pass,
)
from test_hf_support_matrix import FAMILIES  # noqa: E402
from tiny_models import (  # noqa: E402
    IMAGE, N0, PAD, ROWS, llava_batch, llava_row, reference_attention, rotate_half, tiny_llava,
)

CAPTURED: list = []


class CaptureParams(Params):
    layers: list[int] = [2]
    keep: Literal["all", "even", "even_first_row"] = "all"
    positions: Literal["original", "compact"] = "original"
    decode_positions: Literal["unpruned", "shifted"] = "unpruned"
    mode: Literal["remove", "mask"] = "remove"


class _Capture(LLMCompressor):
    """Records its input state; keeps every visual token, or those at even visual indices (of every row, or of the
    first row only)."""

    Params = CaptureParams

    def llm_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.params.layers)

    def __call__(self, state):
        CAPTURED.append(state)
        if self.params.keep == "all":
            return state
        rank = torch.arange(state.N, device=state.device).expand(state.B, state.N)
        drop = rank % 2 == 1
        if self.params.keep == "even_first_row":  # a ragged cut: the other rows keep every token
            drop &= torch.arange(state.B, device=state.device)[:, None] == 0
        index, valid = ops.pack(state.mask & ~drop)
        return ops.keep(state, index, valid)


class CaptureKeys(_Capture):
    name = "test_signals_keys"
    needs = frozenset({"key_norms", "normed_hidden"})


class CaptureHere(_Capture):
    name = "test_signals_here"
    needs = frozenset({"attn_from_last_here"})


class CaptureAll(_Capture):
    name = "test_signals_all"
    needs = frozenset({"key_norms", "normed_hidden", "attn_from_last_here"})


class CaptureLast(_Capture):
    name = "test_signals_last"
    needs = frozenset({"attn_from_last", "attn_from_last_here"})


class _Plugins:
    @hookimpl
    def arrcoc_register_plugins(self, register):
        register(CaptureKeys)
        register(CaptureHere)
        register(CaptureAll)
        register(CaptureLast)


@pytest.fixture(scope="module", autouse=True)
def plugins():
    registry = get_registry()
    registry.register(_Plugins(), name="test_hf_llm_signals")
    try:
        yield
    finally:
        registry.unregister("test_hf_llm_signals")


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(ROWS)


@pytest.fixture(scope="module")
def features(model, batch3):
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output)


def spec(use: str, **params) -> dict:
    return {"encoder": ENC, "llm": [{"use": use, **params}]}


def captured(model, batch3, pipeline: dict) -> list:
    CAPTURED.clear()
    with torch.no_grad(), arrcoc.hf.apply(model, pipeline):
        forward_logits(model, batch3)
    return list(CAPTURED)


def _unpadded(batch3, b: int) -> tuple[torch.Tensor, int]:
    ids = prompt(batch3, b)
    return ids, first_image(ids)


@torch.no_grad()
def _keys(attn, x: torch.Tensor, pos: torch.Tensor, rotary) -> torch.Tensor:
    """Post-rotary keys of one sequence ``x`` ``[S, D]``, key heads repeated, heads concatenated: ``[S, H*d]``."""
    S, hd = x.shape[0], attn.head_dim
    cos, sin = rotary(x[None], pos[None])
    k = attn.k_proj(x).view(1, S, -1, hd).transpose(1, 2)
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(attn.config.num_attention_heads // k.shape[1], 1)
    return k[0].transpose(0, 1).reshape(S, -1)


def test_key_norms_and_normed_hidden_equal_the_layer_before(model, batch3, features):
    """At layer 2: ``key_norms`` are the L1 norms of layer 1's post-rotary keys (heads concatenated), for the
    visual tokens and the text after the image; ``normed_hidden`` is layer 1's output through the final norm;
    positions count each prompt's own tokens from 0."""
    (state,) = captured(model, batch3, spec("test_signals_keys", layers=[2]))
    lm = model.model.language_model
    llm = state.llm
    assert llm.layer == 2 and llm.num_layers == 4
    for b in range(3):
        ids, start = _unpadded(batch3, b)
        _, seen = reference_pass(model, ids, features[b], ids.shape[0], {}, {})
        seq1 = seen["inputs"][1]
        keys = _keys(lm.layers[1].self_attn, lm.layers[1].input_layernorm(seq1["h"]), seq1["pos"], lm.rotary_emb)
        norms = keys.abs().sum(-1)
        out1 = seen["inputs"][2]["h"]  # layer 1's output = layer 2's input
        n, after = int((ids == IMAGE).sum()), torch.arange(start + N0, ids.shape[0])
        visual = torch.arange(start, start + n)
        assert n == N0 and int(state.counts[b]) == N0
        torch.testing.assert_close(state.per_token["key_norms"][b, :n], norms[visual].float(), rtol=1e-6, atol=0)
        T = after.numel()
        assert llm.text_mask[b].sum() == T and bool(llm.text_mask[b, :T].all())
        torch.testing.assert_close(llm.text_key_norms[b, :T], norms[after].float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(state.per_token["normed_hidden"][b, :n], lm.norm(out1[visual]),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(llm.text_normed_hidden[b, :T], lm.norm(out1[after]), rtol=1e-10, atol=1e-12)
        assert llm.visual_positions[b, :n].tolist() == visual.tolist()
        assert llm.text_positions[b, :T].tolist() == after.tolist()
    # Padding rows hold zeros, not a neighbour's values.
    pads = ~llm.text_mask
    assert pads.any() and float(llm.text_key_norms[pads].abs().sum()) == 0.0
    assert float(llm.text_normed_hidden[pads].abs().sum()) == 0.0


@torch.no_grad()
def _attention_here(layer, seq: dict, rotary) -> torch.Tensor:
    """Head-mean attention of the last token over one sequence, computed with ``layer``'s own norm and q/k."""
    x = layer.input_layernorm(seq["h"])[None]
    cos, sin = rotary(x, seq["pos"][None])
    n = x.shape[1]
    allowed = (torch.ones(n, n, dtype=torch.bool).tril() & seq["alive"][None, :])[None]
    _, probs, _ = reference_attention(layer.self_attn, x, cos, sin, allowed)
    return probs[0, :, -1].mean(0)


def _even_plan(seen: dict, a: int) -> list[list[int]]:
    src = seen["inputs"][a]["src"][seen["inputs"][a]["visual"]]
    return [[int(s)] for s in src[::2]]


def test_attn_from_last_here_is_the_acting_layer_attention(model, batch3, features):
    """At layers 1 and 3 (the first stage drops every other visual token, compact): ``attn_from_last_here`` is
    the attention of layer a itself (its input norm, q/k, rotary at the positions it sees now), last row,
    head mean, over the sequence as it reaches layer a."""
    states = captured(model, batch3, spec("test_signals_here", layers=[1, 3], keep="even", positions="compact"))
    assert [s.llm.layer for s in states] == [1, 3]
    lm = model.model.language_model
    for b in range(3):
        ids, _ = _unpadded(batch3, b)
        plans: dict = {}
        acts = {1: (_even_plan, "remove", "compact"), 3: (_even_plan, "remove", "compact")}
        _, seen = reference_pass(model, ids, features[b], ids.shape[0], acts, plans)
        for state, a in zip(states, (1, 3)):
            seq = seen["inputs"][a]
            row = _attention_here(lm.layers[a], seq, lm.rotary_emb)
            expected = row[seq["visual"]]
            n = int(state.counts[b])
            assert n == expected.numel()
            torch.testing.assert_close(state.per_token["attn_from_last_here"][b, :n], expected.float(),
                                       rtol=1e-6, atol=1e-9)


def test_probing_changes_nothing(model, batch3):
    """A stage that reads ``attn_from_last_here`` and keeps everything: logits and greedy generation are the
    model's own, bit for bit (the probe writes no cache and the layer runs as without it)."""
    with torch.no_grad():
        logits = forward_logits(model, batch3)
        tokens, steps = generate(model, batch3)
    with arrcoc.hf.apply(model, spec("test_signals_here", layers=[2])):
        with torch.no_grad():
            assert torch.equal(forward_logits(model, batch3), logits)
            got_tokens, got_steps = generate(model, batch3)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_steps, steps)


@pytest.mark.parametrize("decode", ["unpruned", "shifted"])
def test_decode_positions_after_a_compact_drop(model, batch3, features, decode):
    """Drop every other visual token at layer 2, compact; decoding numbers new tokens from the unpruned prompt
    length (``unpruned``) or that minus the dropped tokens (``shifted``, PyramidDrop's rule) at layers >= 2.
    Equal to the no-cache reference with the new tokens numbered that way."""
    with arrcoc.hf.apply(model, spec("test_signals_here", layers=[2], keep="even", positions="compact",
                                     decode_positions=decode)):
        tokens, steps = generate(model, batch3)
    for b in range(3):
        ids, _ = _unpadded(batch3, b)
        rule = "compact_shifted" if decode == "shifted" else "compact"
        ref = reference(model, ids, features[b], {2: (_even_plan, "remove", rule)})
        assert torch.equal(tokens[b], ref["tokens"]), (b, tokens[b], ref["tokens"])
        torch.testing.assert_close(steps[b], ref["steps"], rtol=0, atol=1e-6, check_dtype=False)  # generate: fp32
    if decode == "shifted":  # the rule matters here: the unpruned numbering gives other logits
        ids, _ = _unpadded(batch3, 0)
        other = reference(model, ids, features[0], {2: (_even_plan, "remove", "compact")})
        assert (other["steps"][1:].float() - steps[0][1:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_signals_in_every_family(family):
    """LLaVA-1.5, LLaVA-NeXT and Qwen2-VL (multimodal rotary), batch 2 with different images and prompt lengths:
    the three signals reach the stage with their shapes, the probed row is a distribution over the sequence
    (its visual part sums to at most 1), and a stage that keeps everything leaves the logits bit-identical."""
    model, batch, _ = FAMILIES[family]()
    with torch.no_grad():
        logits = model(**batch).logits
    CAPTURED.clear()
    with torch.no_grad(), arrcoc.hf.apply(model, spec("test_signals_all", layers=[1])):
        got = model(**batch).logits
    assert torch.equal(got, logits)
    (state,) = CAPTURED
    B, N = state.mask.shape
    here = state.per_token["attn_from_last_here"]
    assert B == 2 and here.shape == (B, N) and here.dtype == torch.float32
    assert bool((here[state.mask] > 0).all()) and bool((here.sum(1) <= 1 + 1e-5).all())
    assert bool((state.per_token["key_norms"][state.mask] > 0).all())
    assert state.per_token["normed_hidden"].shape == state.tokens.shape
    T = state.llm.text_mask.shape[1]
    assert state.llm.text_key_norms.shape == (B, T) and state.llm.text_normed_hidden.shape[:2] == (B, T)
    # The text after the image: the prompts' 5 and 9 tokens (Qwen2-VL: and its <|vision_end|>).
    assert state.llm.text_mask.sum(1).tolist() == ([6, 10] if family == "qwen2_vl" else [5, 9])


def test_signals_after_a_stage_at_the_same_layer_on_a_ragged_right_padded_batch(model):
    """Prompts that start with their image, right-padded; a stage at layer 1 cuts the first row only (so the
    sequence layer 1 sees has new padding in front of that row and the caller's behind it), a keep-all stage acts
    at layer 2 before the capturing one: the key norms recorded at layer 1 are found for every token, the image's
    first one included (it came from column 0, where every padded column of layer 1's sequence also points)."""
    rows = [[*[IMAGE] * N0, *range(30, 35)], [*[IMAGE] * N0, *range(30, 39)]]
    L = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (L - len(r)) for r in rows])
    batch = {"input_ids": ids, "attention_mask": (torch.arange(L)[None] < torch.tensor([[69], [73]])).long(),
             "pixel_values": torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3),
                                         dtype=torch.float64)}
    cut = {"use": "test_signals_here", "layers": [1], "keep": "even_first_row"}
    keys = {"use": "test_signals_keys", "layers": [2]}
    alone = captured(model, batch, {"encoder": ENC, "llm": [cut, keys]})[-1]
    after = captured(model, batch, {"encoder": ENC, "llm": [cut, {"use": "test_signals_here", "layers": [2]}, keys]})
    after = after[-1]
    assert alone.counts.tolist() == after.counts.tolist() == [N0 // 2, N0]
    assert bool((alone.per_token["key_norms"][alone.mask] > 0).all())
    assert torch.equal(after.per_token["key_norms"], alone.per_token["key_norms"])
    assert torch.equal(after.llm.text_key_norms, alone.llm.text_key_norms)
    assert torch.equal(after.per_token["normed_hidden"], alone.per_token["normed_hidden"])


@torch.no_grad()
def _model_signals(model, batch: dict, a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three signals at layer ``a`` from the model's own outputs (no arrcoc): eager attention weights of layer
    ``a`` (last row, head mean) ``[B, L]``, the L1 norms of the KV cache's layer ``a - 1`` keys (key heads repeated,
    heads concatenated) ``[B, L]``, and the hidden states entering layer ``a`` ``[B, L, D]``."""
    from arrcoc.integrations.hf.compat import output_cache

    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(**batch, output_attentions=True, output_hidden_states=True, use_cache=True)
    finally:
        model.set_attn_implementation(impl)
    keys = output_cache(out).layers[a - 1].keys
    keys = keys.repeat_interleave(model.config.text_config.num_attention_heads // keys.shape[1], 1)
    return (out.attentions[a][:, :, -1].mean(1).float(), keys.transpose(1, 2).flatten(2).abs().sum(-1).float(),
            out.hidden_states[a])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_signals_equal_the_model_own_attention_keys_and_hidden_states(family, attention):
    """LLaVA-1.5, LLaVA-NeXT and Qwen2-VL (multimodal rotary), batch 2 left-padded, loaded with sdpa or eager
    attention: at layer 2 the probed ``attn_from_last_here`` equals the model's own eager attention weights of layer
    2 (last row, head mean), ``key_norms`` the norms of the keys the model caches at layer 1, ``normed_hidden`` the
    model's hidden states entering layer 2 through its final norm; ``visual_positions`` count real tokens only.
    (float32: the float64 eager reference turns left-padded rows into NaN in transformers itself.)"""
    model, batch, _ = FAMILIES[family]()
    here, norms, hidden = _model_signals(model, batch, 2)
    model.set_attn_implementation(attention)
    try:
        CAPTURED.clear()
        with torch.no_grad(), arrcoc.hf.apply(model, spec("test_signals_all", layers=[2])):
            model(**batch)
    finally:
        model.set_attn_implementation("sdpa")
    (state,) = CAPTURED
    real = batch["attention_mask"].bool()
    visual = (batch["input_ids"] == arrcoc.hf.adapter_for(model).image_token_id) & real
    norm = arrcoc.hf.adapter_for(model).language_model.norm
    for b in range(2):
        columns = visual[b].nonzero().flatten()
        n = columns.numel()
        assert int(state.counts[b]) == n
        torch.testing.assert_close(state.per_token["attn_from_last_here"][b, :n], here[b, columns],
                                   rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(state.per_token["key_norms"][b, :n], norms[b, columns], rtol=1e-5, atol=0)
        torch.testing.assert_close(state.per_token["normed_hidden"][b, :n], norm(hidden[b, columns]),
                                   rtol=1e-5, atol=1e-5)
        assert state.llm.visual_positions[b, :n].tolist() == (real[b].cumsum(0) - 1)[columns].tolist()


@pytest.mark.parametrize("layer", [1, 2])
def test_signals_after_a_mask_mode_stage(layer):
    """A ``mode: mask`` stage (AIM's) keeps the even visual tokens at layer 1 or 2, before the capturing stage at
    layer 2: only the kept tokens reach it; their key norms are those of the model's own layer-1 keys (masking
    changes no key), the probed attention is the model's layer-2 attention under that mask (the masked tokens
    get none of it), read from the eager weights of the same run."""
    model, batch, _ = FAMILIES["llava"]()
    _, norms, _ = _model_signals(model, batch, 2)
    model.set_attn_implementation("eager")
    try:
        CAPTURED.clear()
        pipeline = {"encoder": ENC, "llm": [{"use": "test_signals_here", "layers": [layer], "keep": "even",
                                             "mode": "mask"},
                                            {"use": "test_signals_all", "layers": [2], "mode": "mask"}]}
        with torch.no_grad(), arrcoc.hf.apply(model, pipeline):
            out = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    state = CAPTURED[-1]
    visual = (batch["input_ids"] == IMAGE) & batch["attention_mask"].bool()
    for b in range(2):
        kept = visual[b].nonzero().flatten()[::2]
        n = kept.numel()
        assert int(state.counts[b]) == n
        torch.testing.assert_close(state.per_token["key_norms"][b, :n], norms[b, kept], rtol=1e-5, atol=0)
        weights = out.attentions[2][b, :, -1].mean(0).float()
        torch.testing.assert_close(state.per_token["attn_from_last_here"][b, :n], weights[kept], rtol=1e-5, atol=1e-8)
        assert float(weights[visual[b].nonzero().flatten()[1::2]].abs().max()) == 0.0


def test_probing_changes_nothing_with_a_static_cache_under_inference_mode(model, batch3):
    """``generate`` with ``cache_implementation='static'`` (its masks span the whole cache) under
    ``torch.inference_mode``: a keep-everything stage reading ``attn_from_last_here`` generates the model's own
    tokens and logits, and the probed row equals the one a dynamic cache gives."""
    static = {"cache_implementation": "static"}
    with torch.inference_mode():
        out = model.generate(**batch3, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **static)
    rows = []
    for extra in (static, {}):
        CAPTURED.clear()
        with torch.inference_mode(), arrcoc.hf.apply(model, spec("test_signals_here", layers=[2])):
            got = model.generate(**batch3, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True, **extra)
        (state,) = CAPTURED
        rows.append(state.per_token["attn_from_last_here"])
        if extra:
            assert torch.equal(got.sequences, out.sequences)
            assert all(torch.equal(a, b) for a, b in zip(got.logits, out.logits))
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-6, atol=1e-12)


def test_a_failed_probe_leaves_no_probing_behind():
    """The probe stops the attention module in arrcoc's scoring function; a module that raises, or that never calls
    the attention function, leaves the recorder as it was (the model's next forward records normally) and the
    second is refused by name."""
    from arrcoc.errors import ModelError
    from arrcoc.integrations.hf.attention import Recorder, probe_last_row

    class Raises(torch.nn.Module):
        layer_idx = 3

        def forward(self, hidden_states, **kwargs):
            raise RuntimeError("inside the module")

    class NoKernel(Raises):
        def forward(self, hidden_states, **kwargs):
            assert "cache" not in kwargs and "past_key_values" not in kwargs  # the probe never passes a cache
            return hidden_states, None

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="inside the module"):
        probe_last_row(recorder, Raises(), torch.zeros(1, 2, 4), {"cache": object()})
    assert recorder.probing is None
    with pytest.raises(ModelError, match=r"probing decoder layer 3's attention did not reach arrcoc's scoring "
                                         r"attention function \(the module NoKernel"):
        probe_last_row(recorder, NoKernel(), torch.zeros(1, 2, 4), {"cache": object(), "past_key_values": object(),
                                                                     "position_ids": None})
    assert recorder.probing is None


def test_the_last_token_of_a_right_padded_prompt_is_its_last_real_one(model):
    """Right padding (a plain forward may get it): the query of ``attn_from_last`` (layer a-1) and of the probed
    ``attn_from_last_here`` (layer a) is each prompt's last real token, not the padding after it: every row's
    signals equal those of its prompt alone, also after a ragged cut at an earlier layer."""
    rows = [[*llava_row(2, 3)], [*llava_row(3, 8)]]
    L = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (L - len(r)) for r in rows])
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batch = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "pixel_values": pixels}
    for llm in ([{"use": "test_signals_last", "layers": [2]}],
                [{"use": "test_signals_here", "layers": [1], "keep": "even_first_row"},
                 {"use": "test_signals_last", "layers": [3]}]):
        pipeline = {"encoder": ENC, "llm": llm}
        batched = captured(model, batch, pipeline)[-1]
        for b, row in enumerate(rows):
            one = {"input_ids": ids[b:b + 1, :len(row)], "attention_mask": torch.ones(1, len(row), dtype=torch.long),
                   "pixel_values": pixels[b:b + 1]}
            if len(llm) == 2 and b == 1:  # alone, the second prompt is the first row: cut it as in the batch
                continue
            alone = captured(model, one, pipeline)[-1]
            n = int(alone.counts[0])
            assert int(batched.counts[b]) == n
            for name in ("attn_from_last", "attn_from_last_here"):
                torch.testing.assert_close(batched.per_token[name][b, :n], alone.per_token[name][0, :n],
                                           rtol=1e-9, atol=1e-12, msg=f"{name}, row {b}, {len(llm)} stages")


def _gemma3():
    from tiny_gemma3 import batch as gemma_batch, tiny_gemma3

    inputs = gemma_batch([(3, 9, 1), (1, 4, 1)])
    return tiny_gemma3(torch.float32), {**inputs, "pixel_values": inputs["pixel_values"].float()}


def _qwen3_vl():
    from tiny_qwen3_vl import qwen3_inputs, tiny_qwen3_vl

    return tiny_qwen3_vl(torch.float32), qwen3_inputs((0, 2), dtype=torch.float32)


def _internvl():
    from tiny_internvl import batch as internvl_batch, tiny_internvl

    return tiny_internvl(torch.float32), internvl_batch([(3, 5, [1]), (1, 9, [2])], dtype=torch.float32)


SHORTCUT_FAMILIES = {"llava": lambda: FAMILIES["llava"]()[:2], "qwen2_vl": lambda: FAMILIES["qwen2_vl"]()[:2],
                     "gemma3": _gemma3, "qwen3_vl": _qwen3_vl, "internvl": _internvl}


@pytest.mark.parametrize("family", list(SHORTCUT_FAMILIES))
def test_the_probe_shortcut_changes_no_bit(family, monkeypatch):
    """LLaVA-1.5, Qwen2-VL (multimodal rotary), Gemma 3 (``q_norm``, ``query_pre_attn_scalar``), Qwen3-VL (``q_norm``,
    grouped keys) and InternVL (Qwen2), float32, batch 2 left-padded: the probe that projects no value and only a
    block of query rows gives ``attn_from_last_here`` equal, bit for bit, to the probe through the whole module; it
    did skip the work (its value projection is a broadcast, its query is zero outside each prompt's block), and left
    every projection's forward the class's."""
    from arrcoc.integrations.hf import attention

    model, batch = SHORTCUT_FAMILIES[family]()
    lm = model.model.language_model
    probed = lm.layers[1].self_attn
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs: dict[str, torch.Tensor] = {}
    hooks = [probed.q_proj.register_forward_hook(lambda m, a, out: outputs.__setitem__("query", out)),
             probed.v_proj.register_forward_hook(lambda m, a, out: seen.append((outputs["query"], out)))]
    rows = {}
    try:
        for shortcut in (False, True):
            monkeypatch.setattr(attention, "PROBE_SHORTCUT", shortcut)
            seen.clear()
            (state,) = captured(model, batch, spec("test_signals_here", layers=[1]))
            rows[shortcut] = state.per_token["attn_from_last_here"]
            query, value = seen[0]  # the probe's call (the layer's own forward follows it)
            B, L = query.shape[:2]
            assert L > attention._QUERY_BLOCK
            projected = int((query != 0).any(-1).sum())
            if shortcut:
                assert value.stride() == (0, 0, 0) and projected == B * attention._QUERY_BLOCK
            else:
                assert value.stride() != (0, 0, 0) and projected > B * attention._QUERY_BLOCK  # (padding: zero)
    finally:
        for hook in hooks:
            hook.remove()
    assert bool((rows[True][state.mask] > 0).all())
    assert torch.equal(rows[True], rows[False])
    for layer in lm.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            assert "forward" not in projection.__dict__
            assert projection.forward.__func__ is type(projection).forward


def test_the_probe_shortcut_restores_the_projections_when_the_module_raises():
    """Inside the probe ``q_proj`` gives the full projection's rows in each prompt's block of 16 rows ending at its
    last real token (``Recorder.last_rows``; from row 0 when that token is among the first 16) and zeros elsewhere,
    ``v_proj`` zeros of its shape; the module raising, both forwards are restored (a class's and one set on the
    instance alike) and the probing flag is cleared."""
    from arrcoc.integrations.hf.attention import Recorder, probe_last_row

    class Raises(torch.nn.Module):
        layer_idx = 0

        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(8, 12), torch.nn.Linear(8, 4)

        def forward(self, hidden_states, **kwargs):
            self.got = self.q_proj(hidden_states), self.v_proj(hidden_states).view(2, 40, 2, 2).transpose(1, 2)
            raise RuntimeError("inside the module")

    module = Raises()
    instance_forward = module.v_proj.forward  # as accelerate sets one
    module.v_proj.forward = instance_forward
    hidden = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    recorder = Recorder(last_rows=lambda: torch.tensor([30, 5]))
    with pytest.raises(RuntimeError, match="inside the module"):
        probe_last_row(recorder, module, hidden, {})
    query, value = module.got
    full = module.q_proj(hidden)
    assert torch.equal(query[0, 15:31], full[0, 15:31]) and torch.equal(query[1, :16], full[1, :16])
    assert not query[0, :15].any() and not query[0, 31:].any() and not query[1, 16:].any()
    assert value.shape == (2, 2, 40, 2) and not value.any()
    assert recorder.probing is None
    assert "forward" not in module.q_proj.__dict__ and module.v_proj.__dict__["forward"] is instance_forward
