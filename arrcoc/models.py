"""Models shipped inside the package, addressed as ``arrcoc:<name>`` wherever a model directory is expected.

A pipeline file names a Hugging Face model by directory or hub id
(``encoder: {use: hf_vision, model: path/to/llava}``).  A model that ships
with arrcoc has no stable directory — it lives wherever the package was
installed — so pipelines, ``arrcoc generate`` and ``arrcoc.hf.load`` accept
``arrcoc:toyvqa`` and :func:`resolve_model` turns it into that directory.
Anything else (a directory, a hub id) is returned unchanged.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ModelError

PREFIX = "arrcoc:"

#: name -> (package, directory inside it) of every model shipped as package data.
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "toyvqa": ("arrcoc.toyvqa", "model"),   # docs/toyvqa.md: the ToyVQA LLaVA trained by `python -m arrcoc.toyvqa train`
}


def shipped_model_dir(name: str) -> Path:
    """The directory of shipped model ``name`` (it must hold a ``config.json``)."""
    if name not in SHIPPED_MODELS:
        raise ModelError(f"{PREFIX}{name}: no such shipped model; shipped: "
                         + ", ".join(PREFIX + n for n in sorted(SHIPPED_MODELS)))
    package, directory = SHIPPED_MODELS[name]
    path = Path(str(resources.files(package) / directory))
    if not (path / "config.json").is_file():
        raise ModelError(f"{PREFIX}{name}: the model is missing from the installed package (expected "
                         f"{path / 'config.json'}); reinstall arrcoc")
    return path


def resolve_model(reference: str | Path) -> str:
    """``arrcoc:<name>`` -> the shipped model's directory; a directory or hub id -> itself."""
    text = str(reference)
    if text.startswith(PREFIX):
        return str(shipped_model_dir(text[len(PREFIX):]))
    return text
