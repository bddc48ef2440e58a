"""In-LLM methods inside a tiny ``LlavaForConditionalGeneration``: ``sparsevlm_llm``, ``aim_prune``, stages in
composition, and the report's FLOPs.

The model is the one of ``test_hf_llava.py`` (float64, sdpa, CLIP tower of 64 image tokens, 4-layer Llama of
width 64, ``image_token_id`` 199, pad 0), the batch the same 3 left-padded prompts of lengths 73, 76, 72 (the
third has a single text token after the image).

Every expectation comes from :func:`reference`, a manual no-cache forward of ONE unpadded prompt over the
model's modules, written from the method descriptions (shared/METHODS.md, docs/hf.md), not from arrcoc's code:

* a stage acting at decoder layer ``a`` decides from layer ``a - 1``'s attention (probabilities, or the
  masked pre-softmax logits for AIM) of the prompt;
* its decision (which visual tokens stay, and for SparseVLM's recycling which ones are averaged into a
  cluster token placed right after the kept ones) is taken once, in prefill, and re-applied when the whole
  sequence (prompt + generated tokens) is recomputed from scratch for every greedy step;
* ``remove``: the dropped tokens leave the sequence from layer ``a`` on; ``mask``: they stay but no query
  attends to them from layer ``a`` on; positions ``original`` keep each token's position id, ``compact``
  renumbers the kept prompt tokens 0, 1, ...; generated tokens are numbered from the UNPRUNED prompt length
  (docs/hf.md: ``generate`` numbers them from ``attention_mask``; SparseVLM v1.0 does the same).

The integration runs the 3 prompts as one padded batch; its results are compared sample by sample.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")


import arrcoc  # noqa: E402
from tiny_models import (  # noqa: E402
    IMAGE, N0, ROWS, generate_positions, llava_batch, reference_attention, sample, tiny_llava,
)
from arrcoc.errors import ArrcocError  # noqa: E402
from arrcoc.integrations.hf import layer_flops  # noqa: E402
from arrcoc.integrations.hf.compat import output_cache  # noqa: E402

NEW = 10  # greedy steps
SPARSEVLM_TABLE = {64: (66, 30, 17)}  # official sparse_token_dict, retained budget 64
ENC = {"use": "timm_vit"}

pytestmark = pytest.mark.filterwarnings("ignore::arrcoc.ArrcocWarning")  # prompt 3: one text token, no rater > mean


def sparsevlm(recycle: bool) -> dict:
    return {"encoder": ENC, "llm": [{"use": "sparsevlm_llm", "layers": [1, 2], "budget": 64, "recycle": recycle}]}


def aim(mode: str) -> dict:
    return {"encoder": ENC, "llm": [{"use": "aim_prune", "start_layer": 1, "step": 0.25, "mode": mode}]}


FASTV_TWICE = {"encoder": ENC, "llm": [{"use": "fastv", "layer": 1, "keep": 0.5},
                                      {"use": "fastv", "layer": 3, "keep": 0.5}]}
PRE_AND_LLM = {"encoder": ENC, "compress": [{"use": "random_keep", "keep": 16}],
               "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}


# --------------------------------------------------------------------------- model and inputs


@pytest.fixture(scope="module")
def model():
    m = tiny_llava()
    assert m.config.text_config._attn_implementation == "sdpa"
    return m


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(ROWS)


@pytest.fixture(scope="module")
def features(model, batch3):
    """The model's own image features, per image ``[64, D]``."""
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output)


def prompt(inputs: dict, b: int) -> torch.Tensor:
    return sample(inputs, b)["input_ids"][0]


def first_image(ids: torch.Tensor) -> int:
    return int(torch.nonzero(ids == IMAGE)[0])


@torch.no_grad()
def forward_logits(model, inputs: dict) -> torch.Tensor:
    """float64 last-position logits, position ids numbered as ``generate`` numbers them."""
    return model(**inputs, position_ids=generate_positions(inputs["attention_mask"])).logits[:, -1]


