"""How tokens move: the only code that gathers, drops and merges the fields of a :class:`~arrcoc.state.TokenState`.

A plugin decides *what* to keep or merge (indices); these functions do *how*,
once, for every field: ``tokens``, ``mask``, ``size``, ``positions``,
``origin`` and each ``per_token`` tensor stay aligned, ragged batches stay
packed (real tokens first), and nothing is silently dropped.  Bad index
shapes raise :class:`~arrcoc.errors.StateError`; bad index *values* do with
:func:`arrcoc.ops.checking` on (off, an index outside its row still fails;
the stage boundary's check catches much, not all, of what other bad values
leave behind: see :mod:`arrcoc.ops._checks`).  Each op makes at most one device sync: the width of its output.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import StateError
from ..state import TokenState
from ._checks import check_index, check_origin, check_rows, checks_enabled, describe

__all__ = ["gather_rows", "keep", "merge", "pack", "unmerge", "patches_to_tokens"]


def _flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """Row ids into a ``[B * n, ...]`` flattening for a per-row ``index`` ``[B, K]``."""
    if index.shape[0] == 1:  # (one row: the index itself, without three ops to add 0 to it)
        return index.reshape(-1)
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * n).reshape(-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k]]`` for ``x`` ``[B, N, ...]``; invalid slots are zero.

    One ``index_select`` over flattened rows: several times faster than
    ``gather`` with an index expanded over the channels.  Valid indices must
    lie in ``[0, N)`` (checked with :func:`arrcoc.ops.checking` on).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise StateError(f"gather_rows: expected x [B, N, ...], got {describe(x)}")
    safe, valid = check_rows(index, valid, x.shape[0], x.shape[1], "gather_rows")
    return _gather_rows(x, safe, valid)


def _gather_rows(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, full: bool = False,
                 out: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gather_rows` without the checks, for indices already checked (``full``: every entry is valid;
    ``out``: a flat ``[B * K, ...]`` tensor to gather into; ``rows``: ``_flat_rows(index, N)`` if known)."""
    B, N = x.shape[:2]
    rows = _flat_rows(index, N) if rows is None else rows
    if out is None and B == 1:  # (one row: select along the tokens axis, without two reshapes around it)
        gathered = x.index_select(1, rows)
        if full:
            return gathered
        fill = valid.view(*valid.shape, *([1] * (x.ndim - 2)))
        return gathered.masked_fill_(~fill, 0) if gathered.dtype != torch.bool else gathered.logical_and_(fill)
    flat = x.reshape(B * N, *x.shape[2:])
    if out is not None and x.requires_grad and torch.is_grad_enabled():
        # index_select(out=...) is not differentiable (a model's features under autograd): gather, then copy_
        # into ``out``, which is.
        gathered = out.copy_(torch.index_select(flat, 0, rows))
    else:
        gathered = torch.index_select(flat, 0, rows, out=out)
    gathered = gathered.view(*index.shape, *x.shape[2:])
    if full:
        return gathered
    fill = valid.view(*valid.shape, *([1] * (x.ndim - 2)))
    return gathered.masked_fill_(~fill, 0) if gathered.dtype != torch.bool else gathered.logical_and_(fill)


def _width(counts: torch.Tensor) -> tuple[int, bool]:
    """``(max(counts), whether every row has that many)`` in one device sync (0 and True for no rows)."""
    if not counts.numel():
        return 0, True
    most, fewest = torch.stack([counts.max(), counts.min()]).tolist()
    return int(most), most == fewest


