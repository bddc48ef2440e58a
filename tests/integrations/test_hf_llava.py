"""``arrcoc.hf.apply`` inside a tiny ``LlavaForConditionalGeneration`` (transformers 5.x).

The models are built from configs (offline, seeded): a CLIP tower of 112 px /
patch 14 (64 image tokens, with a class token), a 4-layer Llama of width 64,
``image_token_id`` 199, pad id 0.  Exact comparisons run in float64.
Prompts are built by hand as token ids: ``bos, text, 64 x <image>, question``,
left-padded with 0, a batch of 3 with different lengths.

Every expectation is computed independently of the integration: by the
unmodified model (outside the context), by hand-built prompts that carry the
kept features, or by a manual no-cache forward over the model's modules
(:func:`reference_forward`, the FastV reference).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import arrcoc  # noqa: E402
from tiny_models import (  # noqa: E402
    BOS, IMAGE, LLAMA, N0, PAD, ROWS, generate_positions, hook_counts, left_pad, llava_batch, llava_row,
    prompt_with_features, reference_attention, sample, tiny_llava,
)
from arrcoc.errors import ArrcocError, BudgetError, InputError, MissingInputError, ModelError  # noqa: E402
from arrcoc.integrations.hf.compat import output_cache  # noqa: E402
from arrcoc.spec import resolve_spec  # noqa: E402

NEW = 10  # new tokens per greedy generation
NO_STAGES = {"encoder": {"use": "timm_vit"}}


def fastv(layer: int = 2, keep: float | int = 0.5) -> dict:
    return {"encoder": {"use": "timm_vit"}, "llm": [{"use": "fastv", "layer": layer, "keep": keep}]}


def compress(*stages: dict) -> dict:
    return {"encoder": {"use": "timm_vit"}, "compress": list(stages)}


# --------------------------------------------------------------------------- models and inputs


@pytest.fixture(scope="module")
def models():
    """``sdpa`` (the default implementation) and an ``eager`` twin with the same weights, float64."""
    sdpa = tiny_llava()
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert eager.config.text_config._attn_implementation == "eager"
    return {"sdpa": sdpa, "eager": eager}


@pytest.fixture(scope="module")
def model(models):
    return models["sdpa"]


@pytest.fixture(scope="module")
def batch3():
    return llava_batch(ROWS)


@pytest.fixture(scope="module")
def batch1(batch3):
    return sample(batch3, 0)


def lengths(inputs: dict) -> list[int]:
    return inputs["attention_mask"].sum(1).tolist()


@torch.no_grad()
def last_logits(model, inputs: dict, **kwargs) -> torch.Tensor:
    return model(**inputs, **kwargs).logits[:, -1]


@torch.no_grad()
def greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)


@torch.no_grad()
def greedy_with_logits(model, inputs: dict):
    """``(sequences, prefill last-position logits)`` of a greedy generation."""
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, out.logits[0]


# --------------------------------------------------------------------------- 1. keep everything = unmodified
@pytest.mark.parametrize("spec", [
    NO_STAGES,
    fastv(layer=2, keep=1.0),
    compress({"use": "random_keep", "keep": 1.0}),
], ids=["no_stages", "fastv_keep_1", "random_keep_1"])
@pytest.mark.parametrize("batch", [1, 3])
def test_keep_everything_is_the_unmodified_model(model, batch1, batch3, spec, batch):
    inputs = batch1 if batch == 1 else batch3
    ref_logits = last_logits(model, inputs)
    ref_tokens = greedy(model, inputs)
    with arrcoc.hf.apply(model, spec) as run:
        logits = last_logits(model, inputs)
        tokens = greedy(model, inputs)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens), (tokens, ref_tokens)
    assert tokens.shape == (batch, inputs["input_ids"].shape[1] + NEW)
    # Every layer saw every visual token (token counts: test_report_counts_real_tokens).
    assert run.report.layer_visual == [[N0] * batch] * 4


# --------------------------------------------------------------------------- 2. pre-LLM = hand-built prompt

@pytest.mark.parametrize("spec, expect", [
    (compress({"use": "random_keep", "keep": 16}), [16, 16, 16]),
    (compress({"use": "hired", "keep": 0.25}), [16, 16, 16]),
    (compress({"use": "prumerge"}), None),  # adaptive: ragged counts
], ids=["random_keep_16", "hired_0.25", "prumerge"])
@pytest.mark.filterwarnings("ignore::arrcoc.ArrcocWarning")
def test_pre_llm_equals_hand_built_prompt(model, batch3, spec, expect):
    inputs = batch3
    L = inputs["input_ids"].shape[1]
    with arrcoc.hf.apply(model, spec) as run:
        logits = last_logits(model, inputs)
        state = run.state
        tokens = greedy(model, inputs)
        state_gen = run.state
    counts = state.counts.tolist()
    if expect is not None:
        assert counts == expect
    else:
        assert len(set(counts)) > 1, f"prumerge was expected to keep ragged counts here, got {counts}"
    assert all(1 <= k < N0 for k in counts)
    assert torch.equal(state_gen.tokens, state.tokens)  # generate compressed the same way
    features = [state.tokens[i, :counts[i]] for i in range(3)]
    assert all(f.dtype == torch.float64 for f in features)

    if spec["compress"][0]["use"] != "prumerge":
        # Selection only: each kept feature is one of the model's own feature rows.
        with torch.no_grad():
            full = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        for f, g in zip(features, full):
            assert (f[:, None] - g[None]).abs().amax(-1).amin(1).max() == 0

    ids_k, mask_k = prompt_with_features(inputs, counts)
    fed = {"input_ids": ids_k, "attention_mask": mask_k,
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
    ref_logits = last_logits(model, fed)
    fed["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    ref_tokens = greedy(model, fed)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    # generate inside the context: the caller's prompt, then the new tokens.
    assert tokens.shape == (3, L + NEW)
    assert torch.equal(tokens[:, :L], inputs["input_ids"])
    assert torch.equal(tokens[:, L:], ref_tokens[:, ids_k.shape[1]:])
    assert run.report.layer_visual == [counts] * 4


# --------------------------------------------------------------------------- 3. FastV = no-cache reference
# The reference computes attention itself, in float64, from the layer's own projections.  The model's eager
# kernel is not usable for it: Llama's ``eager_attention_forward`` takes the softmax in float32
# (``softmax(..., dtype=torch.float32)``), so a float64 model's eager weights carry float32 rounding (~1e-7),
# and the float64 mask minimum becomes -inf in float32, which makes fully masked (left-padding) query rows
# NaN and, through ``0 * NaN`` in ``weights @ values``, every row of a padded sample
# (transformers 5.24, also without arrcoc: see test_hf_eager_float64_padding_is_nan).
@torch.no_grad()
def reference_forward(model, ids: torch.Tensor, mask: torch.Tensor, features: torch.Tensor,
                      drop: torch.Tensor | None = None, K: int | None = None, weights_at: int | None = None):
    """A manual no-cache forward of ``model`` over the whole sequence, layer by layer.

    ``features`` ``[sum N_i, D]`` fill the placeholder rows (row-major);
    ``drop`` ``[B, S]`` marks keys no query may attend to in layers ``>= K``.
    Position ids as ``generate`` computes them.  Returns ``(logits [B, S, V],
    attention weights of layer weights_at [B, H, S, S] or None)``.
    """
    lm = model.model.language_model
    h = model.get_input_embeddings()(ids).clone()
    is_image = ids == IMAGE
    h[is_image] = features.to(h.dtype)
    position_ids = generate_positions(mask)
    cos, sin = lm.rotary_emb(h, position_ids)
    S = ids.shape[1]
    real = mask.bool()
    eye = torch.eye(S, dtype=torch.bool)[None]
    base = torch.ones(S, S, dtype=torch.bool).tril()[None] & real[:, None, :]
    base = base | (eye & ~real[:, :, None])  # a padding row sees itself (finite, seen by nobody)
    weights = None
    for i, layer in enumerate(lm.layers):
        allowed = base if drop is None or i < K else base & ~(drop[:, None, :] & ~eye)
        attn_out, w, _ = reference_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, allowed)
        if i == weights_at:
            weights = w
        h = h + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h)), weights


@torch.no_grad()
def reference_fastv(model, inputs: dict, K: int, keep: float, steps: int = NEW):
    """FastV recomputed without a cache: ``(new tokens [B, steps], prefill logits [B, V], kept image indices)``."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, L = ids.shape
    features = torch.cat(list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    _, w = reference_forward(model, ids, mask, features, weights_at=K - 1)
    last_row = w[:, :, -1, :].mean(1)  # [B, S] head-mean attention of the last token
    drop = torch.zeros(B, L, dtype=torch.bool)
    kept = []
    for b in range(B):
        image_pos = torch.nonzero(ids[b] == IMAGE).squeeze(1)
        k = math.floor(len(image_pos) * keep)
        order = torch.sort(-last_row[b, image_pos], stable=True).indices  # ties: lower index first
        keep_pos = image_pos[order[:k]].sort().values
        drop[b, image_pos] = True
        drop[b, keep_pos] = False
        kept.append(keep_pos - image_pos[0])
    seq, m = ids, mask
    prefill = None
    for t in range(steps):
        logits, _ = reference_forward(model, seq, m, features,
                                      torch.cat([drop, torch.zeros(B, t, dtype=torch.bool)], 1), K)
        if t == 0:
            prefill = logits[:, -1]
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq[:, L:], prefill, kept


def test_reference_without_pruning_is_the_model(model, batch3):
    """The reference itself: nothing dropped -> the unmodified model, logits of every real position."""
    with torch.no_grad():
        features = torch.cat(list(model.model.get_image_features(pixel_values=batch3["pixel_values"]).pooler_output))
        ref = model(**batch3, position_ids=generate_positions(batch3["attention_mask"])).logits
    logits, _ = reference_forward(model, batch3["input_ids"], batch3["attention_mask"], features)
    real = batch3["attention_mask"].bool()
    torch.testing.assert_close(logits[real], ref[real], rtol=0, atol=1e-10)
    tokens = reference_fastv(model, batch3, K=2, keep=1.0, steps=NEW)[0]
    assert torch.equal(tokens, greedy(model, batch3)[:, batch3["input_ids"].shape[1]:])


def test_hf_eager_float64_padding_is_nan(models, batch3):
    """Why the eager twin is not used with padding in float64 (transformers itself, no arrcoc involved)."""
    with torch.no_grad():
        logits = models["eager"](**batch3, position_ids=generate_positions(batch3["attention_mask"])).logits[:, -1]
    padded = (batch3["attention_mask"] == 0).any(1)
    assert torch.equal(logits.isnan().any(1), padded)


def test_fastv_equals_no_cache_reference(model, batch3):
    K, keep = 2, 0.3
    k = math.floor(N0 * keep)
    ref_tokens, ref_logits, ref_kept = reference_fastv(model, batch3, K=K, keep=keep)
    assert all(len(p) == k == 19 for p in ref_kept)
    L = batch3["input_ids"].shape[1]
    with arrcoc.hf.apply(model, fastv(layer=K, keep=keep)) as run:
        with torch.no_grad():
            logits = model(**batch3, position_ids=generate_positions(batch3["attention_mask"])).logits[:, -1]
        (state,) = run.llm_states.values()
        tokens = greedy(model, batch3)
    # The kept image tokens, by their index in the image (origin: patch -> kept token, -1 if dropped).
    assert state.counts.tolist() == [k] * 3
    for b in range(3):
        got = torch.nonzero(state.origin[b] >= 0).squeeze(1)
        assert torch.equal(got, ref_kept[b]), (b, got, ref_kept[b])
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-8)
    assert torch.equal(tokens[:, :L], batch3["input_ids"])
    assert torch.equal(tokens[:, L:], ref_tokens), (tokens[:, L:], ref_tokens)
    assert run.report.layer_visual == [[N0] * 3] * 2 + [[k] * 3] * 2


