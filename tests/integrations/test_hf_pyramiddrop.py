"""PyramidDrop inside a tiny ``LlavaForConditionalGeneration`` (the model and the 3 left-padded prompts of
``test_hf_llm_methods.py``: float64, sdpa, 64 image tokens, a 4-layer Llama with 4 query and 2 key heads), and
on tiny LLaVA-NeXT and Qwen2-VL.

The expectation is ``test_hf_llm_methods.reference``: one unpadded prompt, no cache, every greedy step recomputed
from scratch.  Its ``decide`` (:func:`pdrop_decide`) is written here from the official ``pdrop_rank_drop``
(Cooperx521/PyramidDrop @ 6444f30, modeling_llama_pdrop.py l.1291-1465), not from arrcoc's code: on the sequence
as it reaches layer ``a`` (``seen["inputs"][a]``), layer ``a``'s own input norm, q / k projections and rotary
embeddings at the positions the tokens have there, the last prompt token's row, causal softmax, mean over heads
(the key heads repeated, arrcoc's GQA rule), the visual columns, the top ``int(N0 * ratio ** s)`` in sequence
order.  Positions: the kept prompt renumbered 0, 1, ... (``compact``), and the generated tokens at the layers
after a stage numbered from the unpruned length minus the tokens dropped before that layer (official decode rule
l.1259-1268: the reference's ``compact_shifted``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import arrcoc  # noqa: E402
from arrcoc_plugins.compressors import pyramiddrop as P  # noqa: E402
from test_hf_llm_methods import (  # noqa: E402
    ENC, _singletons, _top, compare, forward_logits, generate, kept_patches, patches, prompt, reference,
)
from test_hf_support_matrix import FAMILIES  # noqa: E402
from tiny_models import (  # noqa: E402
    IMAGE, N0, ROWS, generate_positions, left_pad, llava_batch, rotate_half, sample, tiny_llava, tiny_llava_next,
)
from arrcoc.integrations.hf.compat import output_cache  # noqa: E402

LAYERS = [1, 2, 3]


def pdrop(**params) -> dict:
    return {"encoder": ENC, "llm": [{"use": "pyramiddrop", "layers": LAYERS, **params}]}


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


# --------------------------------------------------------------------------- the reference's decision
@torch.no_grad()
def last_token_attention(layer, seq: dict, rotary) -> torch.Tensor:
    """Official ``pdrop_rank_drop`` score over one sequence: ``layers[a].input_layernorm``, q / k projections,
    rotary at ``seq["pos"]``, the last row of ``softmax(q k^T / sqrt(d) + causal mask)``, head mean.  ``[S]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(seq["h"])
    S, d = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(S, -1, d).transpose(0, 1)  # [H, S, d]
    k = attn.k_proj(x).view(S, -1, d).transpose(0, 1)  # [Hkv, S, d]
    cos, sin = rotary(x[None], seq["pos"][None])
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)  # arrcoc repeats the key heads (official: none)
    logits = (q[:, -1:] @ k.transpose(1, 2))[:, 0] / d ** 0.5  # the last token sees every alive token
    logits = logits.masked_fill(~seq["alive"][None], float("-inf"))
    return logits.softmax(-1).mean(0)


def pdrop_decide(model, stage: int, ratio: float, margins: list, scores: dict):
    lm = model.model.language_model

    def decide(seen: dict, a: int):
        seq = seen["inputs"][a]
        row = last_token_attention(lm.layers[a], seq, lm.rotary_emb)
        cols = torch.nonzero(seq["visual"] & seq["alive"]).squeeze(1)
        n0 = int(seen["inputs"][0]["visual"].sum())
        k = max(int(n0 * ratio ** stage), 1)  # of the ORIGINAL count, as officially
        scores[a] = row[cols]
        return _singletons(seq["src"][cols[_top(row[cols], k, margins)]])
    return decide


def pdrop_reference(model, ids, feats, ratio: float, rule: str) -> dict:
    margins: list = []
    scores: dict = {}
    acts = {a: (pdrop_decide(model, s, ratio, margins, scores), "remove", rule) for s, a in enumerate(LAYERS, 1)}
    ref = reference(model, ids, feats, acts)
    assert min(margins) > 1e-5, margins  # no near-tie at the cut: the engine's float32 scores rank the same
    return {**ref, "scores": scores}


