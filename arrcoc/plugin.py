"""Base classes of the plugin kinds.

A plugin is a class with ``kind``, ``name``, a pydantic ``Params`` model
(``extra="forbid"``), built from validated params, and called as
``stage(state) -> state`` (an encoder: ``encode(pixels) -> state``).
Capability flags are checked when a pipeline is loaded, before any model
runs: ``stage`` (``vision``, ``projector``, ``llm``), ``needs`` (inputs such
as ``cls_attention``, ``keys``, ``query``), ``provides`` and ``adaptive``
(whether the number of tokens out depends on the image).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence, Union

import numpy as np
import torch
from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator,
)
from typing_extensions import Annotated

from .errors import ArrcocError, BudgetError, MissingInputError, ParamsError, PluginLoadError, StateError, did_you_mean
from .state import LLMContext, TokenState

KINDS = ("encoder", "query_encoder", "compressor", "scorer", "allocator", "pyramid", "visualizer")

def _python_scalars(value: Any) -> Any:
    """numpy scalars (``np.int64(8)``, ``np.float32(0.5)``), also inside lists and dicts, as Python numbers.

    They come from array code and must mean what the Python number means:
    an int is a count and a float a ratio, and a spec holding them must still
    dump to YAML.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_python_scalars(v) for v in value)
    if isinstance(value, dict):
        return {k: _python_scalars(v) for k, v in value.items()}
    return value