# --------------------------------------------------------------------------- 4. batched = per sample, sdpa = eager
@pytest.mark.parametrize("spec, kept", [
    (fastv(layer=2, keep=0.5), 32),
    (compress({"use": "hired", "keep": 0.25}), 16),
    (compress({"use": "pool", "grid": [3, 4]}), 12),
], ids=["fastv", "hired", "pool"])
def test_batched_equals_per_sample(model, batch3, spec, kept):
    L = batch3["input_ids"].shape[1]
    with arrcoc.hf.apply(model, spec) as run:
        tokens, logits = greedy_with_logits(model, batch3)
        assert run.report.layer_visual[-1] == [kept] * 3
        singles = []
        for b in range(3):
            singles.append(greedy_with_logits(model, sample(batch3, b)))
            assert run.report.layer_visual[-1] == [kept]
        if "llm" in spec:  # position ids pass through: compare float64 forward logits as well
            with torch.no_grad():
                forward = model(**batch3, position_ids=generate_positions(batch3["attention_mask"])).logits[:, -1]
                forward1 = [model(**sample(batch3, b)).logits[0, -1] for b in range(3)]
            for b in range(3):
                torch.testing.assert_close(forward[b], forward1[b], rtol=0, atol=1e-10)
    for b, (t1, l1) in enumerate(singles):
        assert torch.equal(tokens[b, L:], t1[0, t1.shape[1] - NEW:]), (b, tokens[b, L:], t1)
        torch.testing.assert_close(logits[b], l1[0], rtol=0, atol=1e-6)  # generate hands back float32 logits


