"""DART inside the tiny models: LLaVA-1.5 against an independent no-cache reference, Qwen2-VL and LLaVA-NeXT run.

The LLaVA model and helpers are those of ``test_hf_llm_methods`` (float64, sdpa, 64 image tokens, 4-layer Llama).
The batch: 3 left-padded prompts of different lengths, each with at least the 4 text tokens after the image
that DART's text pivots need (the third prompt of ``ROWS`` has one; it is the refusal test).

The reference (:func:`dart_official`) is the official ``get_retained_image_token`` (ZichenWen1/DART,
modeling_llama_self.py l.397-449) for one unpadded prompt, fed from ``reference_pass``: layer K-1's post-rotary
keys (repeat_kv, heads concatenated) computed from the layer's own modules on the sequence it saw, and layer
K-1's output through the final norm; the pivots are visited in the iteration order of a real Python set of their
sequence indices.  The decision is re-applied (original positions) at every greedy step recomputed from scratch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import arrcoc  # noqa: E402
from arrcoc.hookspecs import hookimpl  # noqa: E402
from arrcoc.registry import get_registry  # noqa: E402
from test_hf_llm_methods import (  # noqa: E402
    ENC, compare, first_image, forward_logits, generate, kept_patches, model, patches, prompt, reference,
    reference_pass,
)
from test_hf_support_matrix import FAMILIES  # noqa: E402
from tiny_models import (  # noqa: E402
    BOS, N0, ROWS, left_pad, llava_batch, llava_row, prompt_with_features, rotate_half, sample,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

__all__ = ["model"]  # the module-scoped tiny LLaVA fixture of test_hf_llm_methods

#: Text before / after the image: prompt lengths 73, 76, 76, every prompt with >= 4 text tokens after its image.
DART_ROWS = [(3, 5), (2, 9), (6, 5)]
BUDGET = 24  # M: 4 image pivots + 8 x 3 = 28 of the 64 visual tokens kept


def dart(**params) -> dict:
    return {"encoder": ENC, "llm": [{"use": "dart", "layer": 2, "keep": BUDGET, **params}]}


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(DART_ROWS)


@pytest.fixture(scope="module")
def features(model, batch3):
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output)


# --------------------------------------------------------------------------- the reference
@torch.no_grad()
def layer_keys(layer, seq: dict, rotary) -> torch.Tensor:
    """``[S, H * d]``: the post-rotary keys of ``layer`` on one sequence, key heads repeated (official repeat_kv),
    heads concatenated (official ``any_states.permute(0, 2, 1, 3).reshape(B, L, -1)``)."""
    attn = layer.self_attn
    x = layer.input_layernorm(seq["h"])[None]
    S, hd = x.shape[1], attn.head_dim
    cos, sin = rotary(x, seq["pos"][None])
    k = attn.k_proj(x).view(1, S, -1, hd).transpose(1, 2)
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(attn.config.num_attention_heads // k.shape[1], 1)
    return k[0].transpose(0, 1).reshape(S, -1)


def _gap(values: torch.Tensor, k: int, margins: list) -> None:
    """Relative gap between the k-th and (k+1)-th largest: the integration ranks float32 key norms."""
    if k < len(values):
        top = torch.sort(values, descending=True).values
        margins.append(float((top[k - 1] - top[k]) / top[k - 1].abs()))


def dart_official(hidden, keys, start: int, length: int, budget: int, margins: list, visit: str = "set",
                  pivot_image: int = 4, pivot_text: int = 4) -> list[int]:
    """Official ``get_retained_image_token`` for one prompt: ``hidden`` ``[S, D]`` (layer K-1's output through the
    final norm), ``keys`` ``[S, H*d]``; returns the kept sequence indices, sorted."""
    token_topk = math.ceil(budget // (pivot_image + pivot_text))
    image_norm = torch.norm(keys[start:start + length], p=1, dim=-1)
    query_norm = torch.norm(keys[start + length:], p=1, dim=-1)
    _gap(image_norm, pivot_image, margins)
    _gap(query_norm, pivot_text, margins)
    image_indices = (image_norm.topk(pivot_image).indices + start).tolist()
    query_indices = (query_norm.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    pivots = list(indices_set) if visit == "set" else image_indices + query_indices
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in pivots:
        cos = -F.cosine_similarity(hidden[item], hidden[valid_list], dim=-1)
        _gap(cos, token_topk, margins)
        taken = [valid_list[i] for i in cos.topk(token_topk).indices]
        indices_set.update(taken)
        valid.difference_update(taken)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def dart_decide(model, budget: int, margins: list, signals: dict | None = None, visit: str = "set"):
    """DART at the input of layer ``a``, from layer ``a - 1`` (no stage before it: sequence index = ``src``)."""
    lm = model.model.language_model

    def decide(seen: dict, a: int):
        before = seen["inputs"][a - 1]  # the sequence layer a - 1 saw
        keys = layer_keys(lm.layers[a - 1], before, lm.rotary_emb)
        hidden = lm.norm(seen["inputs"][a]["h"])  # layer a - 1's output through the final norm
        visual = torch.nonzero(before["visual"]).squeeze(1)
        start, length = int(visual[0]), len(visual)
        if signals is not None:
            signals.update(norms=keys.abs().sum(-1), hidden=hidden, start=start, length=length)
        kept = dart_official(hidden, keys, start, length, budget, margins, visit)
        return [[int(before["src"][i])] for i in kept]
    return decide


# --------------------------------------------------------------------------- LLaVA-1.5
class Observer:
    """The input state of every in-LLM stage (``arrcoc_stage_started``)."""

    def __init__(self) -> None:
        self.states: dict = {}

    @hookimpl
    def arrcoc_stage_started(self, stage, plugin, state):
        if stage.startswith("llm"):
            self.states[stage] = state


@pytest.fixture(scope="module")
def refs(model, batch3, features):
    out = []
    for b in range(3):
        margins: list = []
        signals: dict = {}
        ref = reference(model, prompt(batch3, b), features[b], {2: (dart_decide(model, BUDGET, margins, signals),
                                                                    "remove", "original")})
        assert min(margins) > 1e-6, margins  # no near-tie at a cut: float32 key norms rank as float64 ones
        out.append((ref, signals))
    return out


def test_dart_equals_the_no_cache_reference(model, batch3, refs):
    observer = Observer()
    registry = get_registry()
    registry.register(observer, name="test_hf_dart_observer")
    try:
        with arrcoc.hf.apply(model, dart()) as run:
            logits = forward_logits(model, batch3)
            states, report, given = run.llm_states, run.report, dict(observer.states)
            tokens, steps = generate(model, batch3)
    finally:
        registry.unregister("test_hf_dart_observer")
    assert sorted(states) == ["llm[0]@2"] and report.layer_visual == [[64] * 3, [64] * 3, [28] * 3, [28] * 3]
    state_in = given["llm[0]@2"]
    for b, (ref, signals) in enumerate(refs):
        plan = ref["plans"][2]
        assert len(plan) == 4 + 8 * (BUDGET // 8)
        assert torch.equal(kept_patches(states["llm[0]@2"], b), patches(plan, ref["image"]))
        compare(ref, b, logits, tokens, steps)
        # The signals the engine handed the stage are the reference's.
        start, n = signals["start"], signals["length"]
        after = torch.arange(start + n, prompt(batch3, b).shape[0])
        T = len(after)
        torch.testing.assert_close(state_in.per_token["key_norms"][b, :n], signals["norms"][start:start + n].float(),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(state_in.llm.text_key_norms[b, :T], signals["norms"][after].float(),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(state_in.per_token["normed_hidden"][b, :n], signals["hidden"][start:start + n],
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state_in.llm.text_normed_hidden[b, :T], signals["hidden"][after],
                                   rtol=1e-10, atol=1e-12)
        assert state_in.llm.visual_positions[b, :n].tolist() == list(range(start, start + n))
        assert state_in.llm.text_positions[b, :T].tolist() == after.tolist()


def test_the_set_order_is_not_the_score_order_here(model, batch3, features, refs):
    """On these prompts the official set order keeps other tokens than the score order would (so the equality
    above checks the order), and `pivot_order: score` equals the reference visiting the pivots by score."""
    differs = 0
    with torch.no_grad(), arrcoc.hf.apply(model, dart(pivot_order="score")) as run:
        forward_logits(model, batch3)  # (position ids as generate numbers them: the left-padded rows' own)
        by_score = run.llm_states["llm[0]@2"]
    for b, (ref, _) in enumerate(refs):
        ids = prompt(batch3, b)
        margins: list = []
        plans: dict = {}
        reference_pass(model, ids, features[b], len(ids), {2: (dart_decide(model, BUDGET, margins, visit="list"),
                                                                "remove", "original")}, plans)
        assert torch.equal(kept_patches(by_score, b), patches(plans[2], ref["image"]))
        differs += plans[2] != ref["plans"][2]
    assert differs >= 1


def test_keeping_everything_is_the_model(model, batch3):
    """count: exact with M = 64: the 4 image pivots and 8 x 7.5 taken tokens are all 64; logits and greedy
    generation bit-identical to the model alone."""
    with torch.no_grad():
        logits = forward_logits(model, batch3)
        tokens, steps = generate(model, batch3)
    with arrcoc.hf.apply(model, dart(keep=N0, count="exact")) as run:
        got = forward_logits(model, batch3)
        got_tokens, got_steps = generate(model, batch3)
    assert run.report.layer_visual[2] == [64] * 3
    assert torch.equal(got, logits) and torch.equal(got_tokens, tokens) and torch.equal(got_steps, steps)


def test_batched_equals_each_prompt_alone(model, batch3):
    with torch.no_grad(), arrcoc.hf.apply(model, dart()) as run:
        logits = forward_logits(model, batch3)
        together = run.llm_states["llm[0]@2"]
        for b in range(3):
            one = sample(batch3, b)
            torch.testing.assert_close(forward_logits(model, one)[0], logits[b], rtol=0, atol=1e-10)
            assert torch.equal(kept_patches(run.llm_states["llm[0]@2"], 0), kept_patches(together, b))


def test_a_text_only_prompt_in_the_batch(model, batch3, refs):
    """One prompt with an image and one without: the text-only prompt has nothing to prune (it keeps none, asks
    for no budget and no pivots), the other keeps the reference's tokens; each row's logits are those of the
    prompt alone."""
    ids, mask = left_pad([llava_row(*DART_ROWS[0]), [BOS, 5, 6]])
    mixed = {"input_ids": ids, "attention_mask": mask, "pixel_values": batch3["pixel_values"][:1]}
    with torch.no_grad(), arrcoc.hf.apply(model, dart()) as run:
        logits = forward_logits(model, mixed)
        state = run.llm_states["llm[0]@2"]
        assert state.counts.tolist() == [4 + 8 * (BUDGET // 8), 0]
        assert torch.equal(kept_patches(state, 0), patches(refs[0][0]["plans"][2], refs[0][0]["image"]))
        torch.testing.assert_close(logits[0], forward_logits(model, sample(batch3, 0))[0], rtol=0, atol=1e-10)
    text_only = {"input_ids": torch.tensor([[BOS, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(logits[1], forward_logits(model, text_only)[0], rtol=0, atol=1e-10)


def test_refuses_a_prompt_without_text_for_the_pivots(model):
    """ROWS' third prompt has 1 text token after its image: the 4 text pivots have no instruction to come from."""
    with arrcoc.hf.apply(model, dart()):
        with pytest.raises(arrcoc.ArrcocError, match=r"4 text pivots come from the text after the image.*\[2\]"):
            with torch.no_grad():
                forward_logits(model, llava_batch(ROWS))


