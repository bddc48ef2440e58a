"""Models shipped inside the package, addressed as ``arrcoc:<name>`` wherever a model directory is expected.

A pipeline file names a Hugging Face model by directory or hub id
(``encoder: {use: hf_vision, model: path/to/llava}``).  A model that ships
with arrcoc has no stable directory — it lives wherever the package was
installed — so pipelines, ``arrcoc generate`` and ``arrcoc.hf.load`` accept
``arrcoc:toyvqa`` and :func:`resolve_model` turns it into that directory.
Anything else (a directory, a hub id) is returned unchanged.
"""

from __future__ import annotations

import re
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


#: What a Hugging Face hub id looks like (``name`` or ``org/name``); anything else can only be a local path.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
#: Files any one of which gives ``AutoTokenizer`` a tokenizer (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _what_to_pass() -> str:
    shipped = ", ".join(f"{PREFIX}{name}" for name in sorted(SHIPPED_MODELS))
    return (f"pass a local Hugging Face checkpoint directory, a hub id ('org/name'), or {shipped} (the ToyVQA "
            "LLaVA that ships inside arrcoc, no download)")


def resolve_model(reference: str | Path) -> str:
    """``arrcoc:<name>`` -> the shipped model's directory; a directory or hub id -> itself.

    A reference that can only be a local path (absolute, ``./``, ``~``, more than one ``/`` ...) and does not
    exist is a :class:`ModelError` saying so, rather than the hub's "Repo id must be in the form ...".
    """
    text = str(reference)
    if text.startswith(PREFIX):
        return str(shipped_model_dir(text[len(PREFIX):]))
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # '~name/...' with no user 'name' (the shell leaves it as it is)
        raise ModelError(f"model directory {text!r} does not exist; {_what_to_pass()} ({text.split('/', 1)[0]!r} "
                         "names no user's home folder)") from None
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {text!r} is a file, not a model directory; {_what_to_pass()}")
        return str(path) if text.startswith("~") else text
    if not _HUB_ID.fullmatch(text) or ".." in text or text.startswith("."):
        raise ModelError(f"model directory {text!r} does not exist; {_what_to_pass()}")
    return text


def check_model_dir(reference: str | Path, *, tokenizer: bool = True) -> str:
    """:func:`resolve_model`, then, for a local directory, the files ``from_pretrained`` needs are there.

    Missing ones are named (``config.json``; with ``tokenizer``, one of :data:`TOKENIZER_FILES`) instead of
    transformers' guess (a tokenizer without ``tokenizer.json`` is blamed on sentencepiece or tiktoken not being
    installed). A hub id is returned as it is.
    """
    resolved = resolve_model(reference)
    path = Path(resolved)
    if not path.is_dir():
        return resolved
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        missing.append(f"tokenizer file ({', '.join(TOKENIZER_FILES)} or *.tiktoken)")
    if missing:
        present = sorted(p.name for p in path.iterdir())[:12]
        raise ModelError(f"model directory {str(reference)!r} holds no {' and no '.join(missing)} (it holds: "
                         f"{', '.join(present) or 'nothing'}); save the model with save_pretrained and its "
                         "processor or tokenizer with save_pretrained into it, or copy those files from the checkpoint")
    return resolved
