"""Run arrcoc pipelines inside Hugging Face VLMs (``pip install 'arrcoc[hf]'``; transformers 5.x).

``arrcoc.hf.apply(model, pipeline)`` is the entry point; one adapter file per
model family (``llava.py``) implements :class:`Adapter`.  See docs/hf.md.
"""

from __future__ import annotations

try:
    import transformers as _transformers  # noqa: F401  (the hf extra is installed)
except ImportError as exc:  # pragma: no cover - the hf extra is missing
    from arrcoc.errors import ModelError

    raise ModelError("arrcoc.hf needs transformers: pip install 'arrcoc[hf]'") from exc

from .compat import check_version as _check_version

_check_version()  # an older release would fail later, inside generate, with a message that names no version

from . import gemma3, internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401  (register the adapters)
from .adapter import Adapter, adapter_for, register_adapter, supported_models
from .apply import Run, apply, load
from .report import Report, layer_flops

__all__ = ["Adapter", "Report", "Run", "adapter_for", "apply", "layer_flops", "load", "register_adapter", "supported_models"]
