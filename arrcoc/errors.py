"""Every error arrcoc raises on bad input is an :class:`ArrcocError`.

Messages say what was expected, where, and what came, so that a user can fix
a pipeline file or a call without reading arrcoc's source.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import warnings
from typing import Iterable, Iterator


class ArrcocError(Exception):
    """Base class of every error arrcoc raises on bad input."""


class SpecError(ArrcocError, ValueError):
    """A pipeline file or spec is malformed: YAML syntax, sections, fields."""


class UnknownPluginError(SpecError, KeyError):
    """No plugin of that kind has that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class UnknownPipelineError(SpecError, KeyError):
    """A pipeline name is neither a file, a built-in, nor a third party's."""

    def __str__(self) -> str:
        return str(self.args[0])


class ParamsError(SpecError):
    """A plugin's parameters failed validation."""


class PluginLoadError(ArrcocError, ImportError):
    """A plugin could not be imported or registered."""


class InputError(ArrcocError, ValueError):
    """Images, tensors or queries handed to a pipeline are unusable."""


class DatasetError(InputError):
    """An evaluation dataset file is malformed or does not match what it names (the message gives file:line)."""


class StateError(ArrcocError, ValueError):
    """A TokenState (or an op's arguments) has inconsistent shapes, dtypes or devices."""


class NonFiniteStateError(StateError):
    """Real tokens or the class token hold NaN or inf.

    ``images``: the batch rows whose real tokens do (empty when only the class token does).
    """

    def __init__(self, message: str, images: list[int]) -> None:
        super().__init__(message)
        self.images = images


class MissingInputError(ArrcocError, ValueError):
    """A stage needs something (CLS attention, keys, a query) nobody provides."""


class BudgetError(ArrcocError, ValueError):
    """A token budget (keep ratio / count) cannot be met."""


class StageError(ArrcocError, RuntimeError):
    """A plugin failed unexpectedly while a stage was built or run (a bug in the plugin, or input it did not
    foresee); the message names the stage and the original exception is its ``__cause__``."""


class ArrcocWarning(UserWarning):
    """Something was adjusted (e.g. a merge count clamped) and recorded in the trace."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'tome'?)`` for the nearest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Warnings raised while a stage runs are collected into that stage's trace
# record as well as sent through the ``warnings`` module.
_collector: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "arrcoc_warning_collector", default=None
)


def record_warning(message: str) -> None:
    """Warn (``ArrcocWarning``) and record ``message`` in the running stage's trace."""
    collected = _collector.get()
    if collected is not None:
        collected.append(message)
    warnings.warn(message, ArrcocWarning, stacklevel=2)


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collect the messages passed to :func:`record_warning` inside the block."""
    collected: list[str] = []
    token = _collector.set(collected)
    try:
        yield collected
    finally:
        _collector.reset(token)


class ModelError(ArrcocError, RuntimeError):
    """A model cannot be built, loaded, or run the way the pipeline asks."""


class ActiveRunError(ModelError):
    """``arrcoc.hf.apply`` on a model that already runs a pipeline (a nested ``with``, or another thread's):
    one pipeline per model at a time, so that no hook, attention implementation or ``generate`` is ever
    stacked on another Run's and restored out of order."""


class PlaceholderMismatchError(InputError):
    """A model's images and image placeholders do not match.  Like every InputError it is a ``ValueError``, the
    type the model's own ``get_placeholder_mask`` raises for the same input (transformers 5.25, every supported
    family): code written to catch the model's error catches arrcoc's, whose message says more."""


class MissingImageInputError(InputError, TypeError):
    """``pixel_values`` came without another image input the model needs (LLaVA-NeXT's ``image_sizes``); also a
    ``TypeError``, what the model itself raises then (a missing required argument of ``generate``)."""
