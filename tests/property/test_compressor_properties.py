"""Property tests: random ragged ``TokenState``s through every built-in compressor and through random chains.

States are ragged batches of 1-4 images with 1-600 patches in fp32 / fp16 /
bf16, with degenerate values on demand (tied values, zero tokens, duplicate
tokens, flat attention, an image with no token left), a class token or not, and every input a compressor
may need (``cls_attn``, ``keys``, ``attn_from_last``, a query; the in-LLM
signals of ``sparsevlm_llm`` / ``aim_prune`` are attached before their stage
as the model integration does).  Each compressor runs with its default and
with random parameters.  After every stage:

* ``state.check()``; the class token and the query are untouched;
* each real token's ``size`` is the number of patches whose ``origin``
  points at it (so sizes add up to the patches still represented), and no
  dropped patch comes back;
* ``positions`` are those patches' centroid on the grid;
* no NaN or inf from finite input;
* determinism: the same input twice gives identical output;
* a ragged batch equals per-image runs: ``origin`` and ``size`` exactly,
  values within the dtype's tolerance.  An image's budget that cannot be met
  is a ``BudgetError`` for the batch and for that image alone.

Hypothesis profiles are in tests/conftest.py (``HYPOTHESIS_PROFILE=deep``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import arrcoc  # noqa: E402
from arrcoc import ops  # noqa: E402
from arrcoc.errors import ArrcocWarning, BudgetError, ParamsError  # noqa: E402
from arrcoc.plugin import LLMCompressor  # noqa: E402
from arrcoc.state import LLMContext, TokenState  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: (rtol, atol) of values computed from the same numbers in a batch or alone.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
#: Text tokens after the image that dart's signals give each prompt.
DART_TEXT = 6
NUM_LAYERS = 28  # LLM depth given to in-LLM stages (aim_prune's official schedule is for 28 layers)


# ------------------------------------------------------------------- states
@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything a random state is built from (what a counterexample prints)."""

    B: int
    H: int
    W: int
    D: int
    C: int
    T: int
    dtype: str
    seed: int
    ties: bool  # values on a few levels: tied cosines, tied attention
    zeros: bool  # some tokens, keys and attentions exactly zero
    dups: bool  # some tokens (with their keys and attention) copies of one token
    attn: str  # "uniform", "peaked" (a few outliers) or "flat" (all equal)
    cls: bool
    ragged: str  # "none" (full grid), "prefix" (first counts[b] patches) or "shuffled" (a random subset)
    empty: bool  # ragged: the first image keeps no token at all (as an in-LLM stage may leave it)


