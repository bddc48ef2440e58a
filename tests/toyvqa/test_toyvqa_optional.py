"""transformers is optional: the task imports without it, the model says how to get it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import arrcoc.toyvqa as toyvqa
from arrcoc.errors import ArrcocError


def test_importing_the_package_neither_needs_transformers_nor_trains():
    code = ("import sys, arrcoc.toyvqa as t; t.sample('test', 0); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_transformers_loading_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # makes `import transformers` fail
    with pytest.raises(ArrcocError, match=r"install the 'hf' extra: pip install 'arrcoc\[hf\]'"):
        toyvqa.load()
