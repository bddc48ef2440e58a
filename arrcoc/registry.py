"""The plugin manager: entry points, registration, ``create`` and ``list_plugins``.

Built-in plugins are ordinary modules announced in the ``arrcoc``
entry-point group of arrcoc's own distribution, loaded exactly like a third
party's.  A module that fails to import is recorded with its error (see
``arrcoc list``) and does not stop the others from loading.

``ARRCOC_LOAD_PLUGINS=name1,name2`` restricts which entry points load (an
empty value loads none); ``ARRCOC_TRACE_PLUGINS=1`` prints every hook call.
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
from .plugin import KINDS, Plugin

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
        self.failures: dict[str, str] = {}
        self._current_provider = "?"
        self._before: set[tuple[str, str]] = set()
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
        seen: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen or (names is not None and ep.name not in names):
                continue
            seen.add(ep.name)
            dist = getattr(ep.dist, "name", None) or "?"
            try:
                module = ep.load()
            except Exception as exc:  # a broken third party must not break the rest
                self.failures[ep.name] = f"entry point {ep.value!r} of {dist}: {type(exc).__name__}: {exc}"
                continue
            self.register(module, name=ep.name)

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin module/object (its hooks run at once, historic)."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._current_provider = name
        self._before = set(self._plugins)
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
        for key in set(self._plugins) - self._before:
            del self._plugins[key]

    def unregister(self, name: str) -> None:
        """Remove a registered module and every class it announced."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        for key, info in list(self._plugins.items()):
            if info.provider == name:
                del self._plugins[key]

    def _register_class(self, cls: type) -> None:
        kind, name = getattr(cls, "kind", None), getattr(cls, "name", None)
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise PluginLoadError(f"{cls!r} is not an arrcoc.plugin.Plugin subclass")
        if kind not in KINDS:
            raise PluginLoadError(f"{cls.__qualname__}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if not name or not isinstance(name, str):
            raise PluginLoadError(f"{cls.__qualname__}: needs a non-empty string `name`")
        key = (kind, name)
        if key in self._plugins and self._plugins[key].cls is not cls:
            other = self._plugins[key]
            raise PluginLoadError(
                f"{kind} {name!r} is provided twice: by {other.provider} "
                f"({other.cls.__module__}.{other.cls.__qualname__}) and by {self._current_provider} "
                f"({cls.__module__}.{cls.__qualname__})"
            )
        self._plugins[key] = PluginInfo(kind, name, cls, self._current_provider)

    # ---------------------------------------------------------------- lookup
    def get(self, kind: str, name: str, *, where: str = "") -> type[Plugin]:
        if kind not in KINDS:
            raise UnknownPluginError(f"unknown plugin kind {kind!r}{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
        info = self._plugins.get((kind, name))
        if info is not None:
            return info.cls
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
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, built (and entry points loaded) on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry()
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