class Captured:
    """The states the engine hands pyramiddrop (its signal included), recorded around the plugin's call."""

    def __init__(self, monkeypatch):
        self.states: list = []
        call = P.PyramidDrop.__call__

        def recording(plugin, state):
            self.states.append(state)
            return call(plugin, state)
        monkeypatch.setattr(P.PyramidDrop, "__call__", recording)


# --------------------------------------------------------------------------- LLaVA-1.5
def test_keep_everything_is_the_model(model, batch3):
    """ratio 1: every stage keeps every visual token; compact renumbering and the shifted decode rule then change
    nothing: logits and greedy generation bit-identical to the model's."""
    logits = forward_logits(model, batch3)
    tokens, steps = generate(model, batch3)
    with arrcoc.hf.apply(model, pdrop(ratio=1.0)) as run:
        got = forward_logits(model, batch3)
        report = run.report
        got_tokens, got_steps = generate(model, batch3)
    assert report.layer_visual == [[N0] * 3] * 4
    assert torch.equal(got, logits)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_steps, steps)


@pytest.mark.parametrize("params, rule", [
    ({}, "compact_shifted"),                                   # official: compact + shifted
    ({"decode_positions": "unpruned"}, "compact"),
    ({"positions": "original"}, "original"),                   # decode: unpruned
], ids=["official", "compact_unpruned", "original"])
def test_equals_no_cache_reference(model, batch3, features, monkeypatch, params, rule):
    """Layers [1, 2, 3], ratio 0.5: 64 -> 32 -> 16 -> 8 visual tokens, chosen by layer a's own last-token
    attention; prefill logits, greedy tokens and every step's logits equal the no-cache reference; the signal the
    engine hands the stage equals the reference's score; the KV cache of each layer holds what it saw."""
    L = batch3["input_ids"].shape[1]
    captured = Captured(monkeypatch)
    with arrcoc.hf.apply(model, pdrop(ratio=0.5, **params)) as run:
        logits = forward_logits(model, batch3)
        states, report = run.llm_states, run.report
        here = list(captured.states)
        with torch.no_grad():
            cache = output_cache(model(**batch3, position_ids=generate_positions(batch3["attention_mask"])))
        tokens, steps = generate(model, batch3)
    assert sorted(states) == [f"llm[0]@{a}" for a in LAYERS]
    assert [s.llm.layer for s in here] == LAYERS
    assert report.layer_visual == [[64] * 3, [32] * 3, [16] * 3, [8] * 3]
    assert [layer.keys.shape[2] for layer in cache.layers] == [L, L - 32, L - 48, L - 56]
    for b in range(3):
        ids = prompt(batch3, b)
        ref = pdrop_reference(model, ids, features[b], 0.5, rule)
        for s, a in enumerate(LAYERS, 1):
            assert len(ref["plans"][a]) == 64 // 2 ** s
            assert torch.equal(kept_patches(states[f"llm[0]@{a}"], b), patches(ref["plans"][a], ref["image"]))
            state = here[s - 1]
            n = int(state.counts[b])
            assert n == ref["scores"][a].numel() and state.llm.input_visual_counts[b] == N0
            torch.testing.assert_close(state.per_token["attn_from_last_here"][b, :n], ref["scores"][a].float(),
                                       rtol=1e-6, atol=1e-9)
        compare(ref, b, logits, tokens, steps)
    if rule == "compact_shifted":  # the decode rule matters: numbering from the unpruned length gives other logits
        ids = prompt(batch3, 0)
        other = pdrop_reference(model, ids, features[0], 0.5, "compact")
        assert (other["steps"][1:].float() - steps[0][1:]).abs().max() > 1e-4