def _pack(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`pack` without the checks, plus whether every row is full (no padding) — one sync."""
    order = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices
    K, full = _width(select.sum(1))
    valid = select.gather(1, order[:, :K])
    return order[:, :K].masked_fill(~valid, 0), valid, full


def pack(select: torch.Tensor, key: torch.Tensor | None = None, *, end: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of ``select`` ``[B, N]``, packed to the front of each row.

    The ragged-batch form of ``nonzero`` that every op here takes (e.g.
    ``keep(state, *pack(chosen))``).  Returns ``(index [B, K], valid [B, K])``
    with ``K`` the largest count.  The entries of a row come in index order,
    or sorted by ``key`` (``[B, N]``, ties by index) when one is given.

    ``end=True`` packs them to the *end* of each row instead (left padding,
    as a prompt for generation needs: every row's last real entry is last);
    the padding in front then holds the indices of the row's unselected
    entries in index order (valid columns of the row), else 0.
    """
    if not isinstance(select, torch.Tensor) or select.ndim != 2 or select.dtype != torch.bool:
        raise StateError(f"pack: expected a bool tensor [B, N], got {describe(select)}")
    if key is None and not end:
        index, valid, _ = _pack(select)
        return index, valid
    if key is None:
        key = torch.arange(select.shape[1], device=select.device).expand_as(select)
    elif not isinstance(key, torch.Tensor) or key.shape != select.shape or key.dtype == torch.bool or key.is_complex():
        raise StateError(f"pack: key must be a real tensor of the shape of select {list(select.shape)}, "
                         f"got {describe(key)}")
    # Unselected entries sort before (end) or after (front) every selected one, keeping their index order.
    info = torch.finfo(key.dtype) if key.is_floating_point() else torch.iinfo(key.dtype)
    outside = torch.full_like(key, info.min if end else info.max)
    order = torch.sort(torch.where(select, key, outside), dim=1, stable=True).indices
    K, _ = _width(select.sum(1))
    index = order[:, order.shape[1] - K:] if end else order[:, :K]
    valid = select.gather(1, index)
    return (index if end else index.masked_fill(~valid, 0)), valid


def keep(state: TokenState, index: torch.Tensor, valid: torch.Tensor | None = None) -> TokenState:
    """Keep the tokens ``index`` ``[B, K]`` (where ``valid``), in that order.

    Every per-token field is gathered, dropped patches get ``origin = -1``,
    and real tokens are packed to the front of each row.  Indices must point
    at real tokens and be unique per row (checked with :func:`arrcoc.ops.checking` on).
    """
    safe, valid = check_index(state, index, valid, "keep")
    check_origin(state, "keep")
    return _keep(state, safe, valid)


def _keep(state: TokenState, safe: torch.Tensor, valid: torch.Tensor) -> TokenState:
    """:func:`keep` of checked indices (invalid entries 0)."""
    B, N = state.mask.shape
    device = state.device
    K, full = _width(valid.sum(1))
    if full and K == valid.shape[1]:  # every entry valid (e.g. a top-k of one k): packed already, nothing to sink
        sink = safe
    else:
        # Pack real entries first (stable: keeps the caller's order), trim padding.
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :K]
        safe, valid = safe.gather(1, order), valid.gather(1, order)
        sink = torch.where(valid, safe, torch.full_like(safe, N))  # invalid -> dummy slot N
    if checks_enabled():
        hits = torch.zeros(B, N + 1, dtype=torch.int64, device=device)
        hits.scatter_add_(1, sink, torch.ones_like(sink))
        if bool((hits[:, :N] > 1).any()):
            raise StateError("keep: an index appears more than once in a row")
    return _rebuild(state, safe, valid, full, sink, state.origin)[0]