def _check_keep(value: Any) -> Any:
    value = _python_scalars(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a ratio in (0, 1] (float) or a count >= 1 (int), got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"a ratio must lie in (0, 1] (use an int for a count), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"a count must be >= 1, got {value!r}")
    return value


#: One budget vocabulary for every method: a ratio in (0, 1] (float) or a count >= 1 (int).
#: In YAML ``keep: 1`` is one token and ``keep: 1.0`` all of them.
Keep = Annotated[Union[int, float], BeforeValidator(_check_keep)]


class Params(BaseModel):
    """Base of every plugin's parameters: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginRef(BaseModel):
    """``{use: name, **params}``: a plugin by name with its (raw) params.

    Used for pipeline stages and for plugins nested in another plugin's
    params (``in_blocks: {use: tome, r: 8}``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    use: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_use(cls, data: Any) -> Any:
        data = _python_scalars(data)
        if isinstance(data, str):
            return {"use": data, "params": {}}
        if isinstance(data, dict) and "params" not in data:
            data = dict(data)
            if "use" not in data:
                raise ValueError(f"a stage needs `use: <plugin name>`, got keys {sorted(data)}")
            return {"use": data.pop("use"), "params": data}
        return data

    def as_yaml_dict(self) -> dict[str, Any]:
        return {"use": self.use, **self.params}

    def build(self, kind: str, registry: PluginSource | None = None) -> "Plugin":
        """The plugin of ``kind`` this names, with its params validated, from ``registry`` (default: the
        process-wide one, :func:`arrcoc.get_registry`)."""
        return plugin_class(kind, self.use, registry)(**self.params)


# A plugin reference is resolved by name in a registry (arrcoc.registry), which sits above this module: it imports
# the base classes here, so this module never imports it.  The registry hands itself in when it is imported
# (provide_registry), and a caller may pass another one.
class PluginSource(Protocol):
    """What resolving a plugin reference needs of a registry (:class:`arrcoc.registry.Registry` is one)."""

    def get(self, kind: str, name: str, *, where: str = "") -> type["Plugin"]: ...


_default_registry: Callable[[], PluginSource] | None = None


def provide_registry(source: Callable[[], PluginSource]) -> None:
    """Set the function that returns the process-wide registry (:mod:`arrcoc.registry` calls it once)."""
    global _default_registry
    _default_registry = source


def plugin_class(kind: str, name: str, registry: PluginSource | None = None) -> type["Plugin"]:
    """The class registered as ``(kind, name)`` in ``registry``, by default the process-wide one."""
    if registry is None:
        if _default_registry is None:  # only when arrcoc.plugin is loaded without the arrcoc package
            raise PluginLoadError(f"{kind} {name!r}: no plugin registry to look it up in; import arrcoc first")
        registry = _default_registry()
    return registry.get(kind, name)


def nested_plugin(kind: str) -> Any:
    """A ``PluginRef`` field type whose params are validated against plugin ``kind``."""

    def check(ref: PluginRef) -> PluginRef:
        plugin_class(kind, ref.use).validate_params(ref.params)
        return ref

    # The flat `{use: name, **params}` form; `arrcoc schema` replaces it by that kind's stage schemas.
    schema = {"type": "object", "required": ["use"], "properties": {"use": {"type": "string"}}, "x-arrcoc-kind": kind}
    return Annotated[PluginRef, AfterValidator(check), WithJsonSchema(schema)]


@dataclass(frozen=True)
class BudgetContext:
    """What a budget rule may read (:meth:`Plugin.budget_params`), for one stage of one pipeline.

    Counts are per image.  ``tokens`` is what the stage receives (for a
    later stage: what the earlier stages were set to hand on), ``original``
    what the vision tower produced (the budget's 100 %); ``layers`` is the
    LLM's depth, over which in-LLM stages are averaged; ``encoder_layers``
    the vision blocks that produced the features (0 when unknown).
    """

    tokens: int
    original: int
    grid: tuple[int, int]
    layers: int
    has_cls: bool = False
    encoder_layers: int = 0


def budget_count(target: float, tokens: int) -> int:
    """``target`` tokens as a count: nearest integer, at least 1 and at most ``tokens``."""
    return int(min(max(int(math.floor(target + 0.5)), 1), max(tokens, 1)))


class Plugin(ABC):
    """Common base: validated params, capability flags, a readable repr."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    stage: ClassVar[str] = "vision"
    needs: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    adaptive: ClassVar[bool] = False

    def __init__(self, params: BaseModel | None = None, /, **kwargs: Any) -> None:
        if params is None:
            params = self.validate_params(kwargs)
        elif kwargs:
            raise ParamsError(f"{self.kind} {self.name!r}: pass either a Params object or keyword params, not both")
        elif not isinstance(params, self.Params):
            raise ParamsError(
                f"{self.kind} {self.name!r}: expected {self.Params.__qualname__}, got {type(params).__name__}"
            )
        self.params = params

    @classmethod
    def validate_params(cls, raw: dict[str, Any]) -> BaseModel:
        try:
            return cls.Params(**raw)
        except ValidationError as exc:
            raise ParamsError(format_validation_error(exc, f"{cls.kind} {cls.name!r}", cls.Params)) from None

    def requirements(self) -> frozenset[str]:
        """What this instance needs from earlier stages (may depend on params)."""
        return self.needs

    # ------------------------------------------------------------ budgets
    # ``arrcoc eval`` speaks one budget vocabulary: the fraction of the visual tokens the LLM sees (averaged over
    # decoder layers for in-LLM stages).  Each method turns a token target into its own params here, in its own
    # file; the core (arrcoc.budget) only splits a pipeline's target among its stages.
    @classmethod
    def budget_bounds(cls, params: dict[str, Any], context: BudgetContext) -> tuple[float, float] | None:
        """Fewest and most tokens per image this stage can hand on from ``context.tokens`` (for an ``llm:``
        stage: the mean over the LLM's layers of the visual tokens they see); ``None`` when the stage sets no
        token count (a scorer).  Raise :class:`~arrcoc.errors.BudgetError` when it cannot be budgeted at all."""
        return None

    @classmethod
    def budget_params(cls, params: dict[str, Any], target: float, context: BudgetContext) -> dict[str, Any]:
        """``params`` (the pipeline's, as in YAML) changed so that this stage hands on about ``target`` tokens
        per image (for an ``llm:`` stage: on average over the LLM's layers) when it receives ``context.tokens``.

        ``target`` lies within :meth:`budget_bounds`.  Raise
        :class:`~arrcoc.errors.BudgetError`, saying why, when the target cannot be met.
        """
        raise BudgetError(f"{cls.kind} {cls.name!r} declares no budget rule (budget_params)")

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({shown})"


class Encoder(Plugin):
    """Turns pixels into the first :class:`TokenState`."""

    kind = "encoder"

    def to(self, device: torch.device | str) -> "Encoder":
        return self

    def configure(self, outputs: frozenset[str]) -> None:
        """Told, once, which of ``provides`` later stages need (compute only those)."""

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] -> model input (resize, normalise)."""
        return pixels

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> TokenState:
        """Model input ``[B, 3, H, W]`` (after :meth:`preprocess`) -> first state."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Channels ``D`` of the tokens this encoder emits."""


class QueryEncoder(Plugin):
    """Turns query strings into ``(embeddings [B, T, Dq], mask [B, T])``."""

    kind = "query_encoder"

    @abstractmethod
    def encode(
        self, queries: Sequence[str], *, dim: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``dim`` is the visual token width, for encoders that can match it."""


class Stage(Plugin):
    """A ``TokenState -> TokenState`` stage (compressor, scorer, allocator)."""

    @abstractmethod
    def __call__(self, state: TokenState) -> TokenState:
        """Return the next state; move tokens only through :mod:`arrcoc.ops`."""


class Compressor(Stage):
    kind = "compressor"

    @classmethod
    def budget_bounds(cls, params: dict[str, Any], context: BudgetContext) -> tuple[float, float] | None:
        """Default for a compressor with a ``keep`` param: any count from 1 to the tokens it receives."""
        if "keep" not in cls.Params.model_fields:
            raise BudgetError(
                f"compressor {cls.name!r} has no `keep` param and no budget rule: define budget_bounds and "
                "budget_params on its class to use it with a budget (arrcoc eval)"
            )
        return 1.0, float(context.tokens)

    @classmethod
    def budget_params(cls, params: dict[str, Any], target: float, context: BudgetContext) -> dict[str, Any]:
        """Default for a compressor with a ``keep`` param: ``keep`` = the target as a count."""
        cls.budget_bounds(params, context)  # the same refusal without `keep`
        return {**params, "keep": budget_count(target, context.tokens)}

    #: Params that give one entry per encoder block when the compressor runs inside an encoder
    #: (``in_blocks``), e.g. ToMe's ``r: [8, 8, 4]``. ``None``: every list-valued param of a class that
    #: overrides :meth:`in_block` (a per-layer schedule); ``frozenset()`` for a class whose lists are not
    #: per block.
    per_block_params: ClassVar[frozenset[str] | None] = None

    @property
    def packed_images(self) -> bool:
        """True: inside a model, a multi-view image (LLaVA-NeXT's base view and crops) reaches this stage as the
        one sequence the LLM receives (one row per image, packed by the model's adapter, newline tokens
        included), as a method whose official code selects over that sequence needs; False (default): one row
        per view."""
        return False

    def in_block(self, state: TokenState, layer: int, num_layers: int) -> TokenState:
        """Run inside encoder block ``layer`` of ``num_layers`` (after attention).

        The encoder puts the block's head-mean keys in ``per_token["block_keys"]``.
        Defaults to ``self(state)`` in every block; a method with a per-layer
        schedule overrides it.
        """
        return self(state)

    def block_schedules(self) -> dict[str, Sequence[Any]]:
        """The per-block params (see ``per_block_params``) that are lists, by name.

        An encoder running this compressor in its blocks refuses a schedule
        with more entries than the blocks it runs: the extra ones would never
        apply.
        """
        names = self.per_block_params
        if names is None:
            overridden = type(self).in_block is not Compressor.in_block
            names = frozenset(type(self.params).model_fields) if overridden else frozenset()
        values = {name: getattr(self.params, name, None) for name in sorted(names)}
        return {name: value for name, value in values.items() if isinstance(value, (list, tuple))}


#: What a model integration computes inside an LLM for ``llm:`` stages (see docs/hf.md), from the
#: attention of the layer before the one a stage acts at, named in a stage's ``needs``:
#: ``attn_from_last``: ``per_token["attn_from_last"]`` ``[B, N]``, head-mean attention each visual token receives
#: from the last token;
#: ``attn_from_text``: ``per_token["attn_from_text"]`` ``[B, N, T]``, the same from each text token after the image
#: (``state.llm.text_mask`` ``[B, T]``), with the text hidden states at the LLM input as ``state.query`` and those
#: of every visual token (before any pruning) as ``state.llm.input_visual`` ``[B, N0, D]`` /
#: ``state.llm.input_visual_mask``;
#: ``attn_logits``: ``state.llm.attn_logits`` ``[B, heads, L, L]``, masked pre-softmax logits of the whole
#: sequence, with ``state.llm.visual_columns`` ``[B, N]`` (sequence index of each visual token) and
#: ``state.llm.sequence_mask``;
#: ``key_norms``: ``per_token["key_norms"]`` ``[B, N]`` float32, the L1 norm of each visual token's post-rotary keys
#: at layer ``- 1`` (heads concatenated, key heads repeated as for attention: DART's pivot score), with the same of
#: the text after the image as ``state.llm.text_key_norms`` ``[B, T]`` (``text_mask``, ``text_positions``);
#: ``normed_hidden``: ``per_token["normed_hidden"]`` ``[B, N, D]``, the visual hidden states at the stage's layer
#: through the LLM's final norm (DART's duplication space), with the text's as ``state.llm.text_normed_hidden``;
#: ``attn_from_last_here``: ``per_token["attn_from_last_here"]`` ``[B, N]`` float32, the head-mean attention each
#: visual token receives from the last token **in the layer the stage acts at**, computed with that layer's own
#: input norm, query / key projections and rotary positions on the sequence as it reaches it (PyramidDrop's
#: ranking; the layer's value and output projections and its kernel do not run for it).
#: Always: ``state.llm.layer``, ``state.llm.num_layers``, ``state.llm.input_visual_counts`` ``[B]`` (the visual
#: tokens at the LLM input) and ``state.llm.visual_positions`` (:class:`arrcoc.state.LLMContext` documents every
#: field).
LLM_SIGNALS = frozenset({"attn_from_last", "attn_from_text", "attn_logits", "key_norms", "normed_hidden",
                         "attn_from_last_here"})


class LLMCompressor(Compressor):
    """A compressor that runs between the decoder layers of an LLM (the ``llm:`` section).

    A model integration (:mod:`arrcoc.integrations.hf`) calls it during
    prefill at the input of each decoder layer in :meth:`llm_layers`, with a
    state whose ``tokens`` are the visual hidden states there, whose
    ``per_token["llm_slot"]`` (int64) numbers the input tokens (survivors keep
    theirs; a merged token keeps its destination's), and whose ``llm`` field
    (:class:`~arrcoc.state.LLMContext`, read with :meth:`llm_context`) says
    where it runs (``layer``, ``num_layers``) and carries the model's signals;
    the :data:`LLM_SIGNALS` named in ``needs`` (from layer ``- 1``'s
    attention) are filled, the others are None.  It returns the visual tokens
    that go on.  Text tokens are never touched.
    """

    stage = "llm"

    @classmethod
    def budget_bounds(cls, params: dict[str, Any], context: BudgetContext) -> tuple[float, float] | None:
        # An in-LLM budget is a mean over decoder layers: no generic rule follows from a `keep` param.
        raise BudgetError(
            f"llm stage {cls.name!r} declares no budget rule: define budget_bounds and budget_params on its class "
            "(the budget of an llm: stage is the mean over decoder layers of the visual tokens they see)"
        )

    @abstractmethod
    def llm_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers (0-based) at whose input this stage acts, for an LLM of ``num_layers``."""

    def llm_context(self, state: TokenState) -> LLMContext:
        """``state.llm``, or a :class:`~arrcoc.errors.MissingInputError` when the state comes from outside an LLM
        (a :class:`~arrcoc.errors.StateError` when ``state.llm.layer`` is not one of :meth:`llm_layers`)."""
        if state.llm is None:
            raise MissingInputError(
                f"{self.name}: runs inside an LLM (arrcoc.hf.apply), which sets state.llm (the decoder layer and "
                "the model's signals); this state has none (state.llm is None): run the pipeline through a model "
                "integration, or build the state with llm=arrcoc.LLMContext(...)"
            )
        # A stage reads its per-layer rule at state.llm.layer (a schedule index, a table step): a layer outside
        # llm_layers would silently read another layer's entry (index -1) or fail with a bare IndexError.
        layers = self.llm_layers(state.llm.num_layers)
        if state.llm.layer not in layers:
            raise StateError(
                f"{self.name}: acts at decoder layers {list(layers)} of a {state.llm.num_layers}-layer LLM, got "
                f"state.llm.layer {state.llm.layer}"
            )
        return state.llm

    @property
    def removes(self) -> bool:
        """Dropped tokens leave the sequence (and the KV cache); False: they stay, masked as keys."""
        return getattr(self.params, "mode", "remove") == "remove"

    @property
    def position_rule(self) -> str:
        """``original``: kept tokens keep their position ids; ``compact``: renumbered contiguously."""
        return getattr(self.params, "positions", "original")

    @property
    def decode_position_rule(self) -> str:
        """After a ``compact`` prefill, how decoding steps number new tokens at the layers from this stage on:
        ``unpruned`` (from the prompt's unpruned length, as ``generate`` does: FastV, SparseVLM v1.0) or
        ``shifted`` (that number minus the prompt tokens dropped before these layers, so they continue the
        compact numbering: PyramidDrop)."""
        return getattr(self.params, "decode_positions", "unpruned")


class Scorer(Stage):
    kind = "scorer"


class Allocator(Stage):
    kind = "allocator"

    @classmethod
    def budget_bounds(cls, params: dict[str, Any], context: BudgetContext) -> tuple[float, float] | None:
        # An allocator decides how many tokens come out: without its own rule no budget can be met.
        raise BudgetError(
            f"allocator {cls.name!r} declares no budget rule: define budget_bounds and budget_params on its class"
        )


class Pyramid(Plugin):
    kind = "pyramid"


class Visualizer(Plugin):
    kind = "visualizer"


def format_validation_error(exc: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line per pydantic error: field, what was expected, what came."""
    lines = [f"{where}: invalid parameters"]
    fields = list(model.model_fields) if model is not None else []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        cause = (err.get("ctx") or {}).get("error")
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(err["loc"][-1]), fields)
            lines.append(f"  {loc}: unknown parameter{hint}; valid: {', '.join(fields) or '(none)'}")
        elif isinstance(cause, ArrcocError):
            # A nested plugin's own located message (e.g. `in_blocks: {use: tome, rr: 3}`): indent it.
            lines.append(f"  {loc}: " + str(cause).replace("\n", "\n  "))
        else:
            msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
            got = "" if "got" in msg else f" (got {err.get('input')!r})"  # validators of ours say what came
            lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)
