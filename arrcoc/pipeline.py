"""``Pipeline``: built once from a spec (models loaded once), run many times."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import (
    ArrcocError, InputError, MissingInputError, StageError, StateError, collect_warnings, record_warning,
)
from .images import load_images
from .plugin import LLM_SIGNALS, Encoder, Plugin, QueryEncoder, Stage
from .registry import Registry, get_registry
from .spec import SECTIONS, PipelineSpec, resolve_spec
from .state import NonFiniteStateError, StageRecord, TokenState
from .timing import clock

@contextlib.contextmanager
def stage_errors(label: str, plugin: str) -> Iterator[None]:
    """Errors raised inside the block name the stage: ``compress[1] (tome): ...``.

    An :class:`ArrcocError` is raised again as the same class with the label
    in front (once: a message that already starts with it, or with the
    plugin's own ``tome: ``, is not labelled twice); any other exception
    becomes a :class:`StageError`. The original is the ``__cause__`` either
    way. Running out of memory keeps its type (callers catch it to retry
    smaller) and gets the label as a note.
    """
    prefix = f"{label} ({plugin}): "
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError) as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"in {label} ({plugin})")
        raise
    except ArrcocError as exc:
        message = str(exc)
        if message.startswith(prefix):
            raise
        relabelled = type(exc).__new__(type(exc))
        relabelled.__dict__.update(exc.__dict__)
        relabelled.args = (prefix + message.removeprefix(f"{plugin}: "),)
        raise relabelled from exc
    except Exception as exc:
        raise StageError(f"{prefix}{type(exc).__name__}: {exc}") from exc


def check_stage_output(label: str, plugin: str, before: TokenState | None, out: Any) -> TokenState:
    """What a stage returned is a consistent state, or the error names the stage that broke it.

    Cheap checks of every stage's output, so that a broken (third-party)
    stage is blamed instead of the next one: a :class:`TokenState` of the
    same batch and grid, whose invariants hold (:meth:`TokenState.check`:
    prefix masks, positive sizes, ``origin`` on real tokens) and whose real
    tokens and class token are finite (every stage's input is: the pixels
    are checked, and so is each stage's output).
    """
    if not isinstance(out, TokenState):
        raise StateError(f"{label} ({plugin}) returned {type(out).__name__}, expected a TokenState")
    if before is not None and (out.B, out.grid) != (before.B, before.grid):
        raise StateError(
            f"{label} ({plugin}) returned a state of {out.B} images on a {out.grid} patch grid from "
            f"{before.B} images on {before.grid}; a stage keeps the batch and the grid"
        )
    try:
        out.check()
    except NonFiniteStateError as exc:
        raise StateError(
            f"{label} ({plugin}) returned NaN or inf tokens (images {exc.images or 'class token'}) from finite input"
        ) from None
    except StateError as exc:
        raise StateError(f"{label} ({plugin}) returned an inconsistent state: {exc}") from None
    return out


def run_stage(label: str, plugin: Stage, state: TokenState, registry: Registry, device: torch.device | str | None,
              *, where: str | None = None) -> TokenState:
    """Run one stage on ``state``, as every stage runs, in a pipeline or inside a model (``llm:`` stages).

    The observer hooks fire around it (``arrcoc_stage_started`` /
    ``arrcoc_stage_finished``), warnings it records and its time (on
    :func:`arrcoc.timing.clock`, which waits for ``device``) go into one
    :class:`StageRecord` appended to the output's ``trace``, errors name the
    stage (``where``, default ``label``), and the output is checked
    (:func:`check_stage_output`).
    """
    where = where or label
    if "query" in plugin.requirements() and state.query is None:
        raise MissingInputError(
            f"{where} ({plugin.name}) needs a query: pass query='...' (with a query_encoder in the "
            f"pipeline) or query=<tensor [B, T, D]>"
        )
    if "query_text" in plugin.requirements() and "query_text" not in state.meta:
        raise MissingInputError(
            f"{where} ({plugin.name}) needs the query as text: pass query='...' (strings), or inside a model "
            "arrcoc.hf.apply(model, pipeline, tokenizer=processor.tokenizer) with the prompt as input_ids"
        )
    hook = registry.hook
    hook.arrcoc_stage_started(stage=label, plugin=plugin, state=state)
    start = clock(device)
    with collect_warnings() as notes, stage_errors(where, plugin.name):
        out = plugin(state)
    ms = (clock(device) - start) * 1e3
    out = check_stage_output(where, plugin.name, state, out)
    record = StageRecord(label, plugin.name, state.token_counts(), out.token_counts(), ms, tuple(notes))
    out = dataclasses.replace(out, trace=(*state.trace, record))
    hook.arrcoc_stage_finished(stage=label, plugin=plugin, state=out, record=record)
    return out


#: Accelerators arrcoc can check for (``torch.<kind>.is_available()`` / ``device_count()``); mps is separate.
_ACCELERATORS = {"cuda": "CUDA", "xpu": "XPU"}


def available_devices() -> list[str]:
    """The devices this machine can run a pipeline on, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    found = ["cpu"]
    for kind in _ACCELERATORS:
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found += [f"{kind}:{i}" for i in range(backend.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: expected e.g. 'cpu', 'cuda', 'cuda:1' or 'auto', got {device!r} ({exc})") from None
    # Checked now, before any model is built: torch would fail later, mid-run, with its own RuntimeError.
    available = available_devices()
    if resolved.type == "cpu":
        return resolved
    if resolved.type not in (*_ACCELERATORS, "mps"):
        raise InputError(
            f"device {str(resolved)!r}: arrcoc runs on cpu, cuda[:N], xpu[:N] or mps; available here: "
            f"{', '.join(available)}"
        )
    name = "mps" if resolved.type == "mps" and resolved.index in (None, 0) else f"{resolved.type}:{resolved.index or 0}"
    if name not in available:
        hint = " (this torch build has no CUDA support)" if resolved.type == "cuda" and torch.version.cuda is None else ""
        raise InputError(f"device {str(resolved)!r} is not available on this machine{hint}; available: {', '.join(available)}")
    return resolved


class Pipeline:
    """encode -> compress* -> score* -> allocate?, with a trace of every stage.

    ``llm`` stages are built (and validated) but run only by a model
    integration such as :mod:`arrcoc.integrations.hf`.
    """

    def __init__(self, spec: PipelineSpec, device: str | torch.device | None = None,
                 registry: Registry | None = None, encoder: Encoder | None = None) -> None:
        """``encoder`` replaces the spec's encoder (a model integration passes the model's own tower)."""
        self.spec = spec
        self.registry = registry or get_registry()
        self.device = _resolve_device(device)
        built: dict[str, Plugin] = {}
        for label, section, stage in spec.stages():
            if label == "encoder" and encoder is not None:
                built[label] = encoder
                continue
            with stage_errors(label, stage.use):
                built[label] = self.registry.create(SECTIONS[section][0], stage.use, **stage.params)
        self.encoder: Encoder = built.pop("encoder").to(self.device)  # type: ignore[assignment]
        self.query_encoder: QueryEncoder | None = built.pop("query_encoder", None)  # type: ignore[assignment]
        self.llm: list[tuple[str, Plugin]] = [(k, v) for k, v in built.items() if k.startswith("llm[")]
        self.stages: list[tuple[str, Stage]] = [(k, v) for k, v in built.items() if not k.startswith("llm[")]  # type: ignore[misc]
        self._check_needs()

    def _check_needs(self) -> None:
        """Every stage's inputs come from the encoder or an earlier stage (checked before any model runs)."""
        available = set(self.encoder.provides)
        wanted: set[str] = set()
        for label, plugin in [*self.stages, *self.llm]:
            for need in sorted(plugin.requirements()):
                if need in ("query", "query_text"):
                    continue  # a query may come as a tensor (or text) at run time; checked then
                if plugin.stage == "llm" and need in LLM_SIGNALS:
                    continue  # computed inside the LLM by a model integration
                if need not in available:
                    hint = self.encoder.how_to_provide(need) if hasattr(self.encoder, "how_to_provide") else ""
                    raise MissingInputError(
                        f"{self.spec.source}: {label} ({plugin.name}) needs {need!r}, which neither the encoder "
                        f"{self.encoder.name!r} nor an earlier stage provides{hint}"
                    )
                if need in self.encoder.provides:
                    wanted.add(need)
            available |= set(plugin.provides)
        self.encoder.configure(frozenset(wanted))

    # --------------------------------------------------------------------- run
    def __call__(self, images: Any, query: str | Sequence[str] | torch.Tensor | None = None) -> TokenState:
        """Run the pipeline on ``images`` (paths, PIL images or pixels [B, 3, H, W] in [0, 1]).

        ``query``: one string (or a list of one) for every image, a list of one string per image, embeddings
        ``[D]``, ``[T, D]``, ``[1, T, D]`` (every image) or ``[B, T, D]``, or None.
        """
        with torch.inference_mode():
            return self._run(images, query)

    def _run(self, images: Any, query: Any) -> TokenState:
        hook = self.registry.hook
        pixels = load_images(images, getattr(self.encoder, "input_size", None)).to(self.device)
        B = pixels.shape[0]

        hook.arrcoc_stage_started(stage="encoder", plugin=self.encoder, state=None)  # no state before the encoder
        start = clock(self.device)
        with collect_warnings() as notes:
            with stage_errors("encoder", self.encoder.name):
                model_input = self.encoder.preprocess(pixels)
                state = self.encoder.encode(model_input)
                tokens_in = getattr(self.encoder, "input_tokens", lambda: None)()
            state = check_stage_output("encoder", self.encoder.name, None, state)
            state = self._attach_query(dataclasses.replace(state, images=pixels), query)
        record = StageRecord(
            "encoder", self.encoder.name, (tokens_in,) * B if tokens_in else state.token_counts(),
            state.token_counts(), (clock(self.device) - start) * 1e3, tuple(notes),
        )
        state = dataclasses.replace(state, trace=(record,))
        hook.arrcoc_stage_finished(stage="encoder", plugin=self.encoder, state=state, record=record)

        return self.run_stages(state, self.stages)

    def run_stages(self, state: TokenState, stages: Sequence[tuple[str, Stage]]) -> TokenState:
        """Run ``(label, stage)`` pairs on ``state``: hooks, warnings and one trace record each."""
        for label, plugin in stages:
            state = run_stage(label, plugin, state, self.registry, self.device)
        return state

    def _attach_query(self, state: TokenState, query: Any) -> TokenState:
        if query is None:
            return state
        B = state.B
        if isinstance(query, np.ndarray) and query.dtype.kind == "f":
            query = torch.from_numpy(query)  # embeddings: the same layouts as a tensor's
        if isinstance(query, (list, tuple)):
            if not query:
                raise InputError("query: got an empty list; pass a string, one string per image, or None")
            for i, item in enumerate(query):
                if not isinstance(item, str):
                    raise InputError(f"query[{i}]: expected a string, got {_describe(item)}")
        if isinstance(query, (str, list, tuple)):
            # One string, or a list of one, asks every image the same question (as a [1, T, D] tensor does).
            texts = [query] * B if isinstance(query, str) else list(query) * (B if len(query) == 1 else 1)
            if len(texts) != B:
                raise InputError(f"query: got a list of {len(texts)} strings for {B} images; pass one string (or a "
                                 f"list of one) for every image, or a list of {B}, one per image")
            for i, text in enumerate(texts):
                if not text.strip():
                    raise InputError(f"query[{i}]: empty query string; pass a question, or query=None")
            if self.query_encoder is None and not self._uses_query():
                record_warning(
                    f"query {texts[0]!r} ignored: no stage of pipeline {self.spec.name!r} uses a query "
                    "(and it has no query_encoder)"
                )
                return state
            state = state.with_meta(query_text=tuple(texts))  # for stages that read the question as text
            if self.query_encoder is None and not self._uses_query(("query",)):
                return state  # the stages read the text only
            if self.query_encoder is None:
                raise MissingInputError(
                    f"{self.spec.source}: query strings need a `query_encoder:` section "
                    f"(e.g. `query_encoder: {{use: toy_text}}`), or pass query=<tensor [B, T, D]>"
                )
            label = f"query_encoder ({self.query_encoder.name})"
            with stage_errors("query_encoder", self.query_encoder.name):
                encoded = self.query_encoder.encode(texts, dim=state.D, device=state.device, dtype=state.dtype)
            emb, mask = _check_encoded_query(label, encoded, B)
            check_query_values(emb, mask, label)
        elif isinstance(query, torch.Tensor):
            emb, mask = check_query_tensor(query, B)
            emb, mask = emb.to(device=state.device, dtype=state.dtype), mask.to(state.device)
        else:
            raise InputError(f"query: expected a string, a list of strings or a tensor, got {_describe(query)}")
        return dataclasses.replace(state, query=emb, query_mask=mask)

    def _uses_query(self, needs: tuple[str, ...] = ("query", "query_text")) -> bool:
        return any(need in plugin.requirements() for _, plugin in [*self.stages, *self.llm] for need in needs)

    def __repr__(self) -> str:
        stages = " -> ".join([self.encoder.name, *(p.name for _, p in self.stages)])
        return f"Pipeline({self.spec.name!r}: {stages}, device={self.device})"


def check_query_tensor(query: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[D]``, ``[T, D]`` or ``[B, T, D]`` embeddings -> ``([B, T, D], mask [B, T])``."""
    if not query.is_floating_point():
        raise InputError(f"query: expected floating embeddings, got dtype {query.dtype}")
    if query.ndim == 1:
        query = query[None, None]
    elif query.ndim == 2:
        query = query[None]
    if query.ndim != 3 or query.shape[0] not in (1, batch) or query.shape[1] == 0:
        raise InputError(f"query: expected embeddings [D], [T, D] or [B={batch}, T, D], got shape {list(query.shape)}")
    if not bool(torch.isfinite(query).all()):
        raise InputError("query: embeddings contain NaN or inf")
    query = query.expand(batch, *query.shape[1:])
    mask = torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
    check_query_values(query, mask, "query")
    return query, mask


def check_query_values(query: torch.Tensor, mask: torch.Tensor, where: str) -> None:
    """Real query tokens must carry a direction: a zero vector matches nothing.

    Query-guided stages compare tokens with the query by cosine, which is 0
    for a zero vector, so an all-zero query would drop the query term without
    a word: that is an error. Some zero tokens among others only dilute the
    query: a warning, recorded in the trace.
    """
    zero = (query == 0).all(-1) & mask
    if not bool(zero.any()):
        return
    empty = (zero.sum(1) == mask.sum(1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(
            f"{where}: the query of images {empty} is all zeros: query-guided stages would ignore it without a "
            "word (a zero vector matches nothing); pass a real query, or query=None"
        )
    tokens = {b: zero[b].nonzero().flatten().tolist() for b in zero.any(1).nonzero().flatten().tolist()}
    record_warning(
        f"{where}: query tokens that are zero vectors match nothing and only dilute the query "
        f"(image: token indices {tokens}); leave them out, or mask them"
    )


def _check_encoded_query(label: str, encoded: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A query encoder returned ``(embeddings [B, T, D] floating, finite; mask [B, T] bool)``."""
    emb, mask = encoded if isinstance(encoded, tuple) and len(encoded) == 2 else (encoded, None)
    if not isinstance(emb, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise StateError(f"{label} returned {_describe(encoded)}, expected (embeddings [B, T, D], mask [B, T])")
    if emb.ndim != 3 or emb.shape[0] != batch or not emb.is_floating_point() or mask.dtype != torch.bool \
            or tuple(mask.shape) != tuple(emb.shape[:2]):
        raise StateError(
            f"{label} returned embeddings of shape {list(emb.shape)} dtype {emb.dtype} and a mask of shape "
            f"{list(mask.shape)} dtype {mask.dtype}; expected floating [B={batch}, T, D] and bool [B, T]"
        )
    if not bool((torch.isfinite(emb).all(-1) | ~mask).all()):
        raise StateError(f"{label} returned NaN or inf embeddings")
    return emb, mask


def _describe(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} of shape {list(value.shape)} dtype {value.dtype}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}: ({', '.join(_describe(v) for v in value)})"
    return type(value).__name__


def load_pipeline(spec: Any, device: str | torch.device | None = None) -> Pipeline:
    """Build a reusable :class:`Pipeline` from a name, path, dict or ``PipelineSpec``.

    ``device`` defaults to CUDA when available (``"auto"``), else CPU.
    """
    return Pipeline(resolve_spec(spec), device=device)


def run_pipeline(spec: Any, images: Any, query: Any = None, device: str | torch.device | None = None) -> TokenState:
    """Build the pipeline and run it once; the returned state's ``trace`` says what each stage did.

    For many calls, build once with :func:`load_pipeline` (models load once).
    """
    return load_pipeline(spec, device=device)(images, query=query)
