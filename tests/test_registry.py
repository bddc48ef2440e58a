"""The plugin host: registration, ``create``/``list``, failures, entry points, observer hooks.

Every test builds a fresh :class:`arrcoc.registry.Registry` (entry points off)
so that the plugins other modules declare do not leak in.
"""

from __future__ import annotations

import ast
import threading
import types
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

import arrcoc
from arrcoc import ops
from arrcoc.errors import ParamsError, PluginLoadError, UnknownPluginError
from arrcoc.hookspecs import hookimpl
from arrcoc import plugin as plugin_module
from arrcoc.plugin import Compressor, Encoder, Keep, Params, PluginRef, Scorer, nested_plugin
from arrcoc.registry import Registry, using_registry
from arrcoc.state import TokenState


# --------------------------------------------------------------- test plugins
class FirstParams(Params):
    keep: Keep = Field(4, description="Tokens kept: a ratio in (0, 1] or a count.")
    order: Literal["position", "reverse"] = Field("position", description="Order of the kept tokens.")


class First(Compressor):
    """Keep the first tokens of each image.

    Second docstring line, not part of the summary.
    """

    name = "first_k"
    Params = FirstParams

    def __call__(self, state: TokenState) -> TokenState:
        k = ops.resolve_keep(self.params.keep, state.counts)
        rank = torch.arange(state.N, device=state.device).expand(state.B, -1)
        scores = -rank.to(torch.float32)
        return ops.keep_topk(state, scores, k)


class Bloom(Compressor):
    """Does nothing (a name for wildcard tests)."""

    name = "bloom"

    def __call__(self, state: TokenState) -> TokenState:
        return state


class OtherFirst(Compressor):
    """A second class claiming the name ``first_k``."""

    name = "first_k"

    def __call__(self, state: TokenState) -> TokenState:
        return state


class Salience(Scorer):
    """A scorer whose name a test asks for as a compressor."""

    name = "salience"

    def __call__(self, state: TokenState) -> TokenState:
        return state.with_per_token(scores=state.tokens.norm(dim=-1))


class PoolEncoderParams(Params):
    patch: int = Field(8, ge=1, description="Side of the average-pooled patches.")


class PoolEncoder(Encoder):
    """Average-pooled pixels as tokens (no model: fast and exact)."""

    name = "pool"
    Params = PoolEncoderParams
    provides = frozenset({"keys"})
    embed_dim = 3

    def encode(self, pixels: torch.Tensor) -> TokenState:
        x = F.avg_pool2d(pixels, self.params.patch)
        tokens = x.flatten(2).transpose(1, 2).contiguous()
        return TokenState.from_patches(tokens, tuple(x.shape[-2:]), per_token={"keys": tokens})