@pytest.fixture(scope="module")
def batch3_same_length():
    """Three different prompts of one length (73): no padding, so the float64 eager twin is usable."""
    ids, mask = left_pad([llava_row(3, 5), llava_row(5, 3), llava_row(1, 7)])
    assert bool(mask.all())
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def test_fastv_sdpa_equals_eager(models, batch3_same_length, batch3):
    # float64, no padding (see test_hf_eager_float64_padding_is_nan)
    out = {}
    for impl in ("sdpa", "eager"):
        m = models[impl]
        with arrcoc.hf.apply(m, fastv(layer=2, keep=0.5)) as run:
            out[impl] = (greedy(m, batch3_same_length), last_logits(m, batch3_same_length))
        assert run.report.layer_visual[-1] == [32] * 3
        assert m.config.text_config._attn_implementation == impl
    assert torch.equal(out["sdpa"][0], out["eager"][0])
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=0, atol=1e-6)
    # float32 twins, the padded batch
    inputs = dict(batch3, pixel_values=batch3["pixel_values"].float())
    out = {}
    for impl in ("sdpa", "eager"):
        m = copy.deepcopy(models[impl]).float()
        with arrcoc.hf.apply(m, fastv(layer=2, keep=0.5)):
            with torch.no_grad():
                logits = m(**inputs, position_ids=generate_positions(inputs["attention_mask"])).logits[:, -1]
            out[impl] = (greedy(m, inputs), logits)
    assert torch.equal(out["sdpa"][0], out["eager"][0])
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 5. what each layer sees
def test_layers_see_all_then_kept_tokens(model, batch3):
    K, keep = 2, 16
    L = batch3["input_ids"].shape[1]
    short = L - N0 + keep
    seen: list[tuple[int, int]] = []

    def recorder(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append((i, hidden.shape[1]))
        return hook

    layers = model.model.language_model.layers
    with arrcoc.hf.apply(model, fastv(layer=K, keep=keep)) as run:
        # Registered inside the context, so they run after the integration's own pre-hooks.
        handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                out = model(**batch3, use_cache=True)
            prefill_seen = list(seen)
            report = run.report
            seen.clear()
            with torch.no_grad():
                gen = model.generate(**batch3, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        finally:
            for h in handles:
                h.remove()
    assert prefill_seen == [(0, L), (1, L), (2, short), (3, short)]
    assert [layer.keys.shape[2] for layer in output_cache(out).layers] == [L, L, short, short]
    assert [layer.values.shape[2] for layer in output_cache(out).layers] == [L, L, short, short]
    assert report.layer_visual == [[N0] * 3, [N0] * 3, [keep] * 3, [keep] * 3]
    n = lengths(batch3)
    assert report.layer_tokens == [n, n, [x - N0 + keep for x in n], [x - N0 + keep for x in n]]
    # generate: prefill as above, then one token per step in every layer; the cache grows from there.
    assert seen[:4] == [(0, L), (1, L), (2, short), (3, short)]
    assert all(s == 1 for _, s in seen[4:]) and len(seen) == 4 * NEW
    assert [layer.keys.shape[2] for layer in output_cache(gen).layers] == [L + NEW - 1] * 2 + [short + NEW - 1] * 2
    assert run.report.new_tokens == NEW


@pytest.mark.parametrize("spec, kept", [
    (NO_STAGES, N0),
    (compress({"use": "random_keep", "keep": 16}), 16),
    (fastv(layer=2, keep=1.0), N0),
], ids=["no_stages", "random_keep_16", "fastv_keep_1"])
def test_report_counts_real_tokens(model, batch3, spec, kept):
    """``layer_tokens`` / ``layer_flops`` count each sample's real tokens, padding excluded (report.py)."""
    from arrcoc.integrations.hf import layer_flops

    with arrcoc.hf.apply(model, spec) as run:
        last_logits(model, batch3)
    real = [n - N0 + kept for n in lengths(batch3)]  # [73, 76, 72] -> minus the dropped image tokens
    assert run.report.batch == 3
    assert run.report.layer_visual == [[kept] * 3] * 4
    assert run.report.layer_tokens == [real] * 4
    cfg = model.config.text_config
    assert run.report.layer_flops == [sum(layer_flops(cfg, n) for n in real)] * 4
    # the tower's time is apart only when arrcoc ran it (pre-LLM stages); otherwise it is in the prefill
    caption = run.report.table().caption
    if spec is NO_STAGES or "llm" in spec:
        assert "vision inside the model's prefill" in caption
    else:
        assert f"vision {run.report.vision_ms:.1f} ms" in caption and run.report.vision_ms > 0


def test_report_times_the_tower_that_generate_runs_before_prefill(model, batch3):
    """transformers 5's ``generate`` encodes the images before the prefill forward: ``vision_ms`` holds that
    time (at least the tower's own) and ``prefill_ms`` includes it; a direct forward runs the tower inside
    itself, so its ``prefill_ms`` already counts it and ``vision_ms`` is 0."""
    import time

    spans: list[float] = []
    tower = model.model.vision_tower
    handles = [tower.register_forward_pre_hook(lambda *a: spans.append(-time.perf_counter())),
               tower.register_forward_hook(lambda *a: spans.append(time.perf_counter()))]
    try:
        with arrcoc.hf.apply(model, NO_STAGES) as run:
            greedy(model, batch3)
            report = run.report
            tower_ms = sum(spans) * 1e3
            last_logits(model, batch3)
            direct = run.report
    finally:
        for h in handles:
            h.remove()
    assert len(spans) == 4  # the tower ran once per call
    assert report.vision_ms >= tower_ms > 0
    assert report.prefill_ms >= report.vision_ms + report.llm_prefill_ms
    assert direct.vision_ms == 0.0 and direct.prefill_ms > 0


# --------------------------------------------------------------------------- 6. leaving the context restores
def _assert_restored(model, before_hooks, ref_logits, ref_tokens, inputs):
    from arrcoc.integrations.hf import attention

    assert "generate" not in vars(model)
    assert model.generate.__func__ is type(model).generate
    assert "get_image_features" not in vars(model.model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    for layer in model.model.language_model.layers:
        assert layer.self_attn.config._attn_implementation == "sdpa"
        assert layer.self_attn not in attention._RECORDERS
    for m in [model, model.model, model.model.language_model, *model.model.language_model.layers]:
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not m._forward_pre_hooks_with_kwargs and not m._forward_hooks_with_kwargs
    assert hook_counts(model) == before_hooks
    torch.testing.assert_close(last_logits(model, inputs), ref_logits, rtol=0, atol=0)
    assert torch.equal(greedy(model, inputs), ref_tokens)


SPEC_BOTH = {"encoder": {"use": "timm_vit"}, "compress": [{"use": "random_keep", "keep": 32}],
             "llm": [{"use": "fastv", "layer": 2, "keep": 0.5}]}


def test_exit_restores_the_model(model, batch3):
    before = hook_counts(model)
    ref_logits, ref_tokens = last_logits(model, batch3), greedy(model, batch3)
    with arrcoc.hf.apply(model, SPEC_BOTH) as run:
        assert "generate" in vars(model)
        assert model.config.text_config._attn_implementation == "arrcoc_sdpa"
        inside = greedy(model, batch3)
    assert run.report.layer_visual[-1] == [16] * 3
    assert not torch.equal(inside, ref_tokens)  # the pipeline did act
    _assert_restored(model, before, ref_logits, ref_tokens, batch3)


def test_exit_restores_after_an_exception(model, batch3):
    before = hook_counts(model)
    ref_logits, ref_tokens = last_logits(model, batch3), greedy(model, batch3)
    with pytest.raises(RuntimeError, match="boom"):
        with arrcoc.hf.apply(model, SPEC_BOTH):
            last_logits(model, batch3)
            raise RuntimeError("boom")
    _assert_restored(model, before, ref_logits, ref_tokens, batch3)
    # An error raised by the integration in the middle of a forward (two images, placeholders for one).
    bad = dict(sample(batch3, 0), pixel_values=batch3["pixel_values"][:2])
    with pytest.raises(ArrcocError):
        with arrcoc.hf.apply(model, SPEC_BOTH):
            last_logits(model, bad)
    _assert_restored(model, before, ref_logits, ref_tokens, batch3)


# --------------------------------------------------------------------------- 7. bad input
def test_model_without_adapter(model):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    with pytest.raises(ModelError) as err:
        with arrcoc.hf.apply(llama, fastv()):
            pass
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "no adapter" in msg and "LlavaForConditionalGeneration" in msg
    assert not llama._forward_pre_hooks and "generate" not in vars(llama)


def test_llm_layer_beyond_depth(model):
    before = hook_counts(model)
    with pytest.raises(ModelError) as err:
        with arrcoc.hf.apply(model, fastv(layer=10)):
            pass
    msg = str(err.value)
    assert "layer 10" in msg and "4 layers" in msg and "fastv" in msg
    assert hook_counts(model) == before and "generate" not in vars(model)


def test_vision_attention_on_a_tower_without_class_token():
    try:
        from transformers import SiglipVisionConfig
    except ImportError:  # pragma: no cover
        pytest.skip("no SigLIP in this transformers")
    torch.manual_seed(0)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=112, patch_size=14)
    siglip = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=LlamaConfig(**LLAMA),
                                                       image_token_id=IMAGE, vision_feature_select_strategy="full"))
    with pytest.raises(MissingInputError) as err:
        with arrcoc.hf.apply(siglip.eval(), compress({"use": "hired", "keep": 0.25})):
            pass
    msg = str(err.value)
    assert "hired" in msg and "cls_attention" in msg and "class token" in msg
    assert "generate" not in vars(siglip)