@torch.no_grad()
def generate(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new tokens [B, NEW], logits of every step [B, NEW, V])`` of a greedy generation."""
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    L = inputs["input_ids"].shape[1]
    assert out.sequences.shape[1] == L + NEW and torch.equal(out.sequences[:, :L], inputs["input_ids"])
    return out.sequences[:, L:], torch.stack(out.logits, 1)


def kept_patches(state, b: int) -> torch.Tensor:
    """Image patches (0..63) still represented by some token, from a state's ``origin``."""
    return torch.nonzero(state.origin[b] >= 0).squeeze(1)


# --------------------------------------------------------------------------- the reference
def _apply_plan(seq: dict, groups: list[list[int]], mode: str, rule: str, n_prompt: int) -> dict:
    """The sequence after a stage: ``groups`` (lists of ``src``) are the visual tokens that go on, in order."""
    if mode == "mask":
        assert all(len(g) == 1 for g in groups)
        kept = torch.isin(seq["src"], torch.tensor([g[0] for g in groups]))
        return dict(seq, alive=seq["alive"] & (kept | ~seq["visual"]))
    where = {int(s): i for i, s in enumerate(seq["src"])}
    vis = torch.nonzero(seq["visual"]).squeeze(1)
    v0, v1 = int(vis[0]), int(vis[-1])
    assert bool(seq["visual"][v0:v1 + 1].all()), "one image: its tokens are contiguous"
    rows = [[where[s] for s in g] for g in groups]
    h = torch.stack([seq["h"][r].mean(0) for r in rows])  # a kept token is a group of one
    first = torch.tensor([r[0] for r in rows], dtype=torch.long)
    new = {}
    for name, t in seq.items():
        middle = h if name == "h" else t[first]
        new[name] = torch.cat([t[:v0], middle, t[v1 + 1:]])
    if rule in ("compact", "compact_shifted"):
        in_prompt = new["src"] < n_prompt
        # Generated tokens: numbered from the unpruned prompt length, or (PyramidDrop's decoding rule) from it
        # minus the prompt tokens this layer no longer sees, which continues the compact numbering.
        gone = n_prompt - in_prompt.sum() if rule == "compact_shifted" else 0
        new["pos"] = torch.where(in_prompt, in_prompt.long().cumsum(0) - 1, new["src"] - gone)
    return new


@torch.no_grad()
def reference_pass(model, ids: torch.Tensor, feats: torch.Tensor, n_prompt: int, acts: dict, plans: dict):
    """One forward of one unpadded sequence without cache; ``(last logits [V], what each layer saw)``.

    ``acts[a] = (decide, mode, rule)``: at the input of layer ``a``, ``decide(seen, a)`` returns the visual
    tokens that go on as groups of ``src`` (prompt index); it runs once (``plans`` keeps its answer).  ``rule``:
    ``original``, ``compact`` or ``compact_shifted`` (compact, and generated tokens numbered on from the kept
    prompt: PyramidDrop).
    """
    lm = model.model.language_model
    S = ids.shape[0]
    h = model.get_input_embeddings()(ids).clone()
    h[ids == IMAGE] = feats.to(h.dtype)
    seq = {"h": h, "pos": torch.arange(S), "src": torch.arange(S), "visual": ids == IMAGE,
           "alive": torch.ones(S, dtype=torch.bool)}
    seen = {"input": h.clone(), "ids": ids, "inputs": {}}
    for i, layer in enumerate(lm.layers):
        seen["inputs"][i] = seq  # the sequence as it reaches layer i, before a stage acts there
        if i in acts:
            decide, mode, rule = acts[i]
            if i not in plans:
                plans[i] = decide(seen, i)
            seq = _apply_plan(seq, plans[i], mode, rule, n_prompt)
        n = seq["h"].shape[0]
        allowed = torch.ones(n, n, dtype=torch.bool).tril() & seq["alive"][None, :]
        cos, sin = lm.rotary_emb(seq["h"][None], seq["pos"][None])
        out, probs, logits = reference_attention(layer.self_attn, layer.input_layernorm(seq["h"])[None], cos, sin,
                                                 allowed[None])
        out, probs, logits = out[0], probs[0], logits[0]  # the one sequence
        seen[i] = {"probs": probs, "logits": logits, **seq}
        x = seq["h"] + out
        seq = dict(seq, h=x + layer.mlp(layer.post_attention_layernorm(x)))
    return model.lm_head(lm.norm(seq["h"]))[-1], seen