def test_official_count_of_the_original(model, batch3):
    """ratio 0.42 on 64 tokens: int(64 * 0.42) = 26, int(64 * 0.42**2) = 11, int(64 * 0.42**3) = 4, the official
    counts of the ORIGINAL count (from the previous stage's: 26, 10, 4); the batched run equals each prompt
    alone (kept tokens and logits)."""
    with arrcoc.hf.apply(model, pdrop(ratio=0.42)) as run:
        logits = forward_logits(model, batch3)
        report, states = run.report, run.llm_states
        singles = [(forward_logits(model, _sample(batch3, b)), run.llm_states) for b in range(3)]
    assert report.layer_visual == [[64] * 3, [26] * 3, [11] * 3, [4] * 3]
    for b, (one, one_states) in enumerate(singles):
        torch.testing.assert_close(logits[b], one[0], rtol=0, atol=1e-10)
        for a in LAYERS:
            assert torch.equal(kept_patches(states[f"llm[0]@{a}"], b), kept_patches(one_states[f"llm[0]@{a}"], 0))


def _sample(batch3, b):
    return sample(batch3, b)


# --------------------------------------------------------------------------- ragged counts
def test_ragged_counts_shift_each_prompt_by_its_own_drops():
    """LLaVA-NeXT images of different shapes (52 and 56 visual tokens, newlines included): the stages keep 26 / 13
    and 28 / 14, so each prompt's generated tokens are shifted by its own drops (official: per row,
    ``cur_visual_length[idx] - next_visual_length[idx]`` at each stage), not by one batch-wide number: the
    left-padded batch generates what each prompt alone does (tokens and every step's logits), and the shifted rule
    changes the logits (so the comparison can tell)."""
    model = tiny_llava_next(torch.float64)
    sizes = torch.tensor([[50, 100], [90, 40]])
    per = arrcoc.hf.adapter_for(model).tokens_per_image(None, {"image_sizes": sizes})
    assert per == [52, 56]
    ids, mask = left_pad([[1, 5, 6, 7, *[IMAGE] * per[0], *range(20, 25)], [1, 5, *[IMAGE] * per[1], *range(20, 29)]])
    pixels = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}

    def alone(b):
        real = mask[b].bool()
        return {"input_ids": ids[b, real][None], "attention_mask": mask[b, real][None],
                "pixel_values": pixels[b:b + 1], "image_sizes": sizes[b:b + 1]}

    results = {}
    for rule in ("shifted", "unpruned"):
        with torch.no_grad(), arrcoc.hf.apply(model, pdrop(layers=[1, 2], decode_positions=rule)) as run:
            tokens, steps = generate(model, batch)
            assert run.report.layer_visual == [[52, 56], [26, 28], [13, 14], [13, 14]]
            for b in range(2):
                one_tokens, one_steps = generate(model, alone(b))
                assert torch.equal(one_tokens[0], tokens[b])
                torch.testing.assert_close(one_steps[0], steps[b], rtol=0, atol=1e-10)
        results[rule] = steps
    assert (results["shifted"][:, 1:] - results["unpruned"][:, 1:]).abs().amax(-1).amin() > 1e-4


# --------------------------------------------------------------------------- other families
@pytest.mark.parametrize("family, params", [
    ("llava_next", {}),
    ("qwen2_vl", {"positions": "original"}),
])
def test_runs_in_other_families(family, params):
    """Batch 2, different prompt lengths and images: generate runs and the LLM sees fewer visual tokens at each
    stage (LLaVA-NeXT: N0 counts every visual token, newlines included, as officially)."""
    model, batch, _ = FAMILIES[family]()
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        with arrcoc.hf.apply(model, {"encoder": ENC}) as plain:
            model(**batch)
        before = plain.report.layer_visual[0]
        with arrcoc.hf.apply(model, pdrop(layers=[1, 2], **params)) as run:
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, L + 3) and torch.equal(out[:, :L], batch["input_ids"])
    seen = run.report.layer_visual
    assert seen[0] == before
    assert seen[1] == [max(n // 2, 1) for n in before] and seen[2] == [max(n // 4, 1) for n in before]


def test_compact_positions_refused_on_multimodal_rotary():
    model, batch, _ = FAMILIES["qwen2_vl"]()
    with pytest.raises(arrcoc.ArrcocError, match="multimodal rotary"):
        with torch.no_grad(), arrcoc.hf.apply(model, pdrop(layers=[1, 2])):
            model(**batch)