@st.composite
def state_specs(draw, full: bool = False) -> StateSpec:
    H = draw(st.integers(1, 24))
    return StateSpec(
        B=draw(st.integers(1, 4)),
        H=H,
        W=draw(st.integers(1, max(1, min(24, 600 // H)))),
        D=draw(st.integers(1, 12)),
        C=draw(st.integers(1, 6)),
        T=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        seed=draw(st.integers(0, 2**20)),
        ties=draw(st.booleans()),
        zeros=draw(st.booleans()),
        dups=draw(st.booleans()),
        attn=draw(st.sampled_from(["uniform", "peaked", "flat"])),
        cls=draw(st.booleans()),
        ragged="none" if full else draw(st.sampled_from(["none", "prefix", "shuffled"])),
        empty=draw(st.booleans()) and not full,
    )


def build_state(spec: StateSpec) -> TokenState:
    g = torch.Generator().manual_seed(spec.seed)
    B, N0, dtype = spec.B, spec.H * spec.W, DTYPES[spec.dtype]
    tokens = torch.randn(B, N0, spec.D, generator=g)
    keys = torch.randn(B, N0, spec.C, generator=g)
    attn = (2.5 * torch.randn(B, N0, generator=g)).softmax(-1) if spec.attn == "peaked" else torch.rand(B, N0, generator=g)
    last = torch.rand(B, N0, generator=g)
    if spec.ties:  # tokens and keys drawn from a palette of 3 random vectors, attentions on 3 levels
        pick = torch.randint(0, 3, (B, N0, 1), generator=g)
        tokens = torch.randn(B, 3, spec.D, generator=g).gather(1, pick.expand(B, N0, spec.D))
        keys = torch.randn(B, 3, spec.C, generator=g).gather(1, pick.expand(B, N0, spec.C))
        attn, last = (attn * 3).floor() / 3, (last * 3).floor() / 3
    if spec.attn == "flat":
        attn = torch.full((B, N0), 1.0 / N0)
    if spec.zeros:
        z = torch.rand(B, N0, generator=g) < 0.3
        tokens, keys = tokens.masked_fill(z[..., None], 0.0), keys.masked_fill(z[..., None], 0.0)
        attn, last = attn.masked_fill(z, 0.0), last.masked_fill(z, 0.0)
    if spec.dups:
        d = torch.rand(B, N0, generator=g) < 0.3
        tokens, keys = torch.where(d[..., None], tokens[:, :1], tokens), torch.where(d[..., None], keys[:, :1], keys)
        attn, last = torch.where(d, attn[:, :1], attn), torch.where(d, last[:, :1], last)
    query = torch.randn(B, spec.T, spec.D, generator=g)
    query_mask = torch.rand(B, spec.T, generator=g) < 0.7
    query_mask[:, 0] = True
    state = TokenState.from_patches(
        tokens.to(dtype), (spec.H, spec.W),
        cls_token=torch.randn(B, spec.D, generator=g).to(dtype) if spec.cls else None,
        per_token={"cls_attn": attn.to(dtype), "keys": keys.to(dtype), "attn_from_last": last.to(dtype)},
    ).replace(query=query.to(dtype), query_mask=query_mask)
    if spec.ragged != "none":
        counts = torch.randint(1, N0 + 1, (B,), generator=g)
        if spec.empty:
            counts[0] = 0
        if spec.ragged == "shuffled":
            index = torch.stack([torch.randperm(N0, generator=g) for _ in range(B)])
        else:
            index = torch.arange(N0).expand(B, N0).contiguous()
        valid = torch.arange(N0)[None, :] < counts[:, None]
        state = ops.keep(state, index.masked_fill(~valid, 0), valid)
    return state


# -------------------------------------------------------------- parameters
def keeps(max_count: int = 40):
    return st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.1]), st.floats(0.01, 1.0), st.integers(1, max_count))


def maybe(**fields):
    """A dict with any subset of ``fields`` (the empty one = the defaults)."""
    return st.fixed_dictionaries({}, optional=fields)


PARAMS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "aim_merge": maybe(
        keep=st.lists(keeps(), min_size=1, max_size=3), weighting=st.sampled_from(["mean", "size", "seed"]),
        metric=st.sampled_from(["tokens", "keys"]), order=st.sampled_from(["official", "spatial"]),
        budget=st.sampled_from(["official", "present"]),
    ),
    "aim_prune": maybe(
        start_layer=st.integers(1, NUM_LAYERS - 1), step=st.floats(0.05, 1.0), tau=st.floats(0.05, 1.0),
        iters=st.integers(1, 6), mode=st.sampled_from(["mask", "remove"]),
    ),
    "cdpruner": maybe(keep=keeps(), negate=st.booleans(), theta=st.one_of(st.none(), st.floats(0.05, 0.95)),
                      eps=st.sampled_from([0.0, 1e-5, 1e-3])),
    "dart": maybe(
        keep=keeps(), count=st.sampled_from(["official", "exact"]), pivot_order=st.sampled_from(["official", "score"]),
        image_pivots=st.integers(0, 6), text_pivots=st.integers(0, DART_TEXT),
    ),
    # (the states' queries have 1 to 4 tokens, the first always real: dart_pre's text pivots stay within them)
    "dart_pre": st.fixed_dictionaries({"text_pivots": st.integers(0, 1)}, optional={
        "keep": keeps(), "count": st.sampled_from(["official", "exact"]), "image_pivots": st.integers(0, 6)}),
    "divprune": maybe(keep=keeps(), mask_chosen=st.booleans(), metric=st.sampled_from([None, "keys"])),
    "fastv": maybe(keep=keeps(), rounding=st.sampled_from(["floor", "round"])),
    "hired": maybe(keep=keeps()),
    "pool": st.one_of(
        st.fixed_dictionaries({"grid": st.tuples(st.integers(1, 6), st.integers(1, 6))}),
        st.fixed_dictionaries({"stride": st.one_of(st.integers(1, 5), st.tuples(st.integers(1, 5), st.integers(1, 5)))}),
        st.fixed_dictionaries({"keep": keeps()}),
    ),
    "prumerge": maybe(keep=keeps(), neighbors=st.integers(1, 40)),
    "prumerge_plus": maybe(keep=keeps(), neighbors=st.integers(1, 40)),
    "pyramiddrop": maybe(
        layers=st.sampled_from([[8, 16, 24], [2], [2, 6], [1, 2, 3], [6, 15, 27]]), ratio=st.floats(0.01, 1.0),
        positions=st.sampled_from(["compact", "original"]), decode_positions=st.sampled_from(["unpruned"]),
    ),
    "random_keep": maybe(keep=keeps(), seed=st.integers(0, 100)),
    "scope": maybe(keep=keeps(), alpha=st.floats(0.0, 3.0), combine=st.sampled_from(["multi", "add"]),
                   score=st.sampled_from(["cls_attn", None]), heads=st.integers(1, 16)),
    "sparsevlm": maybe(
        keep=keeps(), w_text=st.floats(0.0, 1.0), w_sal=st.floats(0.0, 1.0),
        norm=st.sampled_from(["minmax", "rank", "zscore", "none"]), recycle=st.booleans(),
        recycle_ratio=st.floats(0.01, 1.0), cluster_divisor=st.integers(1, 12),
    ),
    "sparsevlm_llm": maybe(
        budget=st.sampled_from([192, 128, 96, 64]), layers=st.sampled_from([[2, 6, 15], [2], [6, 15], [15]]),
        count=st.sampled_from(["table", "adaptive"]), scale=st.floats(0.1, 2.0), recycle=st.booleans(),
        recycle_ratio=st.floats(0.01, 1.0), cluster_divisor=st.integers(1, 12),
    ),
    "tome": maybe(
        r=st.one_of(st.integers(0, 300), st.lists(st.integers(0, 60), min_size=1, max_size=3)),
        metric=st.sampled_from(["keys", "tokens"]), size_weighted=st.booleans(),
        class_token=st.one_of(st.none(), st.booleans()), order=st.sampled_from(["official", "spatial"]),
    ),
    "vispruner": st.one_of(
        st.just({}),
        st.fixed_dictionaries({"keep": keeps(64), "important_ratio": st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])}),
        st.fixed_dictionaries({"keep": keeps(64), "important_ratio": st.floats(0.0, 1.0)},
                              optional={"step": st.integers(1, 9)}),
    ),
    "visionzip": st.one_of(
        st.just({}),
        st.fixed_dictionaries({"dominant": st.integers(1, 12), "contextual": st.integers(1, 8)}),
        st.fixed_dictionaries({"keep": keeps(64)}),
    ),
}
#: Needs the full, uncompressed grid: runs first, on an unpruned state.
FIRST_ONLY = {"pool"}


