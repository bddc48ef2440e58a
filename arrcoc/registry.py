"""The plugin manager: entry points, registration, ``create`` and ``list_plugins``.

Built-in plugins are ordinary modules announced in the ``arrcoc``
entry-point group of arrcoc's own distribution, loaded exactly like a third
party's.  A module that fails to import is recorded with its error (see
``arrcoc list``) and does not stop the others from loading.

``ARRCOC_LOAD_PLUGINS=name1,name2`` restricts which entry points load (an
empty value loads none); ``ARRCOC_TRACE_PLUGINS=1`` prints every hook call.

A ``(kind, name)`` announced by two classes is a conflict: whichever module
loads first, asking for that name (``create``, a pipeline, ``arrcoc show``)
is a :class:`PluginLoadError` naming both providers, so that which one runs
never depends on the order of installation.  Everything else the two
modules provide stays usable.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import threading
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterable, Iterator

import pluggy

from . import hookspecs
from .errors import PluginLoadError, UnknownPluginError, did_you_mean
from .plugin import KINDS, Plugin, provide_registry

ENTRY_POINT_GROUP = "arrcoc"


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type[Plugin]
    provider: str  # the registering module (entry point name where known)

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry:
    """A pluggy host holding every plugin class by ``(kind, name)``."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("arrcoc")
        self.pm.add_hookspecs(hookspecs)
        self._plugins: dict[tuple[str, str], PluginInfo] = {}
        #: (kind, name) announced by more than one class -> every provider, in registration order
        self.conflicts: dict[tuple[str, str], list[PluginInfo]] = {}
        self.failures: dict[str, str] = {}
        self._current_provider = "?"
        self._before: tuple[dict, dict] = ({}, {})
        self.pm.hook.arrcoc_register_plugins.call_historic(kwargs={"register": self._register_class})
        if os.environ.get("ARRCOC_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(print)
            self.pm.enable_tracing()
        if load_entry_points:
            self.load_entry_points()

    # ----------------------------------------------------------- registration
    def load_entry_points(self) -> None:
        allowed = os.environ.get("ARRCOC_LOAD_PLUGINS")
        names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        seen: set[tuple[str, str, str]] = set()
        taken: set[str] = set()
        points = [(getattr(ep.dist, "name", None) or "?", ep) for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
        # arrcoc's own entry points first, so that they keep their names whatever the installation order.
        for dist, ep in sorted(points, key=lambda p: p[0] != "arrcoc"):
            if (dist, ep.name, ep.value) in seen or (names is not None and ep.name not in names):
                continue  # the same distribution found twice on the path loads once
            seen.add((dist, ep.name, ep.value))
            # Another distribution's entry point of the same name loads too, under a name that says whose it is.
            name = ep.name if ep.name not in taken else f"{ep.name} ({dist})"
            taken.add(ep.name)
            try:
                module = ep.load()
            except Exception as exc:  # a broken third party must not break the rest
                self.failures[name] = f"entry point {ep.value!r} of {dist}: {type(exc).__name__}: {exc}"
                continue
            self.register(module, name=name)

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin module/object (its hooks run at once, historic)."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._current_provider = name
        self._before = (dict(self._plugins), {k: list(v) for k, v in self.conflicts.items()})
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except PluginLoadError as exc:
            self._drop(plugin)
            self.failures[name] = str(exc)
        except pluggy.PluginValidationError as exc:  # e.g. a misspelt hook name
            self._drop(plugin)
            known = [n for n in dir(hookspecs) if n.startswith("arrcoc_")]
            unknown = [n for n in dir(plugin) if n.startswith("arrcoc_") and n not in known]
            hint = did_you_mean(unknown[0], known) if unknown else ""
            self.failures[name] = f"{type(exc).__name__}: {exc}{hint}"
        except Exception as exc:
            self._drop(plugin)
            self.failures[name] = f"{type(exc).__name__}: {exc}"
        finally:
            self._current_provider = "?"

    def _drop(self, plugin: Any) -> None:
        """Undo the failed registration only: the object or its name may already be registered."""
        if self.pm.get_plugin(self._current_provider) is plugin:
            self.pm.unregister(name=self._current_provider)
        self._plugins, self.conflicts = self._before

    def unregister(self, name: str) -> None:
        """Remove a registered module and every class it announced."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        for key, info in list(self._plugins.items()):
            if info.provider == name:
                del self._plugins[key]
        for key, infos in list(self.conflicts.items()):
            left = [info for info in infos if info.provider != name]
            if len(left) > 1:
                self.conflicts[key] = left
            else:  # the conflict is over: the remaining provider (if any) has the name alone
                del self.conflicts[key]
                if left:
                    self._plugins[key] = left[0]

    def _register_class(self, cls: type) -> None:
        kind, name = getattr(cls, "kind", None), getattr(cls, "name", None)
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise PluginLoadError(f"{cls!r} is not an arrcoc.plugin.Plugin subclass")
        if kind not in KINDS:
            raise PluginLoadError(f"{cls.__qualname__}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if not name or not isinstance(name, str):
            raise PluginLoadError(f"{cls.__qualname__}: needs a non-empty string `name`")
        key = (kind, name)
        info = PluginInfo(kind, name, cls, self._current_provider)
        claims = self.conflicts.get(key) or ([self._plugins[key]] if key in self._plugins else [])
        if any(other.cls is cls for other in claims):
            return  # the same class announced again: no conflict
        if claims:
            self.conflicts[key] = [*claims, info]
            self._plugins.pop(key, None)
            return
        self._plugins[key] = info

    def conflict(self, kind: str | None, name: str) -> str | None:
        """Why ``name`` (of ``kind``, or of any kind) cannot be used because two classes claim it, or None."""
        for (k, n), infos in sorted(self.conflicts.items()):
            if n == name and (kind is None or k == kind):
                times = "twice" if len(infos) == 2 else f"{len(infos)} times"
                providers = " and by ".join(f"{i.provider} ({i.cls.__module__}.{i.cls.__qualname__})" for i in infos)
                return (
                    f"{k} {n!r} is provided {times}: by {providers}; arrcoc uses none of them rather than pick one "
                    "by installation order: uninstall or disable all but one (ARRCOC_LOAD_PLUGINS lists the entry "
                    "points to load)"
                )
        return None

    # ---------------------------------------------------------------- lookup
    def get(self, kind: str, name: str, *, where: str = "") -> type[Plugin]:
        if kind not in KINDS:
            raise UnknownPluginError(f"unknown plugin kind {kind!r}{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
        info = self._plugins.get((kind, name))
        if info is not None:
            return info.cls
        conflict = self.conflict(kind, name)
        if conflict is not None:
            raise PluginLoadError(f"{where}: {conflict}" if where else conflict)
        prefix = f"{where}: " if where else ""
        choices = sorted(n for k, n in self._plugins if k == kind)
        message = f"{prefix}unknown {kind} {name!r}{did_you_mean(name, choices)}; available: {', '.join(choices) or '(none)'}"
        other_kinds = sorted(k for k, n in self._plugins if n == name)
        if other_kinds:
            message += f". {name!r} is a {', '.join(other_kinds)}, not a {kind}"
        if self.failures:
            broken = "; ".join(f"{n} ({err})" for n, err in sorted(self.failures.items()))
            message += f". Plugins that failed to load: {broken}"
        raise UnknownPluginError(message)

    def create(self, kind: str, name: str, **params: Any) -> Plugin:
        return self.get(kind, name)(**params)

    def list(self, kind: str | None = None, filter: str | None = None) -> list[PluginInfo]:
        out = [
            info
            for (k, n), info in sorted(self._plugins.items())
            if (kind is None or k == kind) and (filter is None or fnmatch.fnmatch(n, filter))
        ]
        return out

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._plugins if k == kind)

    def pipeline_dirs(self) -> list[Path]:
        dirs = [Path(str(resources.files("arrcoc.pipelines")))]
        for result in self.pm.hook.arrcoc_pipeline_paths():
            for entry in result or ():
                dirs.append(Path(entry))
        return dirs

    @property
    def hook(self) -> Any:
        return self.pm.hook


_registry: Registry | None = None
# Re-entrant: building the registry imports the plugin modules, and one that looks a plugin up at import time
# (arrcoc.create, PluginRef.build, a nested_plugin param) comes back here on the same thread; with a plain lock
# that call waited for itself forever.  It now gets a PluginLoadError (that module is recorded as failed).
_lock = threading.RLock()
_building = False


def get_registry() -> Registry:
    """The process-wide registry, built (and entry points loaded) on first use."""
    global _registry, _building
    with _lock:
        if _registry is None:
            if _building:  # the thread building it (others wait on the lock): it has no registry to give yet
                raise PluginLoadError(
                    "the plugin registry is still loading its entry points: a plugin module looked a plugin up "
                    "(arrcoc.create, PluginRef.build, a nested_plugin param) while it was imported; do it when "
                    "the plugin is built or run instead"
                )
            _building = True
            try:
                _registry = Registry()
            finally:
                _building = False
        return _registry


def set_registry(registry: Registry | None) -> Registry | None:
    """Swap the process-wide registry (tests); returns the previous one."""
    global _registry
    with _lock:
        previous, _registry = _registry, registry
        return previous


@contextlib.contextmanager
def using_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one inside the block (tests, sandboxes)."""
    previous = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(previous)


# Plugin references (PluginRef.build, nested_plugin params) resolve their names here.
provide_registry(get_registry)


def create(kind: str, name: str, /, **params: Any) -> Plugin:
    """``arrcoc.create("compressor", "tome", r=8)``: a plugin instance with validated params."""
    return get_registry().create(kind, name, **params)


def list_plugins(kind: str | None = None, filter: str | None = None) -> list[PluginInfo]:
    """Registered plugins, optionally of one kind and matching a wildcard ``filter``."""
    return get_registry().list(kind, filter)


def plugin_failures() -> dict[str, str]:
    """Entry points that failed to load, with their errors."""
    return dict(get_registry().failures)


def iter_kinds() -> Iterable[str]:
    return iter(KINDS)
