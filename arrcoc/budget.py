"""One budget vocabulary for every pipeline: the fraction of the visual tokens the LLM sees.

A budget ``f`` asks that the LLM see ``f * original`` visual tokens per
image, ``original`` being what the vision tower produced; for a pipeline
with ``llm:`` stages the count is the **mean over the decoder layers** (the
convention behind SparseVLM's "192 tokens": 576 tokens in the first layers,
fewer later, 192 on average), so a budget is comparable with the prefill
cost across pre-LLM and in-LLM methods.

Each method turns a token target into its own params in its own plugin file
(:meth:`arrcoc.plugin.Plugin.budget_bounds` / ``budget_params``); this
module only splits a pipeline's target among the stages that set a token
count (compressors, allocators, ``llm:`` stages; scorers set none):

* every such stage keeps a share ``rho_i`` of the tokens it receives, and
  the shares multiply to ``f``;
* the shares are equal in log space (``rho_i = c``), except that a stage
  whose range of reachable counts (``budget_bounds``) excludes ``c`` gets
  its nearest bound and the others share the rest ("water filling": an
  in-LLM stage on a 3-layer LLM cannot go below about a third, so the
  pre-LLM stages before it give up more);
* stages are set in order: stage ``i``'s target is ``rho_i`` times the
  tokens the earlier stages were set to hand on (a count for pre-LLM
  stages), and the last stage gets exactly what is left, so rounding in an
  early stage does not add up.

A budget no split can meet (the product of the stages' lower bounds is above
it) is a :class:`~arrcoc.errors.BudgetError` that names each stage's bound.

The plugins' rules share the helpers at the end: :func:`layer_mean` (the
mean over decoder layers an ``llm:`` stage is budgeted by),
:func:`bisect_increasing` and :func:`nearest` (a parameter whose output grows
with it, solved for a target; the split above uses it too) and
:func:`geometric_rounds` (merge rounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import BudgetError
from .plugin import BudgetContext
from .registry import get_registry
from .spec import SECTIONS, PipelineSpec, parse_spec


@dataclass(frozen=True)
class BudgetPlan:
    """A pipeline set to a budget: the spec with derived params, and what changed."""

    fraction: float
    target: float                       # visual tokens per image the LLM should see (mean over layers)
    spec: PipelineSpec
    params: dict[str, dict[str, Any]] = field(default_factory=dict)   # stage label -> params the rule changed


def _setters(spec: PipelineSpec, context: BudgetContext) -> list[tuple[str, str, Any, type]]:
    registry = get_registry()
    out = []
    for label, section, stage in spec.stages():
        if section in ("encoder", "query_encoder"):
            continue
        cls = registry.get(SECTIONS[section][0], stage.use)
        try:
            bounds = cls.budget_bounds(dict(stage.params), context)
        except BudgetError as exc:
            raise BudgetError(f"{spec.source}: {label} ({stage.use}): {exc}") from None
        if bounds is not None:
            out.append((label, section, stage, cls))
    return out


def _ranges(stages: list, shares: list[float], n: float, context: Callable[[int], BudgetContext]
            ) -> list[tuple[float, float]]:
    """Each stage's reachable share of what it receives, for the inputs ``shares`` would give it."""
    out, tokens = [], n
    for (_, _, stage, cls), share in zip(stages, shares):
        lo, hi = cls.budget_bounds(dict(stage.params), context(max(round(tokens), 1)))
        out.append((lo / tokens, hi / tokens))
        tokens *= share
    return out


def _solve(need: float, ranges: list[tuple[float, float]]) -> list[float]:
    """Shares ``clamp(c, lo_i, hi_i)`` whose product is ``need`` (equal in log space where the ranges allow)."""
    def shares(log_c: float) -> list[float]:
        return [min(max(math.exp(log_c), lo), hi) for lo, hi in ranges]

    low = min(math.log(lo) for lo, _ in ranges)
    high = max(math.log(hi) for _, hi in ranges)
    # The product is non-decreasing in c; its upper end meets the need.
    _, high = bisect_increasing(lambda log_c: math.prod(shares(log_c)), need, low, high, steps=100)
    return shares(high)


@dataclass(frozen=True)
class _Request:
    """The budget being planned, as an out-of-reach error names it."""

    spec: PipelineSpec
    fraction: float
    target: float
    original: int
    layers: int