def builtin_compressors() -> list[str]:
    return sorted(i.name for i in arrcoc.list_plugins("compressor") if i.cls.__module__.startswith("arrcoc_plugins."))


def test_every_builtin_compressor_is_covered():
    assert builtin_compressors() == sorted(PARAMS)


@st.composite
def plugins(draw, name: str):
    params = draw(PARAMS[name])
    try:
        plugin = arrcoc.create("compressor", name, **params)
    except ParamsError:
        assume(False)  # e.g. sparsevlm with both weights 0
    note(f"{name}({params})")
    return plugin


# ------------------------------------------------------- in-LLM signals
def attach_llm_signals(plugin, state: TokenState, seed: int, layer: int, images: list[int] | None = None) -> TokenState:
    """The inputs a model integration attaches before an ``llm`` stage (``integrations.hf.engine``), random.

    Values are drawn per image from ``seed + b`` at that image's real size, so
    image ``b`` alone gets exactly its row of the batch.  ``images`` names the
    batch rows of ``state`` (default ``0..B-1``).
    """
    images = list(range(state.B)) if images is None else images
    B, N = state.mask.shape
    counts = state.counts.tolist()
    name = plugin.name
    if name == "fastv":
        last = torch.zeros(B, N)
        for row, (b, n) in enumerate(zip(images, counts)):
            last[row, :n] = torch.rand(n, generator=torch.Generator().manual_seed(seed + b))
        return state.with_per_token(attn_from_last=last)
    if name == "pyramiddrop":
        last = torch.zeros(B, N)
        for row, (b, n) in enumerate(zip(images, counts)):
            last[row, :n] = torch.rand(n, generator=torch.Generator().manual_seed(seed + b))
        return state.with_per_token(attn_from_last_here=last).replace(llm=LLMContext(
            layer=layer, num_layers=NUM_LAYERS, input_visual_counts=state.counts))
    if name == "sparsevlm_llm":
        T = state.query.shape[1]
        attn = torch.zeros(B, N, T)
        for row, (b, n) in enumerate(zip(images, counts)):
            attn[row, :n] = torch.rand(n, T, generator=torch.Generator().manual_seed(seed + b))
        attn = attn * state.query_mask[:, None, :]
        return state.with_per_token(attn_from_text=attn).replace(llm=LLMContext(
            layer=layer, num_layers=NUM_LAYERS, input_visual_counts=state.counts, text_mask=state.query_mask,
            input_visual=state.tokens, input_visual_mask=state.mask))
    if name == "dart":
        # Key norms of the visual and text tokens, the text's normed states; each prompt's image starts at
        # sequence index 3 and its DART_TEXT text tokens follow it (the positions fix the pivots' set order).
        T, D = DART_TEXT, state.D
        norms, text, text_norms = torch.zeros(B, N), torch.zeros(B, T, D), torch.zeros(B, T)
        for row, (b, n) in enumerate(zip(images, counts)):
            g = torch.Generator().manual_seed(seed + b)
            norms[row, :n] = torch.rand(n, generator=g)
            text[row], text_norms[row] = torch.randn(T, D, generator=g), torch.rand(T, generator=g)
        positions = (3 + torch.arange(N)).expand(B, N).contiguous()
        text_positions = 3 + state.counts[:, None] + torch.arange(T)[None, :]
        return state.with_per_token(key_norms=norms, normed_hidden=state.tokens).replace(llm=LLMContext(
            layer=layer, num_layers=NUM_LAYERS, input_visual_counts=state.counts, visual_positions=positions,
            text_positions=text_positions, text_mask=torch.ones(B, T, dtype=torch.bool), text_key_norms=text_norms,
            text_normed_hidden=text.to(state.dtype)))
    if name == "aim_prune":
        # Sequence of each image: its visual tokens, then its real query tokens, then padding.
        T = state.query.shape[1]
        L, H = N + T, 2
        t_real = state.query_mask.sum(1).tolist()
        logits = torch.zeros(B, H, L, L)
        seq = torch.zeros(B, L, dtype=torch.bool)
        for row, (b, n, t) in enumerate(zip(images, counts, t_real)):
            logits[row, :, : n + t, : n + t] = torch.randn(H, n + t, n + t, generator=torch.Generator().manual_seed(seed + b))
            seq[row, : n + t] = True
        return state.replace(llm=LLMContext(
            attn_logits=logits, sequence_mask=seq, visual_columns=torch.arange(N).expand(B, N).contiguous(),
            input_visual_counts=state.counts, layer=layer, num_layers=NUM_LAYERS,
        ))
    return state


