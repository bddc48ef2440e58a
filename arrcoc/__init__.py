"""arrcoc: spend a VLM's visual tokens where the query needs them.

A staged pipeline, encode -> compress -> score -> allocate, whose every stage
is a pluggy plugin and which is declared in YAML::

    import arrcoc
    state = arrcoc.run_pipeline("tome", ["cat.png"])
    print(state.tokens.shape, state.trace)
"""

from . import ops
from .errors import (
    ArrcocError,
    ArrcocWarning,
    BudgetError,
    DatasetError,
    InputError,
    MissingInputError,
    ModelError,
    ParamsError,
    PluginLoadError,
    SpecError,
    StageError,
    StateError,
    UnknownPipelineError,
    UnknownPluginError,
)
from .hookspecs import hookimpl
from .pipeline import Pipeline, load_pipeline, run_pipeline
from .plugin import (
    Allocator, Compressor, Encoder, Keep, LLMCompressor, Params, Plugin, PluginRef, QueryEncoder, Scorer,
)
from .registry import create, get_registry, list_plugins
from .spec import PipelineSpec, available_pipelines, resolve_spec
from .state import LLMContext, StageRecord, TokenState

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``arrcoc.hf`` imports transformers: only when it is used.
    if name == "hf":
        from .integrations import hf

        return hf
    if name == "evaluate":  # `arrcoc eval`'s Python API (needs the hf extra when it runs)
        from .evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'arrcoc' has no attribute {name!r}")

__all__ = [
    "Allocator", "ArrcocError", "ArrcocWarning", "BudgetError", "Compressor", "DatasetError", "Encoder", "InputError",
    "Keep", "LLMCompressor", "LLMContext", "MissingInputError", "ModelError", "Params", "ParamsError", "Pipeline", "PipelineSpec",
    "Plugin", "PluginLoadError", "PluginRef", "QueryEncoder", "Scorer", "SpecError", "StageError", "StageRecord",
    "StateError",
    "TokenState", "UnknownPipelineError", "UnknownPluginError", "available_pipelines", "create",
    "get_registry", "hookimpl", "list_plugins", "load_pipeline", "ops", "resolve_spec", "run_pipeline",
]