def _rebuild(state: TokenState, index: torch.Tensor, valid: torch.Tensor, full: bool, sink: torch.Tensor,
             origin: torch.Tensor, spare: frozenset[str] = frozenset()
             ) -> tuple[TokenState, torch.Tensor, dict[str, torch.Tensor]]:
    """The state of the tokens ``index`` ``[B, K]`` (packed: real first), ``origin`` given in the old slots,
    and ``new_slot`` ``[B, N + 1]`` (each old slot's new one, -1 if dropped; column N unspecified).

    The fields named in ``spare`` (``tokens``, ``size``, ``positions``, ``per_token:<name>``) are gathered
    into rows ``[:B * K]`` of flat buffers with one spare row, returned too (a field is a view of its buffer).
    """
    B, N = state.mask.shape
    K = index.shape[1]
    device = state.device
    # One column more in front, -1, which a dropped patch's origin (-1) reads: origin + 1 indexes it whole.
    shifted = torch.full((B, N + 2), -1, dtype=torch.int64, device=device)
    new_slot = shifted.narrow(1, 1, N + 1)  # (narrow: a third of the time of a slicing subscript)
    # (column N, where dropped slots sink, is never read: origin >= 0 points at a slot < N)
    slots = torch.arange(K, device=device)
    new_slot.scatter_(1, sink, slots.view(1, K) if B == 1 else slots.expand(B, K).contiguous())
    origin = shifted.gather(1, origin + 1)

    buffers: dict[str, torch.Tensor] = {}
    rows = _flat_rows(index, N)
    if B == 1 and not spare:
        # One row: a select per field along the tokens axis (no reshapes, no stacking: fewer calls, which cost
        # more than moving a few hundred numbers); every entry valid needs no fill either.
        if full:
            def select(x: torch.Tensor) -> torch.Tensor:
                return x.index_select(1, rows)
        else:
            def select(x: torch.Tensor) -> torch.Tensor:
                return _gather_rows(x, index, valid, False, rows=rows)
        # Every part is gathered from the state's own (validated) fields with their shapes, dtypes and device:
        # the new state needs no second validation (``TokenState._derive``).
        out = state._derive(tokens=select(state.tokens), mask=valid, size=select(state.size),
                            positions=select(state.positions), origin=origin,
                            per_token={k: select(v) for k, v in state.per_token.items()})
        return out, new_slot, buffers

    def gather(name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in spare:
            return _gather_rows(x, index, valid, full, rows=rows)
        buffers[name] = x.new_empty(B * K + 1, *x.shape[2:])
        if torch.is_grad_enabled():  # the spare row, under autograd: not garbage (NaN times a zero gradient is NaN)
            buffers[name][B * K].zero_()
        return _gather_rows(x, index, valid, full, out=buffers[name][: B * K], rows=rows)

    fields = {"size": state.size, **{f"per_token:{k}": v for k, v in state.per_token.items()}}
    gathered = _gather_stacked(fields, spare, rows, valid, full, B, K)
    # (as above: no second validation)
    state = state._derive(
        tokens=gather("tokens", state.tokens),
        mask=valid,
        size=gathered.get("size") if "size" in gathered else gather("size", state.size),
        positions=gather("positions", state.positions),
        origin=origin,
        per_token={k: gathered[f"per_token:{k}"] if f"per_token:{k}" in gathered else gather(f"per_token:{k}", v)
                   for k, v in state.per_token.items()},
    )
    return state, new_slot, buffers


def _gather_stacked(fields: Mapping[str, torch.Tensor], spare: frozenset[str], rows: torch.Tensor,
                    valid: torch.Tensor, full: bool, B: int, K: int) -> dict[str, torch.Tensor]:
    """The ``[B, N]`` floating fields of one dtype (``size``, per-token scores) gathered by one
    ``index_select`` of their stack ``[F, B * N]`` (each a contiguous ``[B, K]`` row of the result):
    a call per field costs more than the gathering of a few hundred numbers.  Fields in ``spare``, of
    other shapes, or alone in their dtype are left to the caller (not in the result)."""
    groups: dict[torch.dtype, list[str]] = {}
    for name, x in fields.items():
        if name not in spare and x.ndim == 2 and x.is_floating_point():
            groups.setdefault(x.dtype, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        # (one view of the stack and one of the result instead of one per field)
        stacked = torch.stack([fields[name] for name in names]).view(len(names), B * fields[names[0]].shape[1])
        picked = torch.index_select(stacked, 1, rows)
        if not full:
            picked = picked.masked_fill_(~valid.reshape(1, -1), 0)
        out.update(zip(names, picked.view(len(names), B, K).unbind(0)))
    return out


def merge(
    state: TokenState,
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    reduce: Mapping[str, str] | None = None,
    order: torch.Tensor | None = None,
) -> TokenState:
    """Merge token ``src[b, i]`` into ``dst[b, i]`` and remove the sources.

    Each destination becomes the weighted average of itself and everything
    merged into it, ``x_d = sum_i w_i x_i / sum_i w_i`` (ToMe's
    ``merge_wavg``: ``weights`` defaults to ``size``; pass ones for a plain
    mean).  ``size`` adds up (total size is conserved), ``positions`` are
    size-weighted centroids, ``origin`` follows the sources to their
    destination.  Floating ``per_token`` fields are averaged like the tokens
    unless ``reduce[name]`` is ``"sum"`` (e.g. attention mass) or ``"dst"``
    (keep the destination's value); other dtypes keep the destination's.

    Survivors keep their original order, or, given ``order`` (a ``[B, N]``
    sort key of the tokens before merging, e.g. the key
    :func:`bipartite_merges` returns), come out sorted by it.  Sources must be
    unique, must not also be destinations, and every token that merges needs
    a finite weight > 0 (checked with :func:`arrcoc.ops.checking` on).
    """
    src_safe, valid = check_index(state, src, valid, "merge(src)")
    if not isinstance(dst, torch.Tensor) or dst.shape != src.shape:
        raise StateError(f"merge: dst must be an int64 index of the shape of src {list(src.shape)}, got {describe(dst)}")
    dst_safe, _ = check_index(state, dst, valid, "merge(dst)")
    check_origin(state, "merge")
    B, N = state.mask.shape
    R = src.shape[1]
    device = state.device
    reduce = dict(reduce or {})
    for name, how in reduce.items():
        if name not in state.per_token or how not in ("mean", "sum", "dst"):
            raise StateError(
                f"merge: reduce[{name!r}]={how!r}; expected a per_token field "
                f"({sorted(state.per_token)}) mapped to 'mean', 'sum' or 'dst'"
            )
    w = state.size if weights is None else weights
    if tuple(w.shape) != (B, N):
        raise StateError(f"merge: weights must be [B={B}, N={N}], got {list(w.shape)}")
    w = w.to(torch.float32)
    if order is not None:
        if order.shape != (B, N):
            raise StateError(f"merge: order must be a sort key [B={B}, N={N}], got {list(order.shape)}")
        if order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
            raise StateError(f"merge: order must be an integer sort key [B={B}, N={N}], got dtype {order.dtype}")

    src_sink = torch.where(valid, src_safe, torch.full_like(src_safe, N))  # invalid pairs -> dummy slot N
    dst_sink = torch.where(valid, dst_safe, torch.full_like(dst_safe, N))
    is_src = torch.zeros(B, N + 1, dtype=torch.bool, device=device).scatter_(1, src_sink, True)[:, :N]
    if checks_enabled():
        _check_pairs(state, src_sink, dst_safe, valid, is_src, w, weights is not None)

    # The survivors, in their order; one device sync for their count.
    index, keep_valid, full = _pack(state.mask & ~is_src)
    if order is not None:
        keys = order.gather(1, index).masked_fill(~keep_valid, torch.iinfo(torch.int64).max)
        index = index.gather(1, torch.sort(keys, dim=1, stable=True).indices)
    K = index.shape[1]
    sink = torch.where(keep_valid, index, torch.full_like(index, N))
    # Each token's slot before the survivors are gathered: itself, or its destination for a source.
    target = torch.arange(N + 1, device=device).expand(B, N + 1).clone()
    target.scatter_(1, src_sink, dst_sink)
    origin = torch.where(state.origin >= 0, target.gather(1, state.origin.clamp(min=0)), state.origin)
    averaged = {name for name, value in state.per_token.items()
                if value.is_floating_point() and reduce.get(name, "mean") != "dst"}
    changed = frozenset({"tokens", "size", "positions", *(f"per_token:{n}" for n in averaged)} if R else ())
    out, new_slot, buffers = _rebuild(state, index, keep_valid, full, sink, origin, changed)
    if R == 0:
        return out

    # Only destinations change value:  x_d <- sum_i w_i x_i / W  over the group (the destination and its
    # sources), written as  c_d x_d + sum_s c_s x_s  with  c = w / W,  straight into the survivors' rows
    # (``_rebuild`` gathered them into buffers with a spare row, which takes the invalid pairs' writes).  Only
    # [R] pairs of rows are read and written, and the coefficients ([R] numbers) are shared by every field of
    # one weight.  Pair i belongs to group g_i, the first pair with its destination: group rows are
    # [B * (R + 1)] (a dummy per image for the invalid pairs).  Sums run in pair order, like ToMe's
    # scatter_reduce (on CUDA index_add_ uses atomics: float sums may differ in the last bit).
    pair = torch.arange(R, device=device).expand(B, R)
    first = torch.full((B, N + 1), R, dtype=torch.int64, device=device)
    first.scatter_reduce_(1, dst_sink, pair, reduce="amin")
    first = first.gather(1, dst_sink)
    group = _flat_rows(torch.where(valid, first, torch.full_like(pair, R)), R + 1)
    src_rows, dst_rows = _flat_rows(src_safe, N), _flat_rows(dst_safe, N)
    # Where each destination landed among the survivors (flat output row; invalid pairs -> the spare row B * K),
    # and the same for one pair per destination only (its group's first), for the writes that must happen once.
    spare = torch.full((B * R,), B * K, dtype=torch.int64, device=device)
    # A destination with no output row (a padded slot, or a source itself: a chain; refused with the checks on)
    # has slot -1, which in the flat output is the previous image's last token: send its writes past the buffer
    # instead, so that they fail (elementwise: no device sync).
    dst_slot = new_slot.gather(1, dst_sink)
    dst_slot = torch.where(dst_slot >= 0, dst_slot, (B + 1) * (K + 1))
    out_rows = torch.where(valid.reshape(-1), _flat_rows(dst_slot, K), spare)
    once_rows = torch.where((first == pair).reshape(-1), out_rows, spare)
    # The group rows the destinations are copied into: by each group's first pair only, the others to a last,
    # never-read row (an index_copy_ with repeated indices keeps one value, but its gradient goes to every copy:
    # a destination's token and weight would count once per pair of its group under autograd).
    group_once = torch.where((first == pair).reshape(-1), group, B * (R + 1))
    coefficients: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def coefficient(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_dst, c_src)`` ``[B * R]``: each pair's destination and source weight over its group's total."""
        if (id(weight), dtype) not in coefficients:
            w_rows = weight.reshape(B * N).to(dtype)
            w_dst, w_src = w_rows.index_select(0, dst_rows), w_rows.index_select(0, src_rows)
            total = w_dst.new_empty(B * (R + 1) + 1).index_copy_(0, group_once, w_dst).index_add_(0, group, w_src)
            total = total.index_select(0, group).clamp_min(torch.finfo(torch.float32).tiny)
            coefficients[id(weight), dtype] = (w_dst / total, w_src / total)
        return coefficients[id(weight), dtype]

    def survivor_scale(c_dst: torch.Tensor) -> torch.Tensor:
        """``[B * K + 1]``: each destination's ``c_d`` at its output row, 1 elsewhere."""
        return c_dst.new_ones(B * K + 1).index_copy_(0, once_rows, c_dst)

    def combine(x: torch.Tensor, weight: torch.Tensor | None, buffer: torch.Tensor) -> None:
        """Write the groups' weighted mean (``weight``) or sum (``None``) of ``x`` ``[B, N, ...]`` into ``buffer``."""
        rows = x.reshape(B * N, *x.shape[2:])
        shape = (-1, *([1] * (x.ndim - 2)))
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        src_val = rows.index_select(0, src_rows)
        if acc_dtype != x.dtype:  # half precision: add up in float32 per group, then write once per group
            dst_val = rows.index_select(0, dst_rows).to(acc_dtype)
            src_val = src_val.to(acc_dtype)
            if weight is not None:
                c_dst, c_src = coefficient(weight, acc_dtype)
                dst_val, src_val = dst_val * c_dst.view(shape), src_val * c_src.view(shape)
            acc = dst_val.new_empty(B * (R + 1) + 1, *x.shape[2:]).index_copy_(0, group_once, dst_val)
            acc = acc.index_add_(0, group, src_val).index_select(0, group)
            buffer.index_copy_(0, once_rows, acc.to(x.dtype))
            return
        if weight is not None:  # the destination's row holds x_d: scale it once, then add the sources
            c_dst, c_src = coefficient(weight, acc_dtype)
            if K <= 3 * R:  # one pass over the survivors (x 1 where no destination: exact) ...
                buffer.mul_(survivor_scale(c_dst).view(shape))
            else:  # ... or three over the pairs (gather, scale, write back once): the same products
                buffer.index_copy_(0, once_rows, rows.index_select(0, dst_rows) * c_dst.view(shape))
            src_val = src_val * c_src.view(shape)
        buffer.index_add_(0, out_rows, src_val)

    # Pairs are real tokens: the sizes need no masking (and with the default weights, w *is* the sizes: the
    # positions reuse the tokens' coefficients).
    combine(state.tokens, w, buffers["tokens"])
    combine(state.size, None, buffers["size"])
    combine(state.positions, state.size, buffers["positions"])
    for name in averaged:
        combine(state.per_token[name], None if reduce.get(name) == "sum" else w, buffers[f"per_token:{name}"])
    return out


def _check_pairs(state: TokenState, src_sink: torch.Tensor, dst_safe: torch.Tensor, valid: torch.Tensor,
                 is_src: torch.Tensor, w: torch.Tensor, given: bool) -> None:
    """:func:`merge`'s value checks (with :func:`arrcoc.ops.checking` on)."""
    B, N = state.mask.shape
    hits = torch.zeros(B, N + 1, dtype=torch.int64, device=state.device)
    hits.scatter_add_(1, src_sink, torch.ones_like(src_sink))
    if bool((hits[:, :N] > 1).any()):
        raise StateError("merge: a source token appears more than once in a row")
    if bool(is_src.gather(1, dst_safe)[valid].any()):
        raise StateError("merge: a destination token is also a source (chains are not allowed)")
    # A group whose weights add up to 0 would average to a zero vector (and a
    # negative one is no average): every token that merges needs a weight > 0.
    merging = torch.zeros(B, N + 1, dtype=torch.bool, device=state.device).scatter_(1, src_sink, True)
    merging = merging.scatter_(1, torch.where(valid, dst_safe, torch.full_like(dst_safe, N)), True)[:, :N]
    bad = merging & ~((w > 0) & (w < float("inf")))
    if bool(bad.any()):
        b, n = (int(i) for i in bad.nonzero()[0])
        what = "weights" if given else "weights (the sizes)"
        raise StateError(
            f"merge: {what} must be finite and > 0 on real tokens that merge (a group needs a positive total "
            f"weight to average), got {float(w[b, n])} for token {n} of image {b}"
        )


def unmerge(state: TokenState, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast per-token values back to the original patches through ``origin``.

    ``tokens`` defaults to ``state.tokens``; any ``[B, N, ...]`` tensor works
    (scores, attention).  Returns ``(values [B, N0, ...], present [B, N0])``;
    dropped patches get zeros and ``present = False``.
    """
    values = state.tokens if tokens is None else tokens
    if not isinstance(values, torch.Tensor) or values.shape[:2] != state.mask.shape:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise StateError(f"unmerge: expected values [B={state.B}, N={state.N}, ...], got {got}")
    check_origin(state, "unmerge")
    present = state.origin >= 0
    if state.N == 0:  # every patch was dropped: nothing to gather from
        return values.new_zeros(*present.shape, *values.shape[2:]), present
    return _gather_rows(values, state.origin.clamp(min=0), present), present


def patches_to_tokens(state: TokenState, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Pool per-patch ``values`` ``[B, N0]`` into the current tokens through ``origin``.

    The inverse of :func:`arrcoc.ops.unmerge` for scores: token ``n`` gets the
    sum (``reduce="sum"``) or the mean (``"mean"``) of the values of the
    original patches that now live in it; dropped patches (``origin = -1``)
    count for nothing.  Returns float32 ``[B, N]``; padded slots are ``-inf``.
    """
    if not isinstance(values, torch.Tensor) or values.shape != state.origin.shape:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise StateError(f"patches_to_tokens: expected values [B={state.B}, N0={state.origin.shape[1]}], got {got}")
    if reduce not in ("sum", "mean"):
        raise StateError(f"patches_to_tokens: reduce must be 'sum' or 'mean', got {reduce!r}")
    check_origin(state, "patches_to_tokens")
    B, N = state.mask.shape
    present = state.origin >= 0
    sink = torch.where(present, state.origin, torch.full_like(state.origin, N))  # dropped -> dummy slot N
    v = values.float().masked_fill(~present, 0.0)
    total = torch.zeros(B, N + 1, device=values.device).scatter_add_(1, sink, v)[:, :N]
    if reduce == "mean":
        count = torch.zeros(B, N + 1, device=values.device).scatter_add_(1, sink, present.float())[:, :N]
        total = total / count.clamp_min(1.0)
    return total.masked_fill(~state.mask, float("-inf"))