@torch.no_grad()
def reference(model, ids: torch.Tensor, feats: torch.Tensor, acts: dict) -> dict:
    """Greedy generation recomputed from scratch at every step: tokens, logits of every step, the plans."""
    n = ids.shape[0]
    plans: dict = {}
    seq, steps = ids, []
    seen0 = None
    for t in range(NEW):
        logits, seen = reference_pass(model, seq, feats, n, acts, plans)
        seen0 = seen0 or seen
        steps.append(logits)
        seq = torch.cat([seq, logits.argmax()[None]])
    steps = torch.stack(steps)
    return {"tokens": seq[n:], "steps": steps, "prefill": steps[0], "plans": plans, "seen": seen0,
            "image": first_image(ids), "n": n}


def _top(scores: torch.Tensor, k: int, margins: list | None = None) -> torch.Tensor:
    """Positions (into ``scores``) of the ``k`` largest, in increasing order; ties go to the lower index."""
    order = torch.sort(-scores, stable=True).indices
    if margins is not None and k < len(scores):
        a, b = scores[order[k - 1]], scores[order[k]]
        margins.append(float((a - b) / a.abs()))
    return order[:k].sort().values


def _singletons(src: torch.Tensor) -> list[list[int]]:
    return [[int(s)] for s in src]


def fastv_decide(keep: float):
    def decide(seen: dict, a: int):
        s = seen[a - 1]
        cols = torch.nonzero(s["visual"] & s["alive"]).squeeze(1)
        score = s["probs"].mean(0)[-1, cols]  # head-mean attention from the last token
        return _singletons(s["src"][cols[_top(score, math.floor(len(cols) * keep))]])
    return decide


def text_raters(seen: dict) -> torch.Tensor:
    """SparseVLM raters from the LLM-input hidden states: ``m = softmax(V T^T, text).mean(visual) > mean(m)``."""
    h0, ids = seen["input"], seen["ids"]
    after = torch.arange(len(ids)) > torch.nonzero(ids == IMAGE).max()
    m = (h0[ids == IMAGE] @ h0[after].T).softmax(-1).mean(0)
    raters = m > m.mean()
    if after.sum() > 1:  # margin against float32 rounding in the integration
        assert float((m - m.mean()).abs().min()) > 1e-7
    return raters if raters.any() else torch.ones_like(raters)  # nobody above the mean: every text token rates


def sparsevlm_decide(step: int, margins: list, clusters: dict | None = None, ratio: float = 0.3, divisor: int = 10):
    """SparseVLM v1.0 at the input of ``a`` = pruning layer + 1; ``clusters[step]``: the partition of the
    recycled tokens into cluster tokens, as ``src`` groups (DPC-KNN itself is not re-implemented here)."""
    def decide(seen: dict, a: int):
        s = seen[a - 1]  # the pruning layer's own attention
        cols = torch.nonzero(s["visual"] & s["alive"]).squeeze(1)
        rows = torch.nonzero(~s["visual"] & (torch.arange(len(s["src"])) > cols.max())).squeeze(1)
        raters = text_raters(seen)
        assert len(rows) == len(raters)
        score = s["probs"].mean(0)[rows[raters]][:, cols].mean(0)
        k = min(SPARSEVLM_TABLE[64][step], len(cols) - 1)
        top = _top(score, k, margins)
        kept = _singletons(s["src"][cols[top]])
        if clusters is None:
            return kept
        deleted = torch.ones(len(cols), dtype=torch.bool)
        deleted[top] = False
        d = int(deleted.sum())
        m = min(math.floor(d * ratio) + 1, d)
        order = torch.sort(-score.masked_fill(~deleted, float("-inf")), stable=True).indices[:m]
        recycled = sorted(int(x) for x in s["src"][cols[order]])
        groups = clusters[step]
        assert len(groups) == m // divisor + 1, (len(groups), m)
        assert sorted(x for g in groups for x in g) == recycled, "the cluster tokens average the recycled tokens"
        return kept + groups
    return decide