def _stage_shares(stages: list, need: float, n: float, context: Callable[[int], BudgetContext],
                  request: _Request | None = None) -> tuple[list[float], list[tuple[float, float]]]:
    """Shares of ``stages`` multiplying to ``need``, and each stage's range.  A stage's bounds depend on what it
    receives (FastV's floor is ``(n + L - 1) / (L n)``), which depends on the earlier shares: iterated to a fixed
    point.  A ``need`` outside the ranges' product is a :class:`BudgetError` (naming ``request`` when given)."""
    shares = [need ** (1 / len(stages))] * len(stages)
    for _ in range(20):
        ranges = _ranges(stages, shares, n, context)
        floor_, ceil_ = math.prod(lo for lo, _ in ranges), math.prod(hi for _, hi in ranges)
        if need < floor_ * (1 - 1e-9) or need > ceil_ * (1 + 1e-9):
            raise _out_of_reach(stages, ranges, need, n, request)
        new = _solve(need, ranges)
        if max(abs(a - b) for a, b in zip(new, shares)) < 1e-12:
            break
        shares = new
    return shares, ranges


def _reachable(stages: list, need: float, n: float, context: Callable[[int], BudgetContext]) -> bool:
    if not stages:
        return abs(need - 1.0) < 1e-9
    try:
        _stage_shares(stages, need, n, context)
    except BudgetError:
        return False
    return True


def _out_of_reach(stages: list, ranges: list[tuple[float, float]], need: float, n: float,
                  request: _Request | None) -> BudgetError:
    """The error for a ``need`` no shares within ``ranges`` meet: the fewest or most the stages can hand on."""
    floor_ = math.prod(lo for lo, _ in ranges)
    side = "fewest" if need < floor_ else "most"
    reach = (floor_ if side == "fewest" else math.prod(hi for _, hi in ranges)) * n
    each = "; ".join(f"{label} ({stage.use}) hands on {'at least' if side == 'fewest' else 'at most'} "
                     f"{(lo if side == 'fewest' else hi) * 100:.1f}% of what it receives"
                     for (label, _, stage, _), (lo, hi) in zip(stages, ranges))
    if request is None:
        return BudgetError(f"a share of {need:g} is out of reach for the stages: the {side} they can hand on is "
                           f"about {reach:.1f} of {n:g} ({each})")
    spec = request.spec
    return BudgetError(
        f"{spec.source}: budget {request.fraction:g} ({request.target:.1f} of {request.original} visual tokens per "
        f"image, mean over {request.layers} decoder layers) is out of reach for {spec.name!r}: the {side} it can "
        f"hand on is about {reach:.1f} ({each})"
    )


def plan_budget(spec: PipelineSpec, fraction: float, *, original: int, grid: tuple[int, int], layers: int,
                has_cls: bool = False, encoder_layers: int = 0) -> BudgetPlan:
    """``spec`` with each token-setting stage's params derived for ``fraction`` of ``original`` visual tokens."""
    if not 0.0 < fraction <= 1.0:
        raise BudgetError(f"budget: expected a fraction of the visual tokens in (0, 1], got {fraction!r}")
    if original < 1:
        raise BudgetError(f"budget: the vision tower produced {original} visual tokens per image; nothing to budget")

    def context(tokens: int) -> BudgetContext:
        return BudgetContext(tokens=int(tokens), original=int(original), grid=tuple(grid), layers=int(layers),
                             has_cls=bool(has_cls), encoder_layers=int(encoder_layers))

    if spec.encoder.params.get("in_blocks"):
        # Tokens merged inside the encoder's blocks depend on its block count and schedule, which no rule here
        # sees; a caller that wants a budget moves the compressor after the encoder (arrcoc eval does, and says so).
        raise BudgetError(
            f"{spec.source}: encoder.in_blocks compresses inside the vision encoder; budgets apply to stages after "
            "it (compress:, allocate:, llm:)"
        )
    setters = _setters(spec, context(original))
    if not setters:
        raise BudgetError(
            f"{spec.source}: pipeline {spec.name!r} has no stage that sets a token count (compressor, allocator "
            "or llm: stage), so no budget applies to it"
        )
    llm = [label for label, section, _, _ in setters if section == "llm"]
    if len(llm) > 1:
        # The layer means of two in-LLM stages do not compose into one share each; no rule is claimed for it.
        raise BudgetError(f"{spec.source}: budgets support at most one llm: stage, got {', '.join(llm)}")
    target = fraction * original
    request = _Request(spec, fraction, target, original, layers)
    n = float(original)
    changed: dict[str, dict[str, Any]] = {}
    new_params: dict[str, dict[str, Any]] = {}
    for i, (label, section, stage, cls) in enumerate(setters):
        ctx = context(round(n))
        rest = setters[i:]
        shares, ranges = _stage_shares(rest, target / n, n, context, request)
        last = i == len(setters) - 1
        goal = target if last else shares[0] * n
        if section != "llm" and not last:  # pre-LLM stages hand on whole tokens; the later ones absorb the rest
            lo, hi = ranges[0]
            options = sorted({min(max(f(goal), math.ceil(lo * n - 1e-9)), math.floor(hi * n + 1e-9))
                              for f in (round, math.floor, math.ceil)}, key=lambda g: abs(g - goal))
            goal = next((g for g in options if _reachable(rest[1:], target / g, g, context)), options[0])
        elif section != "llm":
            goal = float(min(max(round(goal), 1), math.floor(ranges[0][1] * n + 1e-9)))
        params = cls.budget_params(dict(stage.params), goal, ctx)
        cls.validate_params(params)
        new_params[label] = params
        changed[label] = {k: v for k, v in params.items() if stage.params.get(k, _MISSING) != v}
        changed[label].update({k: None for k in stage.params if k not in params})
        n = goal
    return BudgetPlan(fraction=fraction, target=target, spec=with_params(spec, new_params), params=changed)


