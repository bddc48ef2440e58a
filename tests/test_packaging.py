"""The wheel holds every module of the source tree, every pipeline file and the shipped model.

Tests run from an editable install, which imports straight from the tree: without this check a package left
out of the wheel (``arrcoc.evaluation`` once was) fails only for users of a normal ``pip install .``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source directory -> the import name it installs as (setup.py's package_dir)
INSTALLED_AS = {"arrcoc": "arrcoc", "plugins": "arrcoc_plugins", "pipelines": "arrcoc/pipelines"}
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Names in a wheel built from a copy of the tree (the build writes egg-info beside the sources)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_FILES:
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for directory in INSTALLED_AS:
        shutil.copytree(ROOT / directory, src / directory, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("arrcoc-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _source_files(directory: str, pattern: str) -> list[tuple[Path, str]]:
    """(file, the name it must have in the wheel) for every file matching ``pattern`` under ``directory``."""
    base = ROOT / directory
    return [(path, f"{INSTALLED_AS[directory]}/{path.relative_to(base).as_posix()}")
            for path in sorted(base.rglob(pattern)) if "__pycache__" not in path.parts]


def test_every_module_of_the_tree_is_in_the_wheel(wheel_names):
    expected = [name for d in INSTALLED_AS for _, name in _source_files(d, "*.py")]
    assert len(expected) > 50  # the walk found the tree
    missing = [name for name in expected if name not in wheel_names]
    assert not missing, f"modules missing from the wheel (an __init__.py or a package-data rule?): {missing}"


def test_pipelines_and_the_shipped_model_are_in_the_wheel(wheel_names):
    expected = [name for _, name in _source_files("pipelines", "*.yaml")]
    model = ROOT / "arrcoc" / "toyvqa" / "model"
    expected += [f"arrcoc/toyvqa/model/{path.name}" for path in sorted(model.iterdir())]
    assert len(expected) > 10
    missing = [name for name in expected if name not in wheel_names]
    assert not missing, f"data files missing from the wheel: {missing}"


def test_the_wheel_declares_the_cli_and_every_builtin_plugin_it_holds(wheel, wheel_names):
    import configparser

    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser(delimiters=("=",))
        parser.optionxform = str  # plugin names are case-sensitive
        parser.read_string(archive.read(entry_points).decode())
    assert parser["console_scripts"]["arrcoc"].strip() == "arrcoc.cli:main"
    plugins = dict(parser["arrcoc"])
    assert "tome" in plugins and "hf_vision" in plugins
    for name, target in plugins.items():
        module = target.strip().split(":")[0].replace(".", "/") + ".py"
        assert module in wheel_names, f"entry point {name} -> {target}: {module} is not in the wheel"
    wheel_root = {name.split("/")[0] for name in wheel_names}
    assert not {"tests", "benchmarks", "examples", "docs"} & wheel_root  # the packages and nothing else