def aim_decide(rate: float, margins: list, tau: float = 0.1, iters: int = 5):
    """AIM: PageRank over the layer's masked logits, heads by RMS; keep floor(64 * rate) alive visual tokens."""
    def decide(seen: dict, a: int):
        s = seen[a - 1]
        alive = s["alive"]
        M = (s["logits"] / tau).softmax(-1)  # [H, S, S]; masked keys are -inf
        dist = (alive.double() / alive.sum()).expand(M.shape[0], 1, -1)
        for _ in range(iters):
            dist = dist @ M
        importance = dist.pow(2).mean(0).sqrt()[0]
        cols = torch.nonzero(s["visual"] & alive).squeeze(1)
        return _singletons(s["src"][cols[_top(importance[cols], math.floor(N0 * rate), margins)]])
    return decide


def patches(plan: list[list[int]], image: int) -> torch.Tensor:
    """Image patch indices of a plan's tokens (every member of every group), sorted."""
    return torch.tensor(sorted(x - image for g in plan for x in g))


def compare(ref: dict, b: int, logits: torch.Tensor, tokens: torch.Tensor, steps: torch.Tensor) -> None:
    torch.testing.assert_close(logits[b], ref["prefill"], rtol=0, atol=1e-8)
    assert torch.equal(tokens[b], ref["tokens"]), (b, tokens[b], ref["tokens"])
    torch.testing.assert_close(steps[b], ref["steps"], rtol=0, atol=1e-6, check_dtype=False)  # generate: float32


def test_reference_without_stages_is_the_model(model, batch3, features):
    for b in range(3):
        ids = prompt(batch3, b)
        with torch.no_grad():
            ref_all = model(**sample(batch3, b)).logits[0, -1]
        ref = reference(model, ids, features[b], {})
        torch.testing.assert_close(ref["prefill"], ref_all, rtol=0, atol=1e-10)
        with torch.no_grad():
            tokens = model.generate(**sample(batch3, b), max_new_tokens=NEW, do_sample=False)[0, len(ids):]
        assert torch.equal(ref["tokens"], tokens)


# --------------------------------------------------------------------------- 1. sparsevlm_llm
@pytest.fixture(scope="module")
def sparsevlm_refs(model, batch3, features):
    refs = []
    for b in range(3):
        margins: list = []
        acts = {2: (sparsevlm_decide(0, margins), "remove", "compact"),
                3: (sparsevlm_decide(1, margins), "remove", "compact")}
        refs.append(reference(model, prompt(batch3, b), features[b], acts))
        assert min(margins) > 1e-5, margins  # no near-tie at the cut: float32 scores rank the same
    return refs


def test_sparsevlm_llm_equals_no_cache_reference(model, batch3, sparsevlm_refs):
    L = batch3["input_ids"].shape[1]
    with arrcoc.hf.apply(model, sparsevlm(recycle=False)) as run:
        logits = forward_logits(model, batch3)
        states, report = run.llm_states, run.report
        with torch.no_grad():
            cache = output_cache(model(**batch3, position_ids=generate_positions(batch3["attention_mask"])))
        tokens, steps = generate(model, batch3)
        singles = [(forward_logits(model, sample(batch3, b)), generate(model, sample(batch3, b))) for b in range(3)]
    # The table for budget 64 is (66, 30, 17): 64 visual tokens -> min(66, 63) = 63 -> 30.
    assert sorted(states) == ["llm[0]@2", "llm[0]@3"]
    for b, ref in enumerate(sparsevlm_refs):
        assert len(ref["plans"][2]) == 63 and len(ref["plans"][3]) == 30
        assert torch.equal(kept_patches(states["llm[0]@2"], b), patches(ref["plans"][2], ref["image"]))
        assert torch.equal(kept_patches(states["llm[0]@3"], b), patches(ref["plans"][3], ref["image"]))
        compare(ref, b, logits, tokens, steps)
    assert report.layer_visual == [[64] * 3, [64] * 3, [63] * 3, [30] * 3]
    assert [layer.keys.shape[2] for layer in cache.layers] == [L, L, L - 1, L - 34]
    # batched = per sample
    for b, (logits1, (tokens1, steps1)) in enumerate(singles):
        torch.testing.assert_close(logits[b], logits1[0], rtol=0, atol=1e-10)
        assert torch.equal(tokens[b], tokens1[0])
        torch.testing.assert_close(steps[b], steps1[0], rtol=0, atol=1e-6)


