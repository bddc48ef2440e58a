"""Argument checks shared by the ops, and the one switch for the checks that read tensor values.

Checks of types, shapes and dtypes cost nothing on the device and always
run.  Checks of *values* (an index in range, unique in its row, on a real
token; a merge without chains; positive weights; scores without NaN;
``origin`` inside the tokens) must read a result on the host: on a GPU each
is a device sync that stalls the queue, and one compressor call runs a few
dozen ops.  They run only when :func:`checking` is on.

Off by default, because the pipeline checks once per stage instead:
:func:`arrcoc.pipeline.check_stage_output` runs :meth:`TokenState.check` on
every stage's output (prefix masks, sizes > 0, ``origin`` on real tokens,
finite tokens) and names the stage that broke it.  Much of what a wrong
argument leaves behind is caught there or fails inside the op: a kept
padded slot has size 0, a bad ``origin`` points outside the tokens, a
non-finite weight gives non-finite tokens, an index outside its row fails in
the gather or scatter that uses it (see :func:`check_rows`), and so does a
merge into a token that does not survive (a chain, a padded slot).  Not all:
with the switch off, an index repeated in a row of ``keep`` or among
``merge``'s sources duplicates or double-counts a token, a weight <= 0
averages to a wrong but finite token, a merged padded source with explicit
weights adds its (zero) row, and NaN scores rank as the largest — states
the boundary cannot tell from right ones.  Turn the switch on to find
*which op* of a stage got a bad argument — while writing a plugin, in its
tests::

    with arrcoc.ops.checking():
        out = my_compressor(state)

or for a whole run with the environment variable ``ARRCOC_CHECK_OPS=1``.
Errors in what a user asks for (a budget larger than an image) are not
behind the switch.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
from typing import Iterator

import torch

from ..errors import StateError
from ..state import TokenState

#: Whether the value checks run (see the module docstring); ``ARRCOC_CHECK_OPS=1`` turns them on for a process.
_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "arrcoc_ops_checking", default=os.environ.get("ARRCOC_CHECK_OPS", "0").strip().lower() not in ("", "0", "false", "no")
)


def checks_enabled() -> bool:
    """Whether the ops check argument values (one device sync each); see :func:`checking`."""
    return _CHECKING.get()


@contextlib.contextmanager
def checking(enabled: bool = True) -> Iterator[None]:
    """Run the ops' value checks (index ranges, duplicates, padded slots, weights, NaN scores, ``origin``)
    inside this block, or turn them off with ``checking(False)``.

    Off by default: each check is a device sync, and the pipeline already
    checks every stage's output once (:func:`arrcoc.pipeline.check_stage_output`).
    Scoped to the block (and to the thread / task: a ``ContextVar``; a thread
    started inside the block does not inherit it, an asyncio task does).
    """
    token = _CHECKING.set(bool(enabled))
    try:
        yield
    finally:
        _CHECKING.reset(token)


def describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def check_mask(mask: object, shape: tuple[int, ...], what: str, name: str = "mask", dims: str = "[B, N]") -> None:
    """``mask`` must be a bool tensor of ``shape`` (a shape check: no device sync)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        raise StateError(f"{what}: {name} must be a bool tensor {dims}={list(shape)}, got {describe(mask)}")


def per_row_count(k: int | torch.Tensor, B: int, device: torch.device, what: str) -> torch.Tensor:
    """An int or an integer ``[B]`` (or scalar) tensor -> int64 ``[B]`` on ``device``; anything else is an error."""
    if isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.shape == (B,) and k.device == device:
        return k  # (already [B] int64 here: no conversion, no expand)
    integral = isinstance(k, numbers.Integral) and not isinstance(k, bool)
    if isinstance(k, torch.Tensor):
        integral = not k.is_floating_point() and not k.is_complex() and k.dtype != torch.bool and k.ndim <= 1
        integral = integral and (k.ndim == 0 or k.shape[0] == B)
    if not integral:
        got = f"a tensor of shape {list(k.shape)} dtype {k.dtype}" if isinstance(k, torch.Tensor) else repr(k)
        raise StateError(f"{what}: expected an int or an integer tensor [B={B}], got {got}")
    return torch.as_tensor(k, device=device, dtype=torch.int64).expand(B)


def check_rows(index: object, valid: object, B: int, N: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, valid)`` after checking an int64 index ``[B, K]`` into ``N`` slots
    (``valid`` defaults to all True); returns the index with invalid entries set to 0.

    The range is checked when :func:`checking` is on.  Off, an index outside
    ``[0, N)`` is replaced by one past every row, so that the gather or
    scatter that uses it fails: the ops index the flattened ``[B * N]`` rows
    of the batch, where ``N`` in image ``b`` (or -1 in image ``b + 1``) is a
    real token of the neighbouring image, a state no later check can tell
    from a right one.  Elementwise over ``[B, K]``: no device sync."""
    if not isinstance(index, torch.Tensor) or index.ndim != 2 or index.shape[0] != B or index.dtype != torch.int64:
        got = f"shape {list(index.shape)} dtype {index.dtype}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise StateError(f"{what}: expected an int64 index [B={B}, K], got {got}")
    given = valid is not None
    if not given:
        valid = torch.ones_like(index, dtype=torch.bool)
    if not isinstance(valid, torch.Tensor) or valid.shape != index.shape or valid.dtype != torch.bool:
        raise StateError(f"{what}: valid must be a bool tensor of shape {list(index.shape)}")
    if checks_enabled():
        if bool(((index < 0) | (index >= N))[valid].any()):
            raise StateError(f"{what}: indices must lie in [0, {N})")
    else:  # (B + 1) * (N + 1): past the flattened rows from any image, and past a row's dummy slot N
        index = torch.where((index >= 0) & (index < N), index, (B + 1) * (N + 1))
    return (index.masked_fill(~valid, 0) if given else index), valid


def check_index(state: TokenState, index: object, valid: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`check_rows` into ``state``'s slots; with :func:`checking` on, also that they are real tokens."""
    safe, valid = check_rows(index, valid, state.B, state.N, what)
    if checks_enabled() and not bool(state.mask.gather(1, safe)[valid].all()):
        raise StateError(f"{what}: an index points at a padded (masked) token slot")
    return safe, valid


def check_origin(state: TokenState, what: str) -> None:
    """With :func:`checking` on: ``state.origin`` points at token slots or is -1.

    ``TokenState`` checks shapes only; a bad value would index past the tokens
    (the stage boundary's :meth:`TokenState.check` refuses it too).
    """
    if not checks_enabled():
        return
    origin = state.origin
    bad = (origin < -1) | (origin >= state.N)
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise StateError(
            f"{what}: TokenState.origin: values must lie in [-1, {state.N}) (a token slot, or -1 for a dropped "
            f"patch), got {int(origin[b, p])} for patch {p} of image {b}"
        )