def llm_layer(plugin, draw) -> int:
    if not isinstance(plugin, LLMCompressor):
        return 0
    layers = plugin.llm_layers(NUM_LAYERS)
    assume(layers)
    return draw(st.sampled_from(list(layers)))


# --------------------------------------------------------------- invariants
def assert_invariants(out: TokenState, inp: TokenState) -> None:
    out.check()
    assert out.B == inp.B and out.grid == inp.grid and out.dtype == inp.dtype
    B, N = out.mask.shape
    present = out.origin >= 0
    assert not bool((present & ~(inp.origin >= 0)).any()), "a dropped patch came back"
    sink = torch.where(present, out.origin, torch.full_like(out.origin, N))
    members = torch.zeros(B, N + 1).scatter_add_(1, sink, present.float())[:, :N]
    assert torch.equal(out.size[out.mask], members[out.mask]), "size != patches pointing at the token"
    assert torch.equal(out.size[out.mask].sum(), present.sum().float())
    H0, W0 = out.grid
    p = torch.arange(H0 * W0)
    coords = torch.stack([torch.div(p, W0, rounding_mode="floor"), p % W0], -1).float().expand(B, -1, -1)
    total = torch.zeros(B, N + 1, 2).scatter_add_(1, sink[..., None].expand(B, -1, 2), coords * present[..., None])
    centroid = total[:, :N] / members.clamp_min(1)[..., None]
    torch.testing.assert_close(out.positions[out.mask], centroid[out.mask], rtol=1e-5, atol=1e-3)
    assert bool(torch.isfinite(out.tokens[out.mask].float()).all()), "non-finite tokens from finite input"
    for name, value in out.per_token.items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value[out.mask].float()).all()), f"non-finite per_token[{name!r}]"
    assert (out.cls is None) == (inp.cls is None) and (out.cls is None or torch.equal(out.cls, inp.cls))


