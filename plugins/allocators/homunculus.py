"""``homunculus``: spend a fixed token budget where the relevance is, as texture samples of a feature mipmap.

Like the cortical homunculus, which gives the fingertips more cortex than the
back, the allocator gives relevant regions more tokens at finer detail
(DESIGN.md, "Homunculus allocation and the pyramid"):

1. **Regions.** The original patch grid ``H0 x W0`` is cut into cells of
   ``region = [rh, rw]`` patches (default 2x2; the grid must divide evenly),
   ``Hr x Wr`` regions of area ``A = rh * rw``.
2. **Relevance per patch.** ``per_token["relevance"]`` (any field, ``score``)
   is spread back to the patches through ``origin`` (:func:`arrcoc.ops.unmerge`):
   a merged token's relevance goes to every patch it stands for; dropped
   patches have none.  Each region's relevance is the ``max`` (default) or
   ``mean`` over its present patches; a region with no present patch is not
   eligible (the compressor threw all of it away).
3. **Tiers.** Regions are ranked by pooled relevance (ties by region index,
   raster order); tier ``(count, k)`` gives the next ``count`` eligible
   regions ``k`` tokens each: ``[[20, 8], [30, 3], [23, 1]]`` -> 273 tokens.
   Regions past the last tier emit nothing, or, with ``background: true``,
   all of them together emit one background token (the mean feature of
   their patches).  When an image has fewer eligible regions than the tiers
   ask for, the budget goes to the regions it has, in tier order; that
   image gets fewer tokens (the batch is ragged, ``mask`` says which are
   real) and a warning is recorded.
4. **Samples.** A mipmap pyramid (the nested ``pyramid`` plugin, default
   ``mipmap``) is built over the FULL feature grid ``[B, D, H0, W0]``.  A
   compressed token set is unmerged to that grid first (the fill rule):
   a patch that lives in a (merged) token takes that token's features; a
   patch that was dropped outright takes the size-weighted mean of the
   image's tokens.  A region's ``k`` tokens are ``sample(uv, lod)`` at
   ``lod = log4(A / k)`` clamped to ``[0, levels - 1]`` (trilinear between
   levels, bilinear inside one), at the ``k`` most relevant sub-positions of
   the region: the region is divided into a lattice of ``(rh f) x (rw f)``
   sub-cells, ``f`` the smallest integer with ``A f^2 >= k`` (``f = 1``: the
   patches themselves; ``f > 1`` is magnification, ``k > A``), each
   sub-cell scored by the patch relevance map interpolated bilinearly at its
   centre (dropped patches count below every present one), the best ``k``
   taken (ties by raster index).  ``k`` may be at most ``16 A`` (4x
   magnification per axis, ``lod >= -2``): more samples than that would be
   interpolations of interpolations and the allocator refuses them.

The output is a NEW :class:`~arrcoc.state.TokenState` — the one place in
arrcoc where tokens are created rather than moved, so it is built directly
instead of through :mod:`arrcoc.ops`:

* ``tokens`` ``[B, M, D]`` in tier order (region rank, then sample rank),
  the optional background token last; ``mask`` the real ones;
* ``positions``: (row, col) of each sample on the patch grid; ``size``:
  ``A / k`` patches per sample (the background: its patch count);
* ``per_token``: ``lod`` (as sampled), ``tier`` (index into ``tiers``;
  ``-1`` for the background token) and ``relevance`` (the interpolated
  relevance at the sample);
* ``origin``: every patch -> the nearest sample token of its region (ties by
  sample order), ``-1`` for regions that got nothing (or the background);
* ``allocation``: an :class:`Allocation`; ``pyramid``: the built chain.

``cls``, ``query``, ``images``, ``meta`` and ``trace`` carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from arrcoc import ops
from arrcoc.errors import BudgetError, InputError, MissingInputError, record_warning
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Allocator, BudgetContext, Params, PluginRef, budget_count, nested_plugin
from arrcoc.state import TokenState

#: A region's k may be at most MAX_MAGNIFICATION * its area (4x per axis).
MAX_MAGNIFICATION = 16


@dataclass(frozen=True, eq=False)
class Allocation:
    """What the homunculus allocator decided.

    Attributes:
        region: ``(rh, rw)`` patches per region.
        grid: ``(Hr, Wr)`` regions.
        tiers: ``((count, k), ...)`` as configured.
        tier_map: ``[B, Hr, Wr]`` int64, the tier index of each region, ``-1`` for none.
        region_scores: ``[B, Hr, Wr]`` float32 pooled relevance, ``-inf`` where not eligible.
        patch_relevance: ``[B, H0, W0]`` float32 relevance per patch, ``-inf`` where dropped.
        background: whether the unallocated regions share one background token.
    """

    region: tuple[int, int]
    grid: tuple[int, int]
    tiers: tuple[tuple[int, int], ...]
    tier_map: torch.Tensor
    region_scores: torch.Tensor
    patch_relevance: torch.Tensor
    background: bool

    @property
    def budget(self) -> int:
        return sum(c * k for c, k in self.tiers)


def lattice_factor(area: int, k: int) -> int:
    """Smallest integer ``f`` with ``area * f**2 >= k``."""
    f = 1
    while area * f * f < k:
        f += 1
    return f


def fill_features(state: TokenState) -> torch.Tensor:
    """The full feature grid ``[B, D, H0, W0]`` of a (compressed) state.

    Patches that live in a token take its features (``ops.unmerge``);
    dropped patches take the size-weighted mean of the image's real tokens.
    """
    feats, present = ops.unmerge(state)
    w = (state.size * state.mask).to(torch.float32)
    mean = (state.tokens.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
    feats = torch.where(present[..., None], feats, mean[:, None, :].to(feats.dtype))
    H0, W0 = state.grid
    return feats.view(state.B, H0, W0, state.D).permute(0, 3, 1, 2)  # channels-last view: no copy


def relevance_field(patch_rel: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Patch relevance with dropped patches set strictly below every present one (per image)."""
    big = torch.finfo(torch.float32).max
    lo = patch_rel.masked_fill(~present, big).amin(1, keepdim=True)
    hi = patch_rel.masked_fill(~present, -big).amax(1, keepdim=True)
    below = lo - (hi - lo).clamp_min(1.0)
    return torch.where(present, patch_rel, below)