# --------------------------------------------------------------------------- other families
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_runs_in_other_families(family):
    """Batch 2, different images and prompt lengths (the support matrix's batches): generate runs and the LLM sees
    fewer visual tokens from layer 2 on, 4 + 8 floor(floor(n / 2) / 8) per prompt (Qwen2-VL: M-RoPE ids kept,
    positions original)."""
    model, batch, _ = FAMILIES[family]()
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), arrcoc.hf.apply(model, {"encoder": ENC, "llm": [{"use": "dart", "layer": 2,
                                                                            "keep": 0.5}]}) as run:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, L + 3) and torch.equal(out[:, :L], batch["input_ids"])
    seen = run.report.layer_visual
    n = seen[0]
    assert seen[1] == n and seen[2] == [4 + 8 * ((v // 2) // 8) for v in n] and sum(seen[2]) < sum(n)
    if family == "qwen2_vl":
        assert n == [24, 9] and seen[2] == [12, 4]


# --------------------------------------------------------------------------- dart_pre (arrcoc's variant)
def test_dart_pre_equals_the_reference_and_a_hand_built_prompt(model, batch3, features):
    """Before the LLM (an arrcoc choice): the reference on the model's own projected features (cosines, pivots
    by their L1 norm) and the LLM-input embeddings of each prompt's text after the image (text pivots), pivots by
    score; the model with those features kept equals the model fed a hand-built prompt of them."""
    with arrcoc.hf.apply(model, {"encoder": ENC, "compress": [{"use": "dart_pre", "keep": BUDGET}]}) as run:
        logits = forward_logits(model, batch3)
        state = run.state
    k = 4 + 8 * (BUDGET // 8)
    assert state.counts.tolist() == [k] * 3
    embed = model.get_input_embeddings()
    kept_features = []
    for b in range(3):
        ids = prompt(batch3, b)
        after = ids[first_image(ids) + N0:]
        with torch.no_grad():
            seq = torch.cat([features[b], embed(after).to(features[b].dtype)])
        margins: list = []
        kept = dart_official(seq, seq, 0, N0, BUDGET, margins, visit="list")
        assert min(margins) > 1e-9, margins
        assert kept_patches(state, b).tolist() == kept
        assert torch.equal(state.tokens[b, :k], features[b][kept])
        kept_features.append(state.tokens[b, :k])
    ids_k, mask_k = prompt_with_features(batch3, [k] * 3)
    fed = {"input_ids": ids_k, "attention_mask": mask_k,
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=kept_features)}}
    torch.testing.assert_close(logits, forward_logits(model, fed), rtol=0, atol=1e-12)