def assert_same(a: TokenState, b: TokenState) -> None:
    """Bit-identical states (determinism)."""
    for name in ("tokens", "mask", "size", "positions", "origin"):
        assert torch.equal(getattr(a, name), getattr(b, name)), f"{name} differs between two identical runs"
    assert sorted(a.per_token) == sorted(b.per_token)
    for name in a.per_token:
        assert torch.equal(a.per_token[name], b.per_token[name]), f"per_token[{name!r}] differs between two runs"


def assert_row_equals(out: TokenState, b: int, one: TokenState) -> None:
    """Row ``b`` of a batched output equals the output of image ``b`` run alone."""
    n = int(one.counts[0])
    assert int(out.counts[b]) == n, f"image {b}: {int(out.counts[b])} tokens in the batch, {n} alone"
    assert torch.equal(out.origin[b], one.origin[0]), f"image {b}: origin differs from its run alone"
    assert torch.equal(out.size[b, :n], one.size[0, :n]), f"image {b}: sizes differ from its run alone"
    rtol, atol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.tokens[b, :n], one.tokens[0, :n], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.positions[b, :n], one.positions[0, :n], rtol=1e-5, atol=1e-4)
    for name, value in out.per_token.items():
        if value.is_floating_point():
            torch.testing.assert_close(value[b, :n], one.per_token[name][0, :n], rtol=rtol, atol=atol)


def for_image(plugin, b: int):
    """The plugin image ``b`` of a batch is equivalent to alone (random_keep draws image b with seed + b)."""
    if plugin.name == "random_keep":
        return arrcoc.create("compressor", "random_keep", **{**plugin.params.model_dump(), "seed": plugin.params.seed + b})
    return plugin


def run(plugin, state: TokenState) -> TokenState:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArrcocWarning)
        return plugin(state)


def stage(plugin, state: TokenState, singles: list[TokenState], seed: int, layer: int) -> tuple[TokenState, list[TokenState]] | None:
    """Run one stage on the batch and on every image alone; check everything; None when a budget cannot be met."""
    batch_in = attach_llm_signals(plugin, state, seed, layer)
    try:
        out = run(plugin, batch_in)
    except BudgetError as error:
        note(f"BudgetError: {error}")
        failed = []
        for b, one in enumerate(singles):
            try:
                run(for_image(plugin, b), attach_llm_signals(plugin, one, seed, layer, [b]))
            except BudgetError:
                failed.append(b)
        assert failed, f"{plugin!r}: BudgetError for the batch ({error}) but every image alone runs"
        return None
    assert_invariants(out, batch_in)
    assert_same(out, run(plugin, batch_in))
    outs = []
    for b, one in enumerate(singles):
        one_in = attach_llm_signals(plugin, one, seed, layer, [b])
        single = run(for_image(plugin, b), one_in)
        assert_invariants(single, one_in)
        assert_row_equals(out, b, single)
        outs.append(single)
    return out, outs


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(PARAMS))
@given(data=st.data())
def test_every_compressor_keeps_the_invariants(name, data):
    spec = data.draw(state_specs(full=name in FIRST_ONLY), label="state")
    plugin = data.draw(plugins(name), label="plugin")
    layer = llm_layer(plugin, data.draw)
    state = build_state(spec)
    stage(plugin, state, [state.image(b) for b in range(state.B)], spec.seed, layer)


@given(data=st.data())
def test_random_chains_keep_the_invariants(data):
    names = data.draw(st.lists(st.sampled_from(sorted(PARAMS)), min_size=2, max_size=4), label="chain")
    names = [n for i, n in enumerate(names) if i == 0 or n not in FIRST_ONLY]
    spec = data.draw(state_specs(full=names[0] in FIRST_ONLY), label="state")
    state = build_state(spec)
    singles = [state.image(b) for b in range(state.B)]
    for i, name in enumerate(names):
        plugin = data.draw(plugins(name), label=f"stage {i}")
        layer = llm_layer(plugin, data.draw)
        result = stage(plugin, state, singles, spec.seed + 1000 * i, layer)
        if result is None:
            return
        state, singles = result
