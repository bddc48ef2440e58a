"""Package discovery, which ``pyproject.toml`` cannot express for this layout.

The built-in plugins live in ``plugins/`` but import as ``arrcoc_plugins``, and the pipeline files in
``pipelines/`` import as ``arrcoc.pipelines``; ``[tool.setuptools.packages.find]`` finds packages only under
their own directory names. So every package is found here with ``find_packages`` (a hand-written list once
left ``arrcoc.evaluation`` out of the wheel), and ``tests/test_packaging.py`` builds the wheel and checks that
every module of the source tree is in it.
"""

from setuptools import find_packages, setup


def _tree(directory: str, name: str) -> list[str]:
    """``name`` and every package below ``directory``, named under ``name``."""
    return [name] + [f"{name}.{sub}" for sub in find_packages(directory)]


setup(
    package_dir={"arrcoc": "arrcoc", "arrcoc_plugins": "plugins", "arrcoc.pipelines": "pipelines"},
    packages=_tree("arrcoc", "arrcoc") + _tree("plugins", "arrcoc_plugins") + ["arrcoc.pipelines"],
)
