"""Every hook arrcoc calls, in one file (prefix ``arrcoc_``).

A plugin module (or object) implements any subset with ``@arrcoc.hookimpl``
and is found through the ``arrcoc`` entry-point group; pluggy lets an
implementation accept a subset of a hook's arguments, so adding an argument
later breaks no plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from .state import StageRecord, TokenState

hookspec = pluggy.HookspecMarker("arrcoc")
hookimpl = pluggy.HookimplMarker("arrcoc")


@hookspec(historic=True)
def arrcoc_register_plugins(register: Callable[[type], None]) -> None:
    """Announce plugin classes: call ``register(cls)`` once per class.

    Called once for every registered plugin module, also for those registered
    after the registry was first used (historic).  A class needs ``kind``,
    ``name`` and ``Params``; two classes of one kind with one name are an error
    naming both providers.
    """


@hookspec
def arrcoc_pipeline_paths() -> list[str] | None:
    """Return directories holding pipeline YAML files this package ships.

    A pipeline ``NAME`` resolves to ``NAME.yaml`` in one of them when it is not
    a path and not a built-in.
    """


@hookspec
def arrcoc_stage_started(stage: str, plugin: object, state: "TokenState | None") -> None:
    """Called before a pipeline stage runs (``stage`` like ``"compress[0]"``).

    ``state`` is the stage's input; ``None`` for the ``"encoder"`` stage, which has none.  Inside a model
    (``arrcoc.hf.apply``) the in-LLM stages run through the same runner: ``stage`` is ``"llm[i]@layer"``
    (stage ``i`` of the ``llm:`` section at that decoder layer) and ``state.llm`` says where it runs
    (:class:`~arrcoc.state.LLMContext`).
    """


@hookspec
def arrcoc_stage_finished(stage: str, plugin: object, state: "TokenState", record: "StageRecord") -> None:
    """Called after a stage ran, with its output state and its trace record (``state.trace[-1] is record``)."""
