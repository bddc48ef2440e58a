"""``Pipeline``: built once from a spec (models loaded once), run many times."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import torch

from .errors import InputError, MissingInputError, StateError, collect_warnings, record_warning
from .images import load_images
from .plugin import LLM_SIGNALS, Encoder, Plugin, QueryEncoder, Stage
from .registry import Registry, get_registry
from .spec import SECTIONS, PipelineSpec, resolve_spec
from .state import StageRecord, TokenState

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
                if need == "query":
                    continue  # a query may come as a tensor at run time; checked then
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
        """Run the pipeline on ``images`` (paths, PIL images or pixels [B, 3, H, W] in [0, 1])."""
        with torch.inference_mode():
            return self._run(images, query)

    def _run(self, images: Any, query: Any) -> TokenState:
        hook = self.registry.hook
        pixels = load_images(images, getattr(self.encoder, "input_size", None)).to(self.device)
        B = pixels.shape[0]

        hook.arrcoc_stage_started(stage="encoder", plugin=self.encoder, state=None)  # no state before the encoder
        start = self._clock()
        with collect_warnings() as notes:
            model_input = self.encoder.preprocess(pixels)
            state = self.encoder.encode(model_input)
            tokens_in = getattr(self.encoder, "input_tokens", lambda: None)()
            state = dataclasses.replace(state, images=pixels)
            state = self._attach_query(state, query)
        record = StageRecord(
            "encoder", self.encoder.name, (tokens_in,) * B if tokens_in else state.token_counts(),
            state.token_counts(), (self._clock() - start) * 1e3, tuple(notes),
        )
        state = dataclasses.replace(state, trace=(record,))
        hook.arrcoc_stage_finished(stage="encoder", plugin=self.encoder, state=state, record=record)

        return self.run_stages(state, self.stages)

    def run_stages(self, state: TokenState, stages: Sequence[tuple[str, Stage]]) -> TokenState:
        """Run ``(label, stage)`` pairs on ``state``: hooks, warnings and one trace record each."""
        hook = self.registry.hook
        for label, plugin in stages:
            if "query" in plugin.requirements() and state.query is None:
                raise MissingInputError(
                    f"{label} ({plugin.name}) needs a query: pass query='...' (with a query_encoder in the "
                    f"pipeline) or query=<tensor [B, T, D]>"
                )
            hook.arrcoc_stage_started(stage=label, plugin=plugin, state=state)
            start = self._clock()
            with collect_warnings() as notes:
                out = plugin(state)
            if not isinstance(out, TokenState):
                raise StateError(f"{label} ({plugin.name}) returned {type(out).__name__}, expected a TokenState")
            record = StageRecord(label, plugin.name, state.token_counts(), out.token_counts(),
                                 (self._clock() - start) * 1e3, tuple(notes))
            state = dataclasses.replace(out, trace=(*state.trace, record))
            hook.arrcoc_stage_finished(stage=label, plugin=plugin, state=state, record=record)
        return state

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _attach_query(self, state: TokenState, query: Any) -> TokenState:
        if query is None:
            return state
        B = state.B
        if isinstance(query, str) or (isinstance(query, Sequence) and query and all(isinstance(q, str) for q in query)):
            texts = [query] * B if isinstance(query, str) else list(query)
            if len(texts) != B:
                raise InputError(f"query: got {len(texts)} strings for {B} images; pass one, or one per image")
            for i, text in enumerate(texts):
                if not text.strip():
                    raise InputError(f"query[{i}]: empty query string; pass a question, or query=None")
            if self.query_encoder is None and not self._uses_query():
                record_warning(
                    f"query {texts[0]!r} ignored: no stage of pipeline {self.spec.name!r} uses a query "
                    "(and it has no query_encoder)"
                )
                return state
            if self.query_encoder is None:
                raise MissingInputError(
                    f"{self.spec.source}: query strings need a `query_encoder:` section "
                    f"(e.g. `query_encoder: {{use: toy_text}}`), or pass query=<tensor [B, T, D]>"
                )
            emb, mask = self.query_encoder.encode(texts, dim=state.D, device=state.device, dtype=state.dtype)
        elif isinstance(query, torch.Tensor):
            emb, mask = check_query_tensor(query, B)
            emb, mask = emb.to(device=state.device, dtype=state.dtype), mask.to(state.device)
        else:
            raise InputError(f"query: expected a string, a list of strings or a tensor, got {type(query).__name__}")
        return dataclasses.replace(state, query=emb, query_mask=mask)

    def _uses_query(self) -> bool:
        return any("query" in plugin.requirements() for _, plugin in [*self.stages, *self.llm])

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
    return query, torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)


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