def interpolate(field: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear, clamp-to-edge lookup of ``field`` ``[B, H, W]`` at patch coordinates ``[B, K]``
    (patch ``(i, j)`` has its centre at ``(i, j)``)."""
    B, H, W = field.shape
    x = (cols + 0.5) / W * 2 - 1
    y = (rows + 0.5) / H * 2 - 1
    grid = torch.stack([x, y], -1)[:, None]  # [B, 1, K, 2]
    out = F.grid_sample(field[:, None].float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0, 0]


def allocate(
    relevance: torch.Tensor,
    present: torch.Tensor,
    grid: tuple[int, int],
    region: tuple[int, int],
    tiers: tuple[tuple[int, int], ...],
    pool: str = "max",
) -> dict[str, Any]:
    """The allocation itself, without features: which regions get which tier, and where the samples go.

    ``relevance`` ``[B, N0]`` per patch, ``present`` ``[B, N0]``.  Returns a
    dict with ``tier_map`` ``[B, Hr, Wr]``, ``region_scores`` ``[B, Hr, Wr]``
    and, per tier, ``(regions [B, c], valid [B, c], rows [B, c, k], cols [B, c, k])``.
    """
    B = relevance.shape[0]
    H0, W0 = grid
    rh, rw = region
    Hr, Wr = H0 // rh, W0 // rw
    A, R = rh * rw, Hr * Wr
    device = relevance.device

    def by_region(x: torch.Tensor) -> torch.Tensor:  # [B, N0] -> [B, R, A]
        return x.view(B, Hr, rh, Wr, rw).permute(0, 1, 3, 2, 4).reshape(B, R, A)

    rel = by_region(relevance.float().masked_fill(~present, float("-inf")))
    here = by_region(present)
    count = here.sum(-1)
    if pool == "max":
        pooled = rel.amax(-1)
    else:
        pooled = rel.masked_fill(~here, 0.0).sum(-1) / count.clamp_min(1)
    pooled = pooled.masked_fill(count == 0, float("-inf"))
    eligible = (count > 0).sum(1)  # [B]
    order = torch.sort(pooled, dim=1, descending=True, stable=True).indices  # ties by region index

    field = relevance_field(relevance.float(), present).view(B, H0, W0)
    tier_map = torch.full((B, R), -1, dtype=torch.int64, device=device)
    out_tiers = []
    start = 0
    for t, (c, k) in enumerate(tiers):
        c = max(0, min(c, R - start))
        regions = order[:, start : start + c]
        valid = (start + torch.arange(c, device=device))[None, :] < eligible[:, None]
        f = lattice_factor(A, k)
        sub = (torch.arange(rh * f, device=device, dtype=torch.float32) + 0.5) / f - 0.5
        sub_c = (torch.arange(rw * f, device=device, dtype=torch.float32) + 0.5) / f - 0.5
        sr, sc = torch.meshgrid(sub, sub_c, indexing="ij")  # [rh f, rw f], raster order
        r0 = torch.div(regions, Wr, rounding_mode="floor") * rh
        c0 = (regions % Wr) * rw
        rows = r0[..., None].float() + sr.reshape(-1)  # [B, c, S]
        cols = c0[..., None].float() + sc.reshape(-1)
        S = rows.shape[-1]
        score = interpolate(field, rows.reshape(B, -1), cols.reshape(B, -1)).view(B, c, S)
        best = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]
        rows, cols, score = rows.gather(-1, best), cols.gather(-1, best), score.gather(-1, best)
        tier_map.scatter_(1, regions, torch.where(valid, torch.full_like(regions, t), tier_map.gather(1, regions)))
        out_tiers.append((regions, valid, rows, cols, score))
        start += c
    return {
        "tier_map": tier_map.view(B, Hr, Wr),
        "region_scores": pooled.view(B, Hr, Wr),
        "eligible": eligible,
        "tiers": out_tiers,
    }


def budget_tiers(template: Sequence[tuple[int, int]], target: int, regions: int, area: int) -> list[tuple[int, int]]:
    """Tiers with ``target`` tokens in all, shaped like ``template``, over at most ``regions`` regions.

    The template is read as tokens per region by relevance rank (``[[6, 8], [10, 3], [16, 1]]``: 6 regions of
    8, 10 of 3, 16 of 1; 94 tokens over 32 regions).  The number of regions scales with the target
    (``round(32 * target / 94)``, at most ``regions`` and ``target``), the template is stretched over them, its
    tokens per region scaled to the target, rounded by largest remainder (each 1 to ``16 * area``), and equal
    neighbours become one tier (128 tokens over at most 64 regions: ``[[9, 7], [30, 2], [5, 1]]``).
    """
    ks = [int(k) for c, k in template for _ in range(int(c))]
    rho, tau = len(ks), sum(ks)
    most = MAX_MAGNIFICATION * area
    m = min(max(round(rho * target / tau), 1), regions, target)
    if target > m * most:
        raise BudgetError(f"homunculus: {target} tokens over {m} regions of {area} patches exceed the {most} "
                          f"samples a region can hold")
    shape = [ks[min(j * rho // m, rho - 1)] for j in range(m)]
    raw = [k * target / sum(shape) for k in shape]
    counts = [min(max(math.floor(x), 1), most) for x in raw]
    order = sorted(range(m), key=lambda j: (-(raw[j] - math.floor(raw[j])), j))  # largest remainder first
    while sum(counts) < target:
        j = next(j for j in order if counts[j] < most)
        counts[j] += 1
        order.remove(j)
        order.append(j)
    while sum(counts) > target:
        j = next(j for j in reversed(order) if counts[j] > 1)
        counts[j] -= 1
        order.remove(j)
        order.insert(0, j)
    tiers: list[tuple[int, int]] = []
    for k in counts:
        if tiers and tiers[-1][1] == k:
            tiers[-1] = (tiers[-1][0] + 1, k)
        else:
            tiers.append((1, k))
    return tiers


class HomunculusParams(Params):
    tiers: list[tuple[int, int]] = Field(
        default_factory=lambda: [(20, 8), (30, 3), (23, 1)],
        description="[[count, k], ...]: the next `count` regions by relevance get `k` tokens each.",
    )
    region: tuple[int, int] = Field((2, 2), description="Patches per region, [rows, cols]; must divide the patch grid.")
    pool: Literal["max", "mean"] = Field("max", description="A region's relevance: max or mean over its patches.")
    score: str = Field("relevance", description="The per_token field to allocate by (written by the relevance scorer).")
    background: bool = Field(False, description="One extra token (mean feature) for all regions that got none.")
    pyramid: nested_plugin("pyramid") = Field(  # type: ignore[valid-type]
        default_factory=lambda: PluginRef(use="mipmap", params={"backend": "auto"}),
        description="Feature pyramid the samples are read from, e.g. {use: mipmap, backend: auto}.",
    )

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, tiers: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not tiers:
            raise ValueError("tiers: expected at least one [count, k], got []")
        bad = [list(t) for t in tiers if t[0] < 1 or t[1] < 1]
        if bad:
            raise ValueError(f"tiers: count and k must be >= 1, got {bad}")
        return tiers

    @field_validator("region")
    @classmethod
    def _region(cls, region: tuple[int, int]) -> tuple[int, int]:
        if min(region) < 1:
            raise ValueError(f"region: expected [rows, cols] >= 1, got {list(region)}")
        return region

    @model_validator(mode="after")
    def _placeable(self) -> "HomunculusParams":
        area = self.region[0] * self.region[1]
        bad = [list(t) for t in self.tiers if t[1] > MAX_MAGNIFICATION * area]
        if bad:
            raise ValueError(
                f"tiers: k is more than the pyramid can place: a {self.region[0]}x{self.region[1]} region holds at "
                f"most {MAX_MAGNIFICATION} x {area} = {MAX_MAGNIFICATION * area} samples (4x magnification per "
                f"axis), got {bad}"
            )
        return self


class Homunculus(Allocator):
    """Tiered LOD allocation over regions ranked by relevance, sampled from a feature mipmap."""

    name = "homunculus"
    Params = HomunculusParams
    # In a VLM: after the projector, with the query-aware scorers whose relevance it allocates by (they compare
    # tokens with the query's LLM embeddings), so its samples are read from the projected feature grid.
    stage = "projector"
    adaptive = False

    @classmethod
    def _regions(cls, params: dict, context: BudgetContext) -> tuple[int, int]:
        """``(regions sure to be eligible, patches per region)``: ``n`` present patches fill at least
        ``ceil(n / area)`` regions, so tiers over no more regions than that are never short."""
        rh, rw = cls.validate_params(params).region
        H0, W0 = context.grid
        if H0 % rh or W0 % rw:
            raise BudgetError(f"homunculus: region {rh}x{rw} does not divide the {H0}x{W0} patch grid")
        area = rh * rw
        return min((H0 // rh) * (W0 // rw), -(-context.tokens // area)), area

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        regions, area = cls._regions(params, context)
        return 1.0, float(regions * MAX_MAGNIFICATION * area)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """Tiers of the pipeline's shape with the target's token count (:func:`budget_tiers`)."""
        regions, area = cls._regions(params, context)
        template = cls.validate_params(params).tiers
        t = budget_count(target, regions * MAX_MAGNIFICATION * area)
        return {**params, "tiers": [list(tier) for tier in budget_tiers(template, t, regions, area)]}

    def __init__(self, params: HomunculusParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.pyramid = self.params.pyramid.build("pyramid")

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        rel = state.per_token.get(p.score)
        if rel is None:
            raise MissingInputError(
                f"homunculus: needs per_token[{p.score!r}] (have {sorted(state.per_token)}); add a scorer before "
                "allocate, e.g. `score: [{use: relevance, weights: {query: 0.7, saliency: 0.3}}]`"
            )
        rel = ops.check_scores(rel, state.mask, f"homunculus: per_token[{p.score!r}]")
        H0, W0 = state.grid
        rh, rw = p.region
        if H0 % rh or W0 % rw:
            raise InputError(
                f"homunculus: region {rh}x{rw} does not divide the {H0}x{W0} patch grid; choose a region whose "
                "sides divide the grid's"
            )
        Hr, Wr = H0 // rh, W0 // rw
        if Hr * Wr < 2:
            raise InputError(
                f"homunculus: the {H0}x{W0} patch grid holds a {Hr}x{Wr} grid of {rh}x{rw} regions; nothing to rank "
                "(need at least 2 regions: use a smaller region or a larger image)"
            )
        tiers = tuple((int(c), int(k)) for c, k in p.tiers)
        A = rh * rw
        B, device = state.B, state.device

        patch_rel, present = ops.unmerge(state, rel.float())
        patch_rel = patch_rel.masked_fill(~present, float("-inf"))
        plan = allocate(patch_rel, present, state.grid, p.region, tiers, p.pool)

        asked = sum(c for c, _ in tiers)
        short = plan["eligible"] < asked
        if bool(short.any()):
            record_warning(
                f"homunculus: images {short.nonzero().flatten().tolist()} have only "
                f"{plan['eligible'][short].tolist()} regions with relevance but the tiers ask for {asked}; "
                f"their budget goes to those regions in tier order (fewer than {sum(c * k for c, k in tiers)} tokens)"
            )

        features = fill_features(state)
        chain = self.pyramid.build(features)
        levels = len(chain.levels)

        tokens, mask, size, positions, lod, tier, sample_rel = [], [], [], [], [], [], []
        origin = torch.full((B, H0 * W0), -1, dtype=torch.int64, device=device)
        offset = 0
        # Patch offsets inside a region (raster), for the nearest-sample origin.
        pr, pc = torch.meshgrid(torch.arange(rh, device=device), torch.arange(rw, device=device), indexing="ij")
        pr, pc = pr.reshape(-1), pc.reshape(-1)
        for t, ((count, k), (regions, valid, rows, cols, score)) in enumerate(zip(tiers, plan["tiers"])):
            c = regions.shape[1]
            if c == 0:
                continue
            uv = torch.stack([(cols + 0.5) / W0, (rows + 0.5) / H0], -1).view(B, c * k, 2)
            level = min(max(math.log(A / k, 4), 0.0), levels - 1)
            lods = torch.full((B, c * k), level, device=device, dtype=torch.float32)
            samples = self.pyramid.sample(chain, uv.float(), lods.float())
            tokens.append(samples.to(state.dtype))
            real = valid[..., None].expand(B, c, k).reshape(B, c * k)
            mask.append(real)
            size.append(torch.full((B, c * k), A / k, device=device, dtype=torch.float32))
            positions.append(torch.stack([rows, cols], -1).view(B, c * k, 2).float())
            lod.append(lods)
            tier.append(torch.full((B, c * k), t, device=device, dtype=torch.int64))
            sample_rel.append(score.reshape(B, c * k).float())
            # origin: each patch of an allocated region -> its nearest sample (ties by sample order).
            r0 = torch.div(regions, Wr, rounding_mode="floor") * rh
            c0 = (regions % Wr) * rw
            patch_r = r0[..., None] + pr  # [B, c, A]
            patch_c = c0[..., None] + pc
            dist = (patch_r[..., None].float() - rows[:, :, None, :]).square() + (
                patch_c[..., None].float() - cols[:, :, None, :]
            ).square()  # [B, c, A, k]
            nearest = dist.argmin(-1)
            target = offset + torch.arange(c, device=device)[None, :, None] * k + nearest
            patch_idx = (patch_r * W0 + patch_c).reshape(B, -1)
            target = torch.where(valid[..., None], target, torch.full_like(target, -1)).reshape(B, -1)
            sink = torch.where(target >= 0, patch_idx, torch.full_like(patch_idx, H0 * W0))
            origin = torch.cat([origin, origin.new_full((B, 1), -1)], 1).scatter(1, sink, target)[:, : H0 * W0]
            offset += c * k

        tokens_t = torch.cat(tokens, 1)
        mask_t = torch.cat(mask, 1)
        size_t, pos_t = torch.cat(size, 1), torch.cat(positions, 1)
        lod_t, tier_t, rel_t = torch.cat(lod, 1), torch.cat(tier, 1), torch.cat(sample_rel, 1)
        counts = mask_t.sum(1)
        M = int(counts.max())
        tokens_t, mask_t, size_t, pos_t = tokens_t[:, :M], mask_t[:, :M], size_t[:, :M], pos_t[:, :M]
        lod_t, tier_t, rel_t = lod_t[:, :M], tier_t[:, :M], rel_t[:, :M]

        if p.background:
            rest = origin < 0  # [B, N0]
            has = rest.any(1)
            n_rest = rest.sum(1).float()
            flat = features.flatten(2).transpose(1, 2).float()  # [B, N0, D]
            bg = (flat * rest[..., None]).sum(1) / n_rest.clamp_min(1)[:, None]
            idx = torch.arange(H0 * W0, device=device)
            centre = torch.stack(
                [torch.div(idx, W0, rounding_mode="floor"), idx % W0], -1
            ).float()  # [N0, 2]
            bg_pos = (rest[..., None] * centre).sum(1) / n_rest.clamp_min(1)[:, None]

            def put(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
                x = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
                slot = counts.view(B, 1, *([1] * (x.ndim - 2))).expand(B, 1, *x.shape[2:])
                old = x.gather(1, slot)
                new = torch.where(has.view(B, 1, *([1] * (x.ndim - 2))), value.view(B, 1, *x.shape[2:]).to(x.dtype), old)
                return x.scatter(1, slot, new)

            tokens_t = put(tokens_t, bg)
            mask_t = put(mask_t, has)
            size_t = put(size_t, n_rest)
            pos_t = put(pos_t, bg_pos)
            lod_t = put(lod_t, torch.log(n_rest.clamp_min(1)) / math.log(4))
            tier_t = put(tier_t, torch.full((B,), -1, device=device, dtype=torch.int64))
            rel_t = put(rel_t, torch.zeros(B, device=device))
            origin = torch.where(rest & has[:, None], counts[:, None].expand_as(origin), origin)
            M2 = int(mask_t.sum(1).max())
            tokens_t, mask_t, size_t, pos_t = tokens_t[:, :M2], mask_t[:, :M2], size_t[:, :M2], pos_t[:, :M2]
            lod_t, tier_t, rel_t = lod_t[:, :M2], tier_t[:, :M2], rel_t[:, :M2]

        pad = ~mask_t
        allocation = Allocation(
            region=(rh, rw), grid=(Hr, Wr), tiers=tiers, tier_map=plan["tier_map"],
            region_scores=plan["region_scores"], patch_relevance=patch_rel.view(B, H0, W0),
            background=p.background,
        )
        # The one place tokens are created rather than moved: a new TokenState built directly.
        return TokenState(
            tokens=tokens_t.masked_fill(pad[..., None], 0),
            mask=mask_t,
            size=size_t.masked_fill(pad, 0.0),
            positions=pos_t.masked_fill(pad[..., None], 0.0),
            origin=origin,
            grid=state.grid,
            cls=state.cls,
            per_token={"lod": lod_t.masked_fill(pad, 0.0), "tier": tier_t.masked_fill(pad, -1),
                       "relevance": rel_t.masked_fill(pad, float("-inf"))},
            query=state.query,
            query_mask=state.query_mask,
            images=state.images,
            pyramid=chain,
            allocation=allocation,
            meta=state.meta,
            trace=state.trace,
        )


@hookimpl
def arrcoc_register_plugins(register):
    register(Homunculus)