@pytest.mark.parametrize("spec", [compress({"use": "random_keep", "keep": 16}), fastv()],
                         ids=["pre_llm", "llm_only"])
def test_images_and_placeholders_do_not_match(model, batch3, spec):
    bad = dict(sample(batch3, 0), pixel_values=batch3["pixel_values"][:2])  # 2 images, 64 placeholders
    for call in (last_logits, greedy):
        with pytest.raises(InputError) as err:
            with arrcoc.hf.apply(model, spec):
                call(model, bad)
        msg = str(err.value)
        assert "placeholders" in msg and "64" in msg and "2 image" in msg, msg


def test_pre_llm_keep_more_than_exists(model, batch1):
    for call in (last_logits, greedy):
        with pytest.raises(BudgetError) as err:
            with arrcoc.hf.apply(model, compress({"use": "random_keep", "keep": 1000})):
                call(model, batch1)
        msg = str(err.value)
        assert "random_keep" in msg and "1000" in msg and "64" in msg, msg


# --------------------------------------------------------------------------- 8. pipeline forms
def test_apply_accepts_name_dict_path_and_spec(model, batch1, tmp_path):
    yaml_text = (
        "name: my_fastv\n"
        "encoder: {use: timm_vit}\n"
        "llm:\n"
        "  - {use: fastv, layer: 2, keep: 0.5}\n"
    )
    path = tmp_path / "my_fastv.yaml"
    path.write_text(yaml_text)
    as_dict = fastv(layer=2, keep=0.5)
    forms = {"name": "fastv", "dict": as_dict, "path": path, "path_str": str(path), "spec": resolve_spec(as_dict)}
    results = {}
    for label, form in forms.items():
        with arrcoc.hf.apply(model, form) as run:
            results[label] = greedy(model, batch1)
        assert [(s.use, s.params) for s in run.spec.llm] == [("fastv", {"layer": 2, "keep": 0.5})], label
        assert run.report.layer_visual == [[64], [64], [32], [32]], label
    first = results["dict"]
    for label, tokens in results.items():
        assert torch.equal(tokens, first), label
    with pytest.raises(arrcoc.UnknownPipelineError, match="no_such_pipeline"):
        with arrcoc.hf.apply(model, "no_such_pipeline"):
            pass


