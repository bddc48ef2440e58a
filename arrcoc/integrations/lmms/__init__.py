"""arrcoc as an lmms-eval model (``pip install 'arrcoc[lmms]'``): ``python -m lmms_eval --model arrcoc ...``.

lmms-eval 0.7 finds the model through the entry-point group
``lmms_eval.models`` (its v2 manifest registry): the group's ``arrcoc``
entry names :func:`manifest` here, which only describes where the class
lives, so listing lmms-eval's models imports neither the class nor torch.
The class, :class:`arrcoc.integrations.lmms.model.ArrcocLMM`, runs every
request under ``arrcoc.hf.apply`` with a pipeline planned at a budget.
See docs/lmms.md.
"""

from __future__ import annotations

from typing import Any

#: The name lmms-eval knows the model by (``--model arrcoc``).
MODEL_ID = "arrcoc"
CLASS_PATH = "arrcoc.integrations.lmms.model.ArrcocLMM"


def manifest() -> Any:
    """lmms-eval's registration payload (the ``lmms_eval.models`` entry point calls it)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