class Provider:
    """A plugin object announcing some classes through ``arrcoc_register_plugins``."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def arrcoc_register_plugins(self, register):
        for cls in self.classes:
            register(cls)


@pytest.fixture
def registry():
    """A fresh registry with test plugins, swapped in as the process-wide one."""
    reg = Registry(load_entry_points=False)
    from arrcoc_plugins.compressors import tome

    reg.register(tome, name="tome")
    reg.register(Provider(First, Bloom, Salience, PoolEncoder), name="testplugins")
    assert reg.failures == {}
    with using_registry(reg):
        yield reg


# ------------------------------------------------------------- registration
def test_register_announces_classes_through_the_hook(registry):
    infos = {(i.kind, i.name): i for i in registry.list()}
    assert set(infos) == {
        ("compressor", "tome"), ("compressor", "first_k"), ("compressor", "bloom"),
        ("scorer", "salience"), ("encoder", "pool"),
    }
    info = infos[("compressor", "first_k")]
    assert info.cls is First
    assert info.provider == "testplugins"
    assert infos[("compressor", "tome")].provider == "tome"
    assert info.summary == "Keep the first tokens of each image."
    assert registry.get("compressor", "first_k") is First
    assert registry.names("compressor") == ["bloom", "first_k", "tome"]


def test_a_module_registered_late_still_hears_the_historic_hook(registry):
    class Late(Compressor):
        name = "late"

        def __call__(self, state):
            return state

    registry.register(Provider(Late), name="late_module")
    assert registry.get("compressor", "late") is Late
    registry.unregister("late_module")
    with pytest.raises(UnknownPluginError, match="unknown compressor 'late'"):
        registry.get("compressor", "late")


def test_list_filters_by_kind_and_wildcard(registry):
    assert [i.name for i in registry.list("compressor", filter="*om*")] == ["bloom", "tome"]
    assert [i.name for i in registry.list(filter="*om*")] == ["bloom", "tome"]
    assert [i.name for i in registry.list("compressor", filter="first_?")] == ["first_k"]
    assert [i.name for i in registry.list("scorer")] == ["salience"]
    assert registry.list("allocator") == []
    assert [i.name for i in arrcoc.list_plugins("compressor", filter="t*")] == ["tome"]


# ----------------------------------------------------------------- create
def test_create_validates_params(registry):
    plugin = registry.create("compressor", "first_k", keep=3, order="reverse")
    assert isinstance(plugin, First)
    assert plugin.params.keep == 3 and plugin.params.order == "reverse"
    assert repr(plugin) == "First(keep=3, order='reverse')"
    assert arrcoc.create("compressor", "first_k", keep=0.25).params.keep == 0.25
    assert arrcoc.create("compressor", "tome", r=2).params.r == 2


def test_numpy_scalars_are_python_numbers_wherever_numbers_are_accepted(registry):
    count = registry.create("compressor", "first_k", keep=np.int64(3)).params.keep
    ratio = registry.create("compressor", "first_k", keep=np.float32(0.25)).params.keep
    assert (count, type(count)) == (3, int) and (ratio, type(ratio)) == (0.25, float)
    r = arrcoc.create("compressor", "tome", r=[np.int32(2), np.int64(1)]).params.r
    assert r == [2, 1] and all(type(v) is int for v in r)
    spec = arrcoc.resolve_spec({"encoder": {"use": "pool", "patch": np.int64(8)},
                                "compress": [{"use": "first_k", "keep": np.float64(0.5)},
                                             {"use": "tome", "r": np.array([2, 1])[0]}]})
    assert spec.compress[0].params == {"keep": 0.5} and type(spec.encoder.params["patch"]) is int
    assert arrcoc.spec.parse_yaml_text(spec.to_yaml()).model_dump() == spec.model_dump()


def test_create_with_a_misspelt_param_lists_valid_ones_and_suggests(registry):
    with pytest.raises(ParamsError) as info:
        registry.create("compressor", "first_k", kep=3)
    message = str(info.value)
    assert message.startswith("compressor 'first_k': invalid parameters")
    assert "kep: unknown parameter (did you mean 'keep'?); valid: keep, order" in message


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"keep": 0}, r"\n  keep: a count must be >= 1, got 0$"),
        ({"keep": 1.5}, r"\n  keep: a ratio must lie in \(0, 1\] \(use an int for a count\), got 1\.5$"),
        ({"keep": "half"}, r"\n  keep: expected a ratio in \(0, 1\] \(float\) or a count >= 1 \(int\), got 'half'$"),
        ({"keep": True}, r"\n  keep: expected a ratio .*, got True$"),
        ({"keep": np.bool_(True)}, r"\n  keep: expected a ratio .*, got True$"),
        ({"keep": np.float32(1.5)}, r"\n  keep: a ratio must lie in \(0, 1\] \(use an int for a count\), got 1\.5$"),
        ({"keep": np.int64(0)}, r"\n  keep: a count must be >= 1, got 0$"),
        ({"order": "random"}, r"\n  order: Input should be 'position' or 'reverse' \(got 'random'\)$"),
    ],
)
def test_create_rejects_bad_values_saying_what_came(registry, params, expected):
    with pytest.raises(ParamsError, match=expected):
        registry.create("compressor", "first_k", **params)


def test_plugin_built_from_a_params_object(registry):
    assert First(First.Params(keep=2)).params.keep == 2
    with pytest.raises(ParamsError, match="pass either a Params object or keyword params, not both"):
        First(First.Params(keep=2), keep=3)
    with pytest.raises(ParamsError, match="expected FirstParams, got PoolEncoderParams"):
        First(PoolEncoderParams())


def test_params_are_frozen(registry):
    plugin = registry.create("compressor", "first_k", keep=2)
    with pytest.raises(Exception, match="frozen"):
        plugin.params.keep = 5


# ---------------------------------------------------------------- lookups
def test_the_plugin_contract_does_not_import_the_registry():
    # arrcoc.registry imports arrcoc.plugin (the base classes it registers): the reverse would close a circle.
    tree = ast.parse(Path(plugin_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.rsplit(".", 1)[-1] in ("registry", "spec", "pipeline")}
    assert "registry" not in {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                              for alias in node.names}


class NestedParams(Params):
    inner: nested_plugin("compressor") = Field(  # type: ignore[valid-type]
        default_factory=lambda: PluginRef(use="first_k"), description="A compressor run by this one.")


class Nested(Compressor):
    """Runs the compressor named in its params."""

    name = "nested"
    Params = NestedParams

    def __call__(self, state: TokenState) -> TokenState:
        return self.params.inner.build("compressor")(state)


def test_plugin_references_resolve_in_the_process_wide_registry_or_one_passed_in(registry):
    ref = PluginRef.model_validate({"use": "first_k", "keep": 2})
    built = ref.build("compressor")
    assert type(built) is First and built.params.keep == 2
    other = Registry(load_entry_points=False)
    other.register(Provider(OtherFirst), name="others")
    plain = PluginRef(use="first_k")
    assert type(plain.build("compressor", other)) is OtherFirst  # the registry passed in, not the process-wide one
    with pytest.raises(UnknownPluginError, match=r"unknown compressor 'first_k'; available: \(none\)"):
        ref.build("compressor", Registry(load_entry_points=False))
    # nested_plugin params are checked against the class the process-wide registry has under that name
    assert Nested(inner={"use": "first_k", "keep": 3}).params.inner == PluginRef(use="first_k", params={"keep": 3})
    with pytest.raises(ParamsError, match=r"inner: compressor 'first_k': invalid parameters\n +kep: unknown parameter"):
        Nested(inner={"use": "first_k", "kep": 3})
    with pytest.raises(ParamsError, match=r"inner: unknown compressor 'frist_k' \(did you mean 'first_k'\?\)"):
        Nested(inner={"use": "frist_k"})
    with using_registry(other):
        assert type(plain.build("compressor")) is OtherFirst


def test_a_plugin_reference_without_a_registry_says_so(registry, monkeypatch):
    monkeypatch.setattr(plugin_module, "_default_registry", None)
    with pytest.raises(PluginLoadError, match="compressor 'first_k': no plugin registry to look it up in"):
        PluginRef(use="first_k").build("compressor")
    assert type(PluginRef(use="first_k").build("compressor", registry)) is First


def test_unknown_name_suggests_and_lists_available(registry):
    with pytest.raises(UnknownPluginError) as info:
        registry.create("compressor", "tomee", r=2)
    assert str(info.value) == "unknown compressor 'tomee' (did you mean 'tome'?); available: bloom, first_k, tome"
    assert isinstance(info.value, KeyError)  # also a KeyError, but printed without KeyError's quotes


def test_name_of_another_kind_says_which_kind(registry):
    with pytest.raises(UnknownPluginError, match=r"'salience' is a scorer, not a compressor"):
        registry.get("compressor", "salience")


def test_unknown_kind(registry):
    with pytest.raises(UnknownPluginError, match=r"unknown plugin kind 'compresor' \(did you mean 'compressor'\?\)"):
        registry.get("compresor", "tome")


def test_unknown_name_mentions_plugins_that_failed_to_load(registry):
    class Boom:
        @hookimpl
        def arrcoc_register_plugins(self, register):
            raise RuntimeError("needs a GPU library")

    registry.register(Boom(), name="gpu_plugin")
    with pytest.raises(UnknownPluginError, match=r"Plugins that failed to load: gpu_plugin \(RuntimeError: needs a GPU library\)"):
        registry.get("compressor", "fancy")


def test_empty_kind_says_none(registry):
    with pytest.raises(UnknownPluginError, match=r"unknown allocator 'homunculus'; available: \(none\)"):
        registry.get("allocator", "homunculus")


# --------------------------------------------------------------- failures
def test_two_providers_of_one_name_make_it_an_error_naming_both_whatever_the_order(registry):
    class Extra(Compressor):
        name = "extra"

        def __call__(self, state):
            return state

    registry.register(Provider(Extra, OtherFirst), name="rival")
    expected = (
        "compressor 'first_k' is provided twice: by testplugins (test_registry.First) and by rival "
        "(test_registry.OtherFirst); arrcoc uses none of them rather than pick one by installation order: "
        "uninstall or disable all but one (ARRCOC_LOAD_PLUGINS lists the entry points to load)"
    )
    assert registry.failures == {} and registry.conflict("compressor", "first_k") == expected
    for ask in (lambda: registry.get("compressor", "first_k"), lambda: arrcoc.create("compressor", "first_k"),
                lambda: arrcoc.resolve_spec({"encoder": "pool", "compress": ["first_k"]})):
        with pytest.raises(PluginLoadError) as info:
            ask()
        assert str(info.value).endswith(expected)
    with pytest.raises(PluginLoadError, match=r"^<dict>: compress\[0\]: compressor 'first_k' is provided twice"):
        arrcoc.resolve_spec({"encoder": "pool", "compress": ["first_k"]})
    # Everything else both modules provide is usable; the name is not offered as available.
    assert registry.get("compressor", "extra") is Extra and registry.get("scorer", "salience") is Salience
    assert "first_k" not in registry.names("compressor") and "first_k" not in [i.name for i in registry.list()]
    # The other order says the same, with the providers in their order.
    other = Registry(load_entry_points=False)
    other.register(Provider(OtherFirst), name="rival")
    other.register(Provider(First), name="testplugins")
    with pytest.raises(PluginLoadError, match=r"provided twice: by rival \(test_registry\.OtherFirst\) and by "
                                              r"testplugins \(test_registry\.First\)"):
        other.get("compressor", "first_k")
    # Once one of them is gone, the other has the name.
    registry.unregister("rival")
    assert registry.conflicts == {} and registry.get("compressor", "first_k") is First


def test_three_providers_of_one_name(registry):
    class Third(Compressor):
        name = "first_k"

        def __call__(self, state):
            return state

    registry.register(Provider(OtherFirst), name="rival")
    registry.register(Provider(Third), name="third")
    assert "compressor 'first_k' is provided 3 times: by testplugins" in registry.conflict(None, "first_k")
    registry.unregister("testplugins")
    assert "provided twice: by rival (test_registry.OtherFirst) and by third" in registry.conflict("compressor", "first_k")


def test_registering_one_class_twice_is_not_a_conflict(registry):
    registry.register(Provider(Bloom, Bloom), name="again")
    assert "again" not in registry.failures
    assert registry.get("compressor", "bloom") is Bloom


def test_a_failed_second_registration_leaves_the_first_one_intact(registry):
    first = registry.pm.get_plugin("testplugins")
    # the same object under a second name: pluggy refuses; the first registration must survive
    registry.register(first, name="again")
    assert "already registered" in registry.failures["again"]
    assert registry.pm.get_plugin("testplugins") is first and registry.pm.is_registered(first)
    # another object under a taken name: refused, and the first provider keeps its classes
    registry.register(Provider(Bloom), name="testplugins")
    assert "already registered" in registry.failures["testplugins"]
    assert registry.pm.get_plugin("testplugins") is first
    assert registry.get("compressor", "first_k") is First and registry.get("encoder", "pool") is PoolEncoder


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (int, "<class 'int'> is not an arrcoc.plugin.Plugin subclass"),
        (type("NoKind", (Compressor,), {"name": "x", "kind": "compresser", "__call__": lambda s, x: x}),
         "NoKind: kind 'compresser' is not one of encoder, query_encoder, compressor"),
        (type("NoName", (Compressor,), {"__call__": lambda s, x: x}), "NoName: needs a non-empty string `name`"),
    ],
)
def test_bad_classes_are_recorded_failures(registry, cls, expected):
    registry.register(Provider(cls), name="bad")
    assert expected in registry.failures["bad"]


def test_a_raising_register_hook_is_recorded_and_others_still_register():
    class Broken:
        @hookimpl
        def arrcoc_register_plugins(self, register):
            register(Bloom)  # announced before the error: rolled back with the module
            raise RuntimeError("boom at registration")

    reg = Registry(load_entry_points=False)
    reg.register(Broken(), name="broken")
    reg.register(Provider(First), name="good")
    assert reg.failures == {"broken": "RuntimeError: boom at registration"}
    assert reg.names("compressor") == ["first_k"]
    assert reg.pm.get_plugin("broken") is None


def test_a_misspelt_hookimpl_is_a_recorded_failure():
    class Misspelt:
        @hookimpl
        def arrcoc_register_plugin(self, register):  # missing the final "s"
            register(Bloom)

    reg = Registry(load_entry_points=False)
    reg.register(Misspelt(), name="misspelt")
    failure = reg.failures["misspelt"]
    assert "unknown hook 'arrcoc_register_plugin'" in failure
    assert "(did you mean 'arrcoc_register_plugins'?)" in failure
    assert reg.list() == []
    # The registry is still usable afterwards.
    reg.register(Provider(Bloom), name="fine")
    assert reg.names("compressor") == ["bloom"]


def test_plugin_failures_returns_a_copy(registry):
    registry.failures["x"] = "ImportError: y"
    failures = arrcoc.registry.plugin_failures()
    assert failures == {"x": "ImportError: y"}
    failures.clear()
    assert registry.failures == {"x": "ImportError: y"}


# ------------------------------------------------------------- entry points
class FakeEntryPoint:
    def __init__(self, name: str, value: str, load) -> None:
        self.name, self.value, self._load = name, value, load
        self.dist = types.SimpleNamespace(name=f"{name}-dist")
        self.loads = 0

    def load(self):
        self.loads += 1
        return self._load()


def _good_module():
    module = types.ModuleType("good_plugin")

    @hookimpl
    def arrcoc_register_plugins(register):
        register(First)

    module.arrcoc_register_plugins = arrcoc_register_plugins
    return module


def _raise_import_error():
    raise ImportError("No module named 'cupy'")


@pytest.fixture
def fake_entry_points(monkeypatch):
    points = [
        FakeEntryPoint("good", "good_plugin", _good_module),
        FakeEntryPoint("broken", "broken_plugin.main", _raise_import_error),
        FakeEntryPoint("good", "good_plugin", _good_module),  # the same name twice loads once
    ]
    groups = []

    def entry_points(*, group):
        groups.append(group)
        return list(points)

    monkeypatch.setattr(arrcoc.registry, "metadata", types.SimpleNamespace(entry_points=entry_points))
    monkeypatch.delenv("ARRCOC_LOAD_PLUGINS", raising=False)
    return points, groups


def test_entry_points_that_fail_are_recorded_with_their_error(fake_entry_points):
    points, groups = fake_entry_points
    reg = Registry()
    assert groups == ["arrcoc"]
    assert reg.failures == {
        "broken": "entry point 'broken_plugin.main' of broken-dist: ImportError: No module named 'cupy'"
    }
    assert reg.get("compressor", "first_k") is First
    assert reg.list()[0].provider == "good"
    assert [p.loads for p in points] == [1, 1, 0]


@pytest.mark.parametrize(
    ("allowed", "loaded", "failures"),
    [("good", ["first_k"], {}), (" good , other", ["first_k"], {}), ("broken", [], {"broken"}), ("", [], set())],
)
def test_arrcoc_load_plugins_restricts_loading(fake_entry_points, monkeypatch, allowed, loaded, failures):
    points, _ = fake_entry_points
    monkeypatch.setenv("ARRCOC_LOAD_PLUGINS", allowed)
    reg = Registry()
    assert reg.names("compressor") == loaded
    assert set(reg.failures) == set(failures)
    assert points[0].loads == (1 if loaded else 0)
    assert points[1].loads == (1 if failures else 0)


def test_a_third_partys_entry_point_named_like_a_builtin_loads_too_and_a_clash_is_an_error(monkeypatch):
    def module_with(cls):
        def load():
            module = types.ModuleType(f"module_of_{cls.__name__}")
            module.arrcoc_register_plugins = hookimpl(lambda register: register(cls))
            return module
        return load

    rival = FakeEntryPoint("first", "fast_first", module_with(OtherFirst))
    rival.dist = types.SimpleNamespace(name="fast-first")
    builtin = FakeEntryPoint("first", "arrcoc_plugins.first", module_with(First))
    builtin.dist = types.SimpleNamespace(name="arrcoc")
    monkeypatch.delenv("ARRCOC_LOAD_PLUGINS", raising=False)
    for order in ([rival, builtin], [builtin, rival]):
        monkeypatch.setattr(arrcoc.registry, "metadata", types.SimpleNamespace(entry_points=lambda group: order))
        reg = Registry()
        assert reg.failures == {}
        assert [i.provider for i in reg.conflicts[("compressor", "first_k")]] == ["first", "first (fast-first)"]
        with pytest.raises(PluginLoadError, match=(
            r"^compressor 'first_k' is provided twice: by first \(test_registry\.First\) and by first \(fast-first\) "
            r"\(test_registry\.OtherFirst\)"
        )):
            reg.get("compressor", "first_k")


def test_a_plugin_module_that_looks_a_plugin_up_when_imported_fails_to_load_instead_of_hanging(monkeypatch):
    # Building the process-wide registry imports the plugin modules; one that resolves a plugin reference at import
    # time comes back to get_registry() on the same thread, which used to wait for its own lock forever.
    def looks_up_at_import():
        module = types.ModuleType("lookup_at_import")
        module.DEFAULT = PluginRef(use="first_k").build("compressor")
        return module

    points = [FakeEntryPoint("lookup", "lookup_at_import", looks_up_at_import),
              FakeEntryPoint("good", "good_plugin", _good_module)]
    monkeypatch.setattr(arrcoc.registry, "metadata", types.SimpleNamespace(entry_points=lambda group: points))
    monkeypatch.delenv("ARRCOC_LOAD_PLUGINS", raising=False)
    monkeypatch.setattr(arrcoc.registry, "_registry", None)
    # A lock of the test's own: should get_registry deadlock, only this test's lock stays held.
    monkeypatch.setattr(arrcoc.registry, "_lock", threading.RLock())
    built: list[Registry] = []
    worker = threading.Thread(target=lambda: built.append(arrcoc.get_registry()), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert built, "get_registry() never returned: the lookup during the import waited for the registry being built"
    registry = built[0]
    assert registry.failures["lookup"].startswith(
        "entry point 'lookup_at_import' of lookup-dist: PluginLoadError: the plugin registry is still loading its "
        "entry points: a plugin module looked a plugin up (arrcoc.create, PluginRef.build, a nested_plugin param) "
        "while it was imported"
    )
    assert registry.get("compressor", "first_k") is First  # the other modules load; the registry is usable
    assert arrcoc.get_registry() is registry and type(PluginRef(use="first_k").build("compressor")) is First


def test_no_entry_points_when_switched_off(fake_entry_points):
    points, groups = fake_entry_points
    Registry(load_entry_points=False)
    assert groups == [] and all(p.loads == 0 for p in points)


def test_arrcoc_trace_plugins_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("ARRCOC_TRACE_PLUGINS", "1")
    reg = Registry(load_entry_points=False)
    reg.register(Provider(Bloom), name="traced")
    out = capsys.readouterr().out
    assert "arrcoc_register_plugins" in out


# ---------------------------------------------------------------- observers
class Observer:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @hookimpl
    def arrcoc_stage_started(self, stage, plugin, state):
        self.calls.append(("started", stage, plugin.name, None if state is None else state.token_counts()))

    @hookimpl
    def arrcoc_stage_finished(self, stage, plugin, state, record):
        self.calls.append(("finished", stage, plugin.name, state.token_counts(), record))


def test_observer_hooks_are_called_once_per_stage(registry):
    observer = Observer()
    registry.register(observer, name="observer")
    spec = {
        "encoder": {"use": "pool", "patch": 8},
        "compress": [{"use": "first_k", "keep": 6}, {"use": "bloom"}],
    }
    state = arrcoc.run_pipeline(spec, torch.rand(2, 3, 32, 32), device="cpu")
    calls = [c[:4] for c in observer.calls]
    assert calls == [
        ("started", "encoder", "pool", None),
        ("finished", "encoder", "pool", (16, 16)),
        ("started", "compress[0]", "first_k", (16, 16)),
        ("finished", "compress[0]", "first_k", (6, 6)),
        ("started", "compress[1]", "bloom", (6, 6)),
        ("finished", "compress[1]", "bloom", (6, 6)),
    ]
    records = [c[4] for c in observer.calls if c[0] == "finished"]
    assert tuple(records) == state.trace
    # The observer only observes: the first 6 patches in raster order are kept.
    assert torch.equal(state.origin[0, :6], torch.arange(6))
    registry.unregister("observer")
    arrcoc.run_pipeline(spec, torch.rand(1, 3, 32, 32), device="cpu")
    assert len(observer.calls) == 6