_MISSING = object()


def with_params(spec: PipelineSpec, params: dict[str, dict[str, Any]]) -> PipelineSpec:
    """``spec`` with the stages labelled in ``params`` given those params (validated like a file)."""
    data = spec.as_yaml_dict()
    for section, (_, many) in SECTIONS.items():
        if section not in data:
            continue
        if many:
            data[section] = [{"use": s["use"], **params[f"{section}[{i}]"]} if f"{section}[{i}]" in params else s
                             for i, s in enumerate(data[section])]
        elif section in params:
            data[section] = {"use": data[section]["use"], **params[section]}
    return parse_spec(data, source=spec.source)


# ------------------------------------------------- helpers of the plugins' budget rules
def bisect_increasing(f: Callable[[float], float], target: float, lo: float, hi: float, *, steps: int = 60
                      ) -> tuple[float, float]:
    """Where a non-decreasing ``f`` reaches ``target`` on ``[lo, hi]``: the bracket ``(low, high)`` after ``steps``
    halvings, with ``f(low) < target <= f(high)`` whenever ``f(lo) < target <= f(hi)`` (a target ``f`` never
    reaches shrinks the bracket onto ``hi``; one it always reaches, onto ``lo``).

    A budget rule's output is often a step function of its parameter (whole tokens), so the caller picks the end
    it wants, e.g. :func:`nearest` of the two.  A non-increasing ``g`` is ``bisect_increasing(lambda x: -g(x),
    -target, ...)`` (negation is exact, so the steps are those of the mirrored comparison).
    """
    low, high = lo, hi
    for _ in range(steps):
        mid = (low + high) / 2
        if f(mid) < target:
            low = mid
        else:
            high = mid
    return low, high


def nearest(f: Callable[[float], float], target: float, candidates: Iterable[float]) -> float:
    """The candidate whose ``f`` is nearest ``target`` (the first one on a tie)."""
    return min(candidates, key=lambda x: abs(f(x) - target))


def layer_mean(tokens: float, num_layers: int, changes: Iterable[tuple[int, float]]) -> float:
    """Mean over the ``num_layers`` decoder layers of the visual tokens each one sees (the in-LLM budget).

    The layers see ``tokens`` from the LLM input on, and from the input of layer ``layer`` on ``count`` for each
    ``(layer, count)`` of ``changes`` (non-decreasing layers in ``0 .. num_layers``).  E.g. FastV (``[(K,
    keep)]``): ``(K n + (L - K) keep) / L``.  The sum is formed before the one division, so whole counts give the
    exact quotient.
    """
    total, seen, start = 0, tokens, 0
    for layer, count in changes:
        if not start <= layer <= num_layers:
            raise BudgetError(
                f"layer_mean: expected non-decreasing layers in [0, {num_layers}], got {layer} after {start}"
            )
        total += (layer - start) * seen
        start, seen = layer, count
    return (total + (num_layers - start) * seen) / num_layers


def geometric_rounds(n: int, target: int, rounds: int, fewest_after: Callable[[int], int]) -> list[int]:
    """Token counts after each of at least ``rounds`` rounds from ``n`` down to ``target``, geometric (equal
    ratios, rounded), where a round that starts with ``c`` tokens can keep no fewer than ``fewest_after(c)``
    (e.g. half, for bipartite merging); rounds are added until every round can."""
    if not 1 <= target <= n:
        raise BudgetError(f"geometric_rounds: expected 1 <= target <= n, got target {target}, n {n}")
    rounds = max(int(rounds), 1)
    while rounds <= 64 + n:
        counts, before = [], n
        for i in range(1, rounds + 1):
            count = target if i == rounds else max(round(n * (target / n) ** (i / rounds)), target)
            if count < fewest_after(before):
                break
            counts.append(count)
            before = count
        else:
            return counts
        rounds += 1
    raise BudgetError(f"geometric_rounds: no schedule of rounds reaches {target} tokens from {n}")