@pytest.mark.parametrize("spec", [fastv(layer=2, keep=0.5), compress({"use": "random_keep", "keep": 0.5})],
                         ids=["fastv", "random_keep"])
def test_a_conversation_goes_on_from_its_own_cache_after_another_generate(model, spec):
    """Conversation A pauses, another generate (other prompts: rows of other lengths) runs in the same block, then A
    goes on from its cache: it equals A's one longer generate.  The in-LLM masks of layers >= K are those of the
    prompt A's cache holds (they used to be the last prefill's: other padding per row, scores off by ~2e-2)."""
    a = llava_batch([(1, 3), (6, 1)], seed=1)
    b = llava_batch([(6, 1), (1, 3)], seed=2)
    with torch.no_grad(), arrcoc.hf.apply(model, spec):
        whole = model.generate(**a, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                               output_scores=True)
        first = model.generate(**a, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        model.generate(**b, max_new_tokens=3, do_sample=False)
        mask = torch.cat([a["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
        second = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                past_key_values=first.past_key_values, return_dict_in_generate=True,
                                output_scores=True)
    assert torch.equal(second.sequences, whole.sequences)
    for got, want in zip(second.scores, whole.scores[3:]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("spec", [compress({"use": "random_keep", "keep": 0.5}), fastv(layer=2, keep=0.5)],
                         ids=["random_keep", "fastv"])
def test_a_conversation_goes_on_from_a_copy_of_its_cache(model, spec):
    """transformers' prompt-reuse pattern: each continuation from ``copy.deepcopy`` of the returned cache, here
    after another generate on other prompts.  The copy holds the prompt shortened before the LLM and the in-LLM
    masks of its own prompt as the original does (neither was recognised: generate read the caller's long ids
    against the short cache, and layers >= K decoded with the last prefill's masks; silently other tokens)."""
    a = llava_batch([(1, 3), (6, 1)], seed=1)
    with torch.no_grad(), arrcoc.hf.apply(model, spec):
        whole = model.generate(**a, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                               output_scores=True)
        first = model.generate(**a, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        model.generate(**llava_batch([(6, 1), (1, 3)], seed=2), max_new_tokens=3, do_sample=False)
        mask = torch.cat([a["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
        for _ in range(2):  # two continuations from copies of one cache
            second = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=3,
                                    do_sample=False, past_key_values=copy.deepcopy(first.past_key_values),
                                    return_dict_in_generate=True, output_scores=True)
            assert torch.equal(second.sequences, whole.sequences)
            for got, want in zip(second.scores, whole.scores[3:]):
                torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_a_reused_cache_carries_no_earlier_prompts_masks(model):
    """A static cache made once and reset between calls (transformers' way of reusing one): filled under llm:
    stages, it must not hand their masks to a later block without them (a cache carries its prefill's segments,
    so that copies of it have them)."""
    from transformers import StaticCache

    a = llava_batch([(1, 3), (6, 1)], seed=1)
    cache = StaticCache(config=model.config.text_config, max_cache_len=a["input_ids"].shape[1] + 8)

    def generate():
        cache.reset()
        return model.generate(**a, max_new_tokens=4, do_sample=False, past_key_values=cache,
                              return_dict_in_generate=True, output_scores=True)

    with torch.no_grad():
        want = generate()
        with arrcoc.hf.apply(model, fastv(layer=2, keep=0.5)):
            generate()
        with arrcoc.hf.apply(model, NO_STAGES):
            got = generate()
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.scores, want.scores):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_a_reused_cache_carries_no_earlier_shortened_prompt(model):
    """A cache marked as holding a prompt shortened before the LLM, reset and refilled in a block that shortens
    nothing, continues as the model alone does (not from the earlier short prompt)."""
    from transformers import StaticCache

    a = llava_batch([(1, 3), (6, 1)], seed=1)
    cache = StaticCache(config=model.config.text_config, max_cache_len=a["input_ids"].shape[1] + 8)
    mask = torch.cat([a["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)

    def conversation():
        cache.reset()
        first = model.generate(**a, max_new_tokens=3, do_sample=False, past_key_values=cache)
        return model.generate(input_ids=first, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              past_key_values=cache, return_dict_in_generate=True, output_scores=True)

    with torch.no_grad():
        want = conversation()
        with arrcoc.hf.apply(model, compress({"use": "random_keep", "keep": 0.5})):
            conversation()
        with arrcoc.hf.apply(model, NO_STAGES):
            got = conversation()
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.scores, want.scores):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_right_padding_with_the_callers_position_ids_is_the_model(model):
    """Right padding and position_ids given as generate numbers them (padding at 0): a pre-LLM pipeline keeping
    everything equals the model (the rebuilt numbering put 1 on the padding, so the first new token of a
    right-padded row got position 2 instead of 1: scores off by 5e-4)."""
    rows = [[BOS, 5, *[IMAGE] * N0, 30, 31, 32], [BOS, *[IMAGE] * N0, 30]]
    L = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (L - len(r)) for r in rows])
    mask = (ids != PAD).long()
    pixels = torch.randn(2, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                 position_ids=(mask.cumsum(1) - 1).masked_fill(mask == 0, 0))
    options = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        want = model.generate(**batch, **options)
        with arrcoc.hf.apply(model, compress({"use": "random_keep", "keep": 1.0})):
            got = model.generate(**batch, **options)
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.scores, want.scores):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
