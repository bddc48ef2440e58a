"""``arrcoc eval``: accuracy, loyalty and cost against visual tokens for pipelines and baselines (docs/eval.md).

::

    import arrcoc
    result = arrcoc.evaluate(["sparsevlm", "fastv"], budgets=[0.5, 0.25], n=200, out="out/eval")
    result.row("sparsevlm", 0.25)["accuracy"]

Needs the ``hf`` extra (transformers) to run, and ``viz`` (matplotlib) for the plots.
"""

from .data import EvalSample, load_samples
from .methods import ALL_TOKENS, BASELINE_PIPELINES, DEFAULT_BUDGETS, DOWNSAMPLE, Method, methods_for, post_tower
from .runner import EvalResult, evaluate
from .totals import COLUMNS

__all__ = [
    "ALL_TOKENS", "BASELINE_PIPELINES", "COLUMNS", "DEFAULT_BUDGETS", "DOWNSAMPLE", "EvalResult", "EvalSample",
    "Method", "evaluate", "load_samples", "methods_for", "post_tower",
]