def test_sparsevlm_llm_compact_positions_matter(model, batch3, features, sparsevlm_refs):
    """The reference is sharp enough to tell the position rules apart (so the comparison above means something)."""
    b = 1
    margins: list = []
    acts = {2: (sparsevlm_decide(0, margins), "remove", "original"),
            3: (sparsevlm_decide(1, margins), "remove", "original")}
    original = reference_pass(model, prompt(batch3, b), features[b], len(prompt(batch3, b)), acts, {})[0]
    assert (original - sparsevlm_refs[b]["prefill"]).abs().max() > 1e-4


def _clusters_of(state2, state3, b: int, image: int, k: int) -> dict:
    """The integration's partition of the recycled tokens (by ``origin``), as ``src`` groups per step."""
    groups2 = [[image + int(p) for p in torch.nonzero(state2.origin[b] == j).squeeze(1)] for j in range(63, state2.N)]
    groups3 = [[image + int(p) for p in torch.nonzero(state3.origin[b] == j).squeeze(1)]
               for j in range(k, int(state3.counts[b]))]
    return {0: groups2, 1: groups3}


def test_sparsevlm_llm_recycling(model, batch3, features):
    layers = model.model.language_model.layers
    with arrcoc.hf.apply(model, sparsevlm(recycle=True)) as run:
        logits = forward_logits(model, batch3)
        states, report = run.llm_states, run.report
        tokens, steps = generate(model, batch3)
        singles = []
        for b in range(3):
            seen: dict = {}

            def output_of(i):
                def hook(module, args, output):
                    seen[f"out{i}"] = output[0] if isinstance(output, tuple) else output
                return hook

            def input_of(i):
                def hook(module, args, kwargs):
                    seen[f"in{i}"] = args[0] if args else kwargs["hidden_states"]
                    seen[f"pos{i}"] = kwargs["position_ids"]
                return hook

            # Registered inside the context: the pre-hooks run after the integration's and see what the layer sees.
            handles = [layers[1].register_forward_hook(output_of(1)), layers[2].register_forward_hook(output_of(2)),
                       layers[2].register_forward_pre_hook(input_of(2), with_kwargs=True),
                       layers[3].register_forward_pre_hook(input_of(3), with_kwargs=True)]
            try:
                logits1 = forward_logits(model, sample(batch3, b))
            finally:
                for h in handles:
                    h.remove()
            singles.append((logits1, run.llm_states, run.report.layer_visual, seen,
                            generate(model, sample(batch3, b))))
    # Counts: 64 -> 63 kept + 1 cluster (1 deleted: m = int(0.3) + 1 = 1, 1 // 10 + 1 = 1 cluster) ->
    # 30 kept + 2 clusters (34 deleted: m = int(10.2) + 1 = 11, 11 // 10 + 1 = 2 clusters).
    assert report.layer_visual == [[64] * 3, [64] * 3, [63 + 1] * 3, [30 + 2] * 3]
    assert report.layer_tokens == [[n - N0 + v for n in (73, 76, 72)] for v in (64, 64, 64, 32)]
    s2, s3 = states["llm[0]@2"], states["llm[0]@3"]
    assert s2.size[:, :64].tolist() == [[1.0] * 64] * 3  # the one cluster of step 1 holds one token
    assert s3.size.sum(1).tolist() == [30 + 11.0] * 3  # 30 kept + the 11 recycled patches
    for b in range(3):
        ids = prompt(batch3, b)
        image = first_image(ids)
        margins: list = []
        clusters = _clusters_of(s2, s3, b, image, 30)
        acts = {2: (sparsevlm_decide(0, margins, clusters), "remove", "compact"),
                3: (sparsevlm_decide(1, margins, clusters), "remove", "compact")}
        ref = reference(model, ids, features[b], acts)
        assert min(margins) > 1e-5, margins
        compare(ref, b, logits, tokens, steps)

        # Hidden states: the cluster tokens sit right after the kept visual tokens, positions compact.
        logits1, states1, visual1, seen, (tokens1, steps1) = singles[b]
        n = len(ids)
        h1, x2, h2, x3 = seen["out1"][0], seen["in2"][0], seen["out2"][0], seen["in3"][0]
        kept2 = patches(ref["plans"][2][:63], image)
        deleted2 = patches(ref["plans"][2][63:], image)
        assert len(deleted2) == 1
        expect2 = torch.cat([h1[:image], h1[image + kept2], h1[image + deleted2], h1[image + N0:]])
        assert torch.equal(x2, expect2)
        t2 = states1["llm[0]@2"].origin[0]  # patch -> slot at layer 2
        t3 = states1["llm[0]@3"].origin[0]  # patch -> token at layer 3
        visual3 = []
        for j in range(32):
            slots = t2[t3 == j]
            assert len(slots) == 1 if j < 30 else len(slots) >= 1, (j, slots)  # a kept token, or a cluster
            visual3.append(h2[image + slots].mean(0))
        kept3 = [int(t2[t3 == j]) for j in range(30)]
        assert kept3 == sorted(kept3)  # kept tokens in their original order, before the clusters
        torch.testing.assert_close(x3, torch.cat([h2[:image], torch.stack(visual3), h2[image + N0:]]),
                                   rtol=0, atol=1e-12)
        assert seen["pos2"].tolist() == [list(range(n))]
        assert seen["pos3"].tolist() == [list(range(n - 32))]
        # batched = per sample
        assert visual1 == [[64], [64], [64], [32]]
        for key in ("llm[0]@2", "llm[0]@3"):
            assert torch.equal(states1[key].origin[0], states[key].origin[b]), (b, key)
        torch.testing.assert_close(logits[b], logits1[0], rtol=0, atol=1e-10)
        assert torch.equal(tokens[b], tokens1[0])
        torch.testing.assert_close(steps[b], steps1[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- 2. aim_prune
@pytest.fixture(scope="module")
def aim_refs(model, batch3, features):
    """``start_layer: 1, step: 0.25`` on 4 layers: keep 1.0, 0.75, 0.5, 0.25 after layers 0..3, so layer 1's
    attention leaves 48 visual tokens (from layer 2 on) and layer 2's 32 (layer 3)."""
    refs = []
    for b in range(3):
        margins: list = []
        acts = {2: (aim_decide(0.75, margins), "mask", "original"), 3: (aim_decide(0.5, margins), "mask", "original")}
        refs.append(reference(model, prompt(batch3, b), features[b], acts))
        assert min(margins) > 1e-4, margins
    return refs


def _run_aim(model, batch3, mode: str):
    with arrcoc.hf.apply(model, aim(mode)) as run:
        logits = forward_logits(model, batch3)
        states, report = run.llm_states, run.report
        with torch.no_grad():
            cache = output_cache(model(**batch3, position_ids=generate_positions(batch3["attention_mask"])))
        tokens, steps = generate(model, batch3)
    return logits, states, report, [layer.keys.shape[2] for layer in cache.layers], tokens, steps


def test_aim_prune_mask_equals_no_cache_reference(model, batch3, aim_refs):
    L = batch3["input_ids"].shape[1]
    logits, states, report, cache_lengths, tokens, steps = _run_aim(model, batch3, "mask")
    for b, ref in enumerate(aim_refs):
        assert len(ref["plans"][2]) == 48 and len(ref["plans"][3]) == 32
        assert torch.equal(kept_patches(states["llm[0]@2"], b), patches(ref["plans"][2], ref["image"]))
        assert torch.equal(kept_patches(states["llm[0]@3"], b), patches(ref["plans"][3], ref["image"]))
        compare(ref, b, logits, tokens, steps)
    assert report.layer_visual == [[64] * 3, [64] * 3, [48] * 3, [32] * 3]
    assert report.layer_tokens == [[73, 76, 72]] * 4  # masked tokens are still computed
    assert cache_lengths == [L] * 4  # ... and cached


def test_aim_prune_remove_equals_mask(model, batch3, aim_refs):
    """Removing keys nobody may attend to changes nothing but the cost: same sets, tokens and logits."""
    L = batch3["input_ids"].shape[1]
    logits, states, report, cache_lengths, tokens, steps = _run_aim(model, batch3, "remove")
    for b, ref in enumerate(aim_refs):
        assert torch.equal(kept_patches(states["llm[0]@2"], b), patches(ref["plans"][2], ref["image"]))
        assert torch.equal(kept_patches(states["llm[0]@3"], b), patches(ref["plans"][3], ref["image"]))
        compare(ref, b, logits, tokens, steps)
    assert report.layer_visual == [[64] * 3, [64] * 3, [48] * 3, [32] * 3]
    assert report.layer_tokens == [[73, 76, 72]] * 2 + [[57, 60, 56], [41, 44, 40]]
    assert cache_lengths == [L, L, L - 16, L - 32]


# --------------------------------------------------------------------------- 3. composition
def test_two_llm_stages_equal_reference(model, batch3, features):
    """fastv at layer 1 (keep 0.5 of 64) then fastv at layer 3 (keep 0.5 of the 32 left)."""
    with arrcoc.hf.apply(model, FASTV_TWICE) as run:
        logits = forward_logits(model, batch3)
        states, report = run.llm_states, run.report
        tokens, steps = generate(model, batch3)
    assert sorted(states) == ["llm[0]@1", "llm[1]@3"]
    for b in range(3):
        acts = {1: (fastv_decide(0.5), "remove", "original"), 3: (fastv_decide(0.5), "remove", "original")}
        ref = reference(model, prompt(batch3, b), features[b], acts)
        assert len(ref["plans"][1]) == 32 and len(ref["plans"][3]) == 16
        assert torch.equal(kept_patches(states["llm[0]@1"], b), patches(ref["plans"][1], ref["image"]))
        assert torch.equal(kept_patches(states["llm[1]@3"], b), patches(ref["plans"][3], ref["image"]))
        compare(ref, b, logits, tokens, steps)
    assert report.layer_visual == [[64] * 3, [32] * 3, [32] * 3, [16] * 3]


def test_pre_llm_then_llm_stage_equals_reference(model, batch3):
    """random_keep 16 before the LLM, then fastv at layer 2: the reference runs on the kept features, in a
    prompt with 16 placeholders (positions and decoding numbered over the shortened prompt)."""
    with arrcoc.hf.apply(model, PRE_AND_LLM) as run:
        logits = forward_logits(model, batch3)
        pre, states, report = run.state, run.llm_states, run.report
        tokens, steps = generate(model, batch3)
    assert pre.counts.tolist() == [16] * 3
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output
    for b in range(3):
        feats = pre.tokens[b, :16]
        chosen = torch.nonzero(pre.origin[b] >= 0).squeeze(1)  # the patches random_keep kept
        patch_of_slot = torch.empty(16, dtype=torch.long)
        patch_of_slot[pre.origin[b, chosen]] = chosen
        assert torch.equal(feats, full[b][patch_of_slot])  # a selection of the model's own features
        ids = prompt(batch3, b).tolist()
        image = ids.index(IMAGE)
        short = torch.tensor(ids[:image] + [IMAGE] * 16 + ids[image + N0:])
        ref = reference(model, short, feats, {2: (fastv_decide(0.5), "remove", "original")})
        kept = patches(ref["plans"][2], image)  # slots among the 16
        assert len(kept) == 8
        assert torch.equal(kept_patches(states["llm[0]@2"], b), patch_of_slot[kept].sort().values)
        compare(ref, b, logits, tokens, steps)
    assert report.layer_visual == [[16] * 3, [16] * 3, [8] * 3, [8] * 3]


def test_two_stages_at_one_layer_score_the_survivors(model, batch3):
    """Two fastv stages at the same layer: the second must score the survivors of the first with layer 1's
    attention (= one fastv keeping the top 16), or the pipeline must be refused; never score other columns."""
    twice = {"encoder": ENC, "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}] * 2}
    once = {"encoder": ENC, "llm": [{"use": "fastv", "layer": 2, "keep": 16}]}
    with arrcoc.hf.apply(model, once) as run:
        ref_logits = forward_logits(model, batch3)
        (ref_state,) = run.llm_states.values()
    try:
        with arrcoc.hf.apply(model, twice) as run:
            logits = forward_logits(model, batch3)
            state = run.llm_states["llm[1]@2"]
    except ArrcocError:
        return  # refusing the composition is fine
    for b in range(3):
        assert torch.equal(kept_patches(state, b), kept_patches(ref_state, b)), b
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)


def test_stage_dropping_nothing_after_a_compact_stage_changes_nothing(model, batch3):
    """sparsevlm_llm renumbers at layer 2 (compact); a fastv at layer 3 that keeps every token (positions
    original: kept tokens keep their position ids) must leave the sequence, positions included, as it was."""
    first = {"use": "sparsevlm_llm", "layers": [1], "budget": 64, "recycle": False}
    with arrcoc.hf.apply(model, {"encoder": ENC, "llm": [first]}) as run:
        ref_logits = forward_logits(model, batch3)
        ref_tokens, ref_steps = generate(model, batch3)
    assert run.report.layer_visual == [[64] * 3, [64] * 3, [63] * 3, [63] * 3]
    with arrcoc.hf.apply(model, {"encoder": ENC, "llm": [first, {"use": "fastv", "layer": 3, "keep": 1.0}]}) as run:
        logits = forward_logits(model, batch3)
        tokens, steps = generate(model, batch3)
    assert run.report.layer_visual == [[64] * 3, [64] * 3, [63] * 3, [63] * 3]
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(steps, ref_steps, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- 4. FLOPs
@pytest.mark.parametrize("spec, visual, masks", [
    (sparsevlm(recycle=False), [64, 64, 63, 30], False),
    (sparsevlm(recycle=True), [64, 64, 64, 32], False),
    (aim("remove"), [64, 64, 48, 32], False),
    (aim("mask"), [64, 64, 48, 32], True),
    (FASTV_TWICE, [64, 32, 32, 16], False),
], ids=["sparsevlm", "sparsevlm_recycle", "aim_remove", "aim_mask", "fastv_twice"])
def test_layer_flops_count_real_tokens(model, batch3, spec, visual, masks):
    cfg = model.config.text_config
    with arrcoc.hf.apply(model, {"encoder": ENC}) as run:
        forward_logits(model, batch3)
    unpruned = run.report.layer_flops
    with arrcoc.hf.apply(model, spec) as run:
        forward_logits(model, batch3)
    report = run.report
    lengths = batch3["attention_mask"].sum(1).tolist()
    assert report.layer_visual == [[v] * 3 for v in visual]
    tokens = [[n if masks else n - N0 + v for n in lengths] for v in visual]
    assert report.layer_tokens == tokens
    assert report.layer_flops == [sum(layer_flops(cfg, n) for n in row) for row in tokens]
    assert unpruned == [sum(layer_flops(cfg, n) for n in lengths)] * 4
    if masks:
        assert report.layer_flops == unpruned
    else:
        assert all(f < u for f, u in zip(report.layer_flops[3:], unpruned[3:]))
    assert report.prefill_flops == sum(report.layer_flops)


# ---------------------------------------------------------------- refused configurations (review findings)
def test_mask_mode_with_compact_positions_is_refused(model):
    spec = {"encoder": {"use": "timm_vit"},
            "llm": [{"use": "aim_prune", "start_layer": 1, "step": 0.25, "mode": "mask", "positions": "compact"}]}
    with pytest.raises(arrcoc.ArrcocError, match="mode 'mask' nothing leaves"):
        with arrcoc.hf.apply(model, spec):
            pass


def test_a_stage_acting_at_no_layer_is_refused(model):
    # aim_prune's official start_layer 14 is beyond a 4-layer LLM: an error, not a silent no-op.
    with pytest.raises(arrcoc.ArrcocError, match="acts at no decoder layer of this 4-layer LLM"):
        with arrcoc.hf.apply(model, {"encoder": {"use": "timm_vit"}, "llm": [{"use": "aim_prune"}]}):
            pass


def test_generate_without_cache_is_refused_with_llm_stages(model, batch3):
    with arrcoc.hf.apply(model, {"encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": 2}]}):
        with pytest.raises(arrcoc.InputError, match="use_cache=False"):
            model.generate(**batch3, max_new_tokens=2, use_cache=False)
        # the same setting read from a generation config (given, or the model's): it pruned again at every step
        from transformers import GenerationConfig

        with pytest.raises(arrcoc.InputError, match="use_cache=False"):
            model.generate(**batch3, generation_config=GenerationConfig(max_new_tokens=2, use_cache=False))
        default = model.generation_config.use_cache
        model.generation_config.use_cache = False
        try:
            with pytest.raises(arrcoc.InputError, match="use_cache=False"):
                model.generate(**batch3, max_new_tokens=2)
        finally:
            model.generation_config.use_cache = default
