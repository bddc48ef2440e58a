"""``TokenState``: the one record that flows through every stage.

A batch is ragged: images keep different numbers of tokens, so every
per-token field is padded to the longest row and ``mask`` says which entries
are real.  Operations in :mod:`arrcoc.ops` keep the real tokens of each row
as a prefix (padding at the end), so ``mask[b] == arange(N) < counts[b]``.

The record is immutable; a stage returns ``dataclasses.replace(state, ...)``
or, for anything that moves tokens, the result of an :mod:`arrcoc.ops` call,
which keeps ``size``, ``positions``, ``origin`` and every ``per_token`` field
aligned with ``tokens``.

What is checked where (reading a tensor's values costs a device sync, and
every op builds a new state, so values are read only at the entry points):

* every construction (``TokenState(...)``, ``dataclasses.replace``, each op):
  types, shapes, dtypes, devices and the grid; no value is read;
* :meth:`TokenState.from_patches` (once per encoded batch): the tokens and
  class token are finite;
* :meth:`TokenState.replace` handed ``mask``, ``size`` or ``origin``: those
  bookkeeping invariants (what :meth:`TokenState.check` checks of them).
  Ops never pass them through ``replace``: they keep them consistent by
  construction, so no op pays for it;
* :meth:`TokenState.check` (the pipeline runs it on every stage's output):
  everything, including finite real tokens and class token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .errors import InputError, MissingInputError, NonFiniteStateError, StateError


@dataclass(frozen=True)
class StageRecord:
    """What one stage did: token counts per image (class token included) and time."""

    stage: str
    plugin: str
    tokens_in: tuple[int, ...]
    tokens_out: tuple[int, ...]
    ms: float
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class LLMContext:
    """Where an in-LLM (``llm:``) stage runs and what the model integration measured for it.

    A model integration (:mod:`arrcoc.integrations.hf`) hands each ``llm:``
    stage a :class:`TokenState` whose ``llm`` field is one of these; a stage
    outside an LLM sees ``state.llm is None``.  ``B`` images (prompts), ``N``
    visual tokens at this layer, ``N0`` visual tokens at the LLM input, ``T``
    text tokens after the image, ``L`` sequence length at this layer.

    Attributes:
        layer: the decoder layer the stage acts at (its input), 1 ..
            ``num_layers - 1``; signals come from layer ``layer - 1``.
        num_layers: decoder layers of the LLM.
        input_visual_counts: ``[B]`` int64, visual tokens at the LLM input
            (before any in-LLM stage).
        text_mask: ``[B, T]`` bool, the text tokens after the image that
            ``per_token["attn_from_text"]``, ``state.query`` and the ``text_*``
            fields are over (set when the stage needs ``attn_from_text``,
            ``key_norms`` or ``normed_hidden``).
        input_visual: ``[B, N0, D]`` hidden states of every visual token at
            the LLM input (before any pruning), with ``input_visual_mask``
            ``[B, N0]`` (set with ``attn_from_text``).
        attn_logits: ``[B, heads, L, L]`` masked pre-softmax attention logits
            of the whole sequence at layer ``layer - 1``, with
            ``visual_columns`` ``[B, N]`` (the sequence index of each visual
            token) and ``sequence_mask`` ``[B, L]`` (attendable keys) (set when
            the stage needs ``attn_logits``).
        visual_positions: ``[B, N]`` int64, each visual token's index in its
            prompt as the LLM got it, padding not counted (0 = the prompt's
            first token; 0 on padded slots).  Always set.
        text_positions: ``[B, T]`` int64, the same for the text tokens after
            the image (set with ``key_norms`` or ``normed_hidden``, with
            ``text_mask``).
        text_key_norms: ``[B, T]`` float32, the L1 norm of layer
            ``layer - 1``'s post-rotary keys (heads concatenated) of the text
            after the image (set with ``key_norms``).
        text_normed_hidden: ``[B, T, D]`` the text after the image at this
            layer's input through the LLM's final norm (set with
            ``normed_hidden``).
    """

    layer: int
    num_layers: int
    input_visual_counts: torch.Tensor
    text_mask: torch.Tensor | None = None
    input_visual: torch.Tensor | None = None
    input_visual_mask: torch.Tensor | None = None
    attn_logits: torch.Tensor | None = None
    visual_columns: torch.Tensor | None = None
    sequence_mask: torch.Tensor | None = None
    visual_positions: torch.Tensor | None = None
    text_positions: torch.Tensor | None = None
    text_key_norms: torch.Tensor | None = None
    text_normed_hidden: torch.Tensor | None = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def image(self, b: int, n: int) -> "LLMContext":
        """Prompt ``b`` alone (``n``: its real visual tokens, for ``visual_columns``)."""
        rows = {k: v[b : b + 1] for k, v in self._tensors().items()}
        for name in ("visual_columns", "visual_positions"):  # [B, N]: this prompt's n visual tokens
            if name in rows:
                rows[name] = rows[name][:, :n]
        return dataclasses.replace(self, **rows)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LLMContext":
        """Every tensor on ``device``; ``dtype`` applies to the hidden states (``input_visual``,
        ``text_normed_hidden``), as to tokens."""
        moved = {k: v.to(device=device, dtype=dtype if k in _HIDDEN_FIELDS and dtype is not None else None)
                 for k, v in self._tensors().items()}
        return dataclasses.replace(self, **moved)

    def require(self, name: str, where: str) -> torch.Tensor:
        """The field ``name``, or a :class:`MissingInputError` saying which signal provides it."""
        value = getattr(self, name)
        if value is None:
            signal = _SIGNAL_OF_FIELD.get(name, "attn_from_text")
            raise MissingInputError(
                f"{where}: state.llm.{name} is missing; the model integration sets it for a stage that needs "
                f"{signal!r}"
            )
        return value


#: LLMContext fields holding hidden states (they follow a dtype change, as tokens do).
_HIDDEN_FIELDS = ("input_visual", "text_normed_hidden")
#: The signal (``needs``) that makes the model integration set an LLMContext field (``attn_from_text`` otherwise).
_SIGNAL_OF_FIELD = {"attn_logits": "attn_logits", "visual_columns": "attn_logits", "sequence_mask": "attn_logits",
                    "text_key_norms": "key_norms", "text_normed_hidden": "normed_hidden",
                    "text_positions": "key_norms' or 'normed_hidden"}


#: ``meta`` entries holding one value per row (the pipeline's question strings): cut with the row.
_PER_ROW_META = ("query_text",)


def _meta_of_row(meta: Mapping[str, Any], b: int, B: int) -> Mapping[str, Any]:
    """``meta`` of row ``b`` alone: a per-row entry of ``B`` values becomes the row's own (a batch of one)."""
    rows = {k: (meta[k][b],) for k in _PER_ROW_META if isinstance(meta.get(k), (tuple, list)) and len(meta[k]) == B}
    return {**meta, **rows} if rows else meta


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, eq=False)
class TokenState:
    """Batched visual tokens plus everything needed to keep track of them.

    Shapes: ``B`` images, ``N`` token slots (padded), ``D`` channels, ``N0 =
    H0 * W0`` original patches.

    Attributes:
        tokens: ``[B, N, D]`` floating visual tokens.
        mask: ``[B, N]`` bool, True for real tokens (a prefix of each row).
        size: ``[B, N]`` float32, how many original patches each token stands for.
        positions: ``[B, N, 2]`` float32, size-weighted (row, col) centroid on
            the original patch grid.
        origin: ``[B, N0]`` int64, index of the token each original patch now
            lives in, ``-1`` if it was dropped.
        grid: ``(H0, W0)``, the original patch grid.
        cls: ``[B, D]`` class token kept apart (never merged or dropped), or None.
        per_token: name -> ``[B, N, ...]`` tensors kept aligned by every op.
        query: ``[B, T, Dq]`` encoded query, or None; ``query_mask`` ``[B, T]``.
        images: ``[B, 3, H, W]`` pixels in [0, 1] the tokens came from, or None
            (used by visualisers and image pyramids).
        pyramid, allocation: set by an allocator stage.
        meta: free-form per-batch outputs of stages that are not per token.
        llm: where an in-LLM stage runs and the model's signals for it
            (:class:`LLMContext`), or None outside an LLM.
        trace: one :class:`StageRecord` per stage run so far.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    size: torch.Tensor
    positions: torch.Tensor
    origin: torch.Tensor
    grid: tuple[int, int]
    cls: torch.Tensor | None = None
    per_token: Mapping[str, torch.Tensor] = field(default_factory=dict)
    query: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    images: torch.Tensor | None = None
    pyramid: Any = None
    allocation: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    trace: tuple[StageRecord, ...] = ()
    llm: LLMContext | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_token", _frozen(self.per_token))
        object.__setattr__(self, "meta", _frozen(self.meta))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "trace", tuple(self.trace))
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        t = self.tokens
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point():
            raise StateError(
                f"TokenState.tokens: expected a floating tensor [B, N, D], got {_describe(t)}"
            )
        B, N, D = t.shape
        device = t.device

        def check(name: str, value: Any, shape: tuple, dtype: torch.dtype | str) -> None:
            if not isinstance(value, torch.Tensor):
                raise StateError(f"TokenState.{name}: expected a tensor {list(shape)}, got {type(value).__name__}")
            ok_dtype = value.is_floating_point() if dtype == "float" else value.dtype == dtype
            if tuple(value.shape) != shape or not ok_dtype:
                raise StateError(
                    f"TokenState.{name}: expected shape {list(shape)} dtype {dtype}, "
                    f"got shape {list(value.shape)} dtype {value.dtype}"
                )
            if value.device != device:
                raise StateError(f"TokenState.{name}: on {value.device}, but tokens are on {device}")

        check("mask", self.mask, (B, N), torch.bool)
        check("size", self.size, (B, N), torch.float32)
        check("positions", self.positions, (B, N, 2), torch.float32)
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise StateError(f"TokenState.grid: expected (H0, W0) >= 1, got {self.grid}")
        check("origin", self.origin, (B, self.grid[0] * self.grid[1]), torch.int64)
        if self.cls is not None:
            check("cls", self.cls, (B, D), t.dtype)
        for name, value in self.per_token.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != (B, N):
                raise StateError(
                    f"TokenState.per_token[{name!r}]: expected a tensor [B={B}, N={N}, ...], "
                    f"got {_describe(value)}"
                )
            if value.device != device:
                raise StateError(f"TokenState.per_token[{name!r}]: on {value.device}, tokens on {device}")
        if self.query is not None:
            q = self.query
            if q.ndim != 3 or q.shape[0] != B or not q.is_floating_point():
                raise StateError(f"TokenState.query: expected a floating tensor [B={B}, T, Dq], got {_describe(q)}")
            check("query_mask", self.query_mask, tuple(q.shape[:2]), torch.bool)
            if q.device != device:
                raise StateError(f"TokenState.query: on {q.device}, tokens on {device}")
        elif self.query_mask is not None:
            raise StateError("TokenState.query_mask is set but query is None")
        if self.llm is not None and not isinstance(self.llm, LLMContext):
            raise StateError(f"TokenState.llm: expected an LLMContext or None, got {type(self.llm).__name__}")
        if self.images is not None:
            im = self.images
            if im.ndim != 4 or im.shape[0] != B or im.shape[1] != 3:
                raise StateError(f"TokenState.images: expected [B={B}, 3, H, W], got {_describe(im)}")

    def check(self) -> "TokenState":
        """Deep check of values (costs a device sync; the pipeline runs it on every stage's output).

        Real tokens form a prefix of each row, sizes are positive, ``origin``
        points at real tokens, and the real tokens and the class token are
        finite (a :class:`NonFiniteStateError` naming the images otherwise).
        """
        self._check_bookkeeping()
        self._check_finite("TokenState")
        return self

    def _check_finite(self, where: str) -> None:
        """Real tokens and the class token hold no NaN or inf (one sync)."""
        bad_rows = ~(_finite_rows(self.tokens) | ~self.mask)  # padded slots may hold anything
        bad_cls = self.cls is not None and not bool(_finite_rows(self.cls).all())
        if bad_cls or bool(bad_rows.any()):
            images = bad_rows.any(1).nonzero().flatten().tolist()
            what = f"real tokens of images {images}" if images else "the class token"
            if images and bad_cls:
                what += " and the class token"
            raise NonFiniteStateError(f"{where}: NaN or inf in {what}; tokens must be finite", images)

    def _check_bookkeeping(self) -> None:
        """``mask`` is a prefix mask, real sizes are positive, ``origin`` points at real tokens (one sync)."""
        counts = self.counts
        prefix = torch.arange(self.N, device=self.tokens.device)[None, :] < counts[:, None]
        if not torch.equal(prefix, self.mask):
            raise StateError("TokenState.mask: real tokens must form a prefix of each row")
        real = self.size[self.mask]
        if not (torch.isfinite(real) & (real > 0)).all():  # (NaN > 0 is False: NaN is refused too)
            raise StateError("TokenState.size: every real token must stand for > 0 patches (a finite number)")
        o = self.origin
        if ((o < -1) | (o >= self.N)).any():
            raise StateError(f"TokenState.origin: values must lie in [-1, {self.N}), got [{int(o.min())}, {int(o.max())}]")
        hits = o.clamp(min=0)
        if self.N > 0 and not self.mask.gather(1, hits)[o >= 0].all():  # N == 0: every origin is -1 (checked above)
            raise StateError("TokenState.origin: a patch points at a padded token slot")

    # -------------------------------------------------------------- properties
    @property
    def B(self) -> int:
        return self.tokens.shape[0]

    @property
    def N(self) -> int:
        return self.tokens.shape[1]

    @property
    def D(self) -> int:
        return self.tokens.shape[2]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` int64: real tokens per image (class token not included)."""
        return self.mask.sum(1)

    def token_counts(self) -> tuple[int, ...]:
        """Tokens per image as the trace reports them: real tokens + class token."""
        extra = 0 if self.cls is None else 1
        return tuple(int(c) + extra for c in self.counts.tolist())

    def require_query(self, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query, query_mask)`` for a stage that compares tokens with the query.

        Raises a clear error when there is no query, when its width differs
        from the tokens' (a cosine needs one space), or when an image has no
        real query token.
        """
        if self.query is None or self.query_mask is None:
            raise MissingInputError(
                f"{where}: needs a query (the state has no query): pass query='...' with a `query_encoder:` "
                "section (e.g. `query_encoder: {use: toy_text}`), or query=<tensor [B, T, D]>"
            )
        if self.query.shape[-1] != self.D:
            raise InputError(
                f"{where}: the query width {self.query.shape[-1]} differs from the visual token width {self.D}; "
                "encode the query into the tokens' space (toy_text matches it by default)"
            )
        empty = ~self.query_mask.any(1)
        if bool(empty.any()):
            raise InputError(f"{where}: images {empty.nonzero().flatten().tolist()} have no real query token")
        return self.query, self.query_mask

    def image(self, b: int) -> "TokenState":
        """Image ``b`` alone: a batch of one, trimmed to its real tokens.

        Handy to check that a stage treats a ragged batch like separate runs.
        ``llm`` (an in-LLM stage's context) is cut to prompt ``b`` too, and so is
        ``meta["query_text"]`` (one question string per row); ``pyramid``,
        ``allocation``, the rest of ``meta`` and ``trace`` are kept as they are.
        """
        if not -self.B <= b < self.B:
            raise StateError(f"TokenState.image: index {b} out of range for a batch of {self.B}")
        b = b % self.B
        n = int(self.counts[b])

        def one(x: torch.Tensor | None, tokens_axis: bool = True) -> torch.Tensor | None:
            if x is None:
                return None
            return x[b : b + 1, :n] if tokens_axis else x[b : b + 1]

        return dataclasses.replace(
            self,
            tokens=one(self.tokens),
            mask=one(self.mask),
            size=one(self.size),
            positions=one(self.positions),
            origin=one(self.origin, False),
            cls=one(self.cls, False),
            per_token={k: one(v) for k, v in self.per_token.items()},
            query=one(self.query, False),
            query_mask=one(self.query_mask, False),
            images=one(self.images, False),
            llm=None if self.llm is None else self.llm.image(b, n),
            meta=_meta_of_row(self.meta, b, self.B),
        )

    def replace(self, **changes: Any) -> "TokenState":
        """``dataclasses.replace`` (validated). Use :mod:`arrcoc.ops` to move tokens.

        Shapes, dtypes and devices are checked as at any construction; a
        hand-made ``mask``, ``size`` or ``origin`` is also checked by value
        (a prefix mask, positive sizes, ``origin`` in range and on real
        tokens), which costs one device sync. ``tokens`` are not read here
        (encoders replace them once per block): :meth:`check` finds NaN.
        """
        out = dataclasses.replace(self, **changes)
        if not changes.keys().isdisjoint(("mask", "size", "origin")):
            out._check_bookkeeping()
        return out

    def _derive(self, **parts: Any) -> "TokenState":
        """A copy with ``parts`` replaced, **not validated**: only for :mod:`arrcoc.ops`, which builds every part
        from this (validated) state's own fields with the shapes, dtypes and device a construction checks
        (``tokens``, ``mask``, ``size``, ``positions``, ``origin``, ``per_token``).  ``dataclasses.replace`` runs
        ``__post_init__`` and ``_validate`` (~14 us on a CPU, as much as the gathers of a small keep); every public
        construction still does."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        if "per_token" in parts:
            parts["per_token"] = _frozen(parts["per_token"])
        out.__dict__.update(parts)
        return out

    def with_per_token(self, **fields: torch.Tensor) -> "TokenState":
        """A copy with ``per_token`` fields added or replaced."""
        return dataclasses.replace(self, per_token={**self.per_token, **fields})

    def with_meta(self, **items: Any) -> "TokenState":
        return dataclasses.replace(self, meta={**self.meta, **items})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TokenState":
        """Move every tensor; ``dtype`` applies to the floating token-valued fields."""
        def move(x: Any, floating: bool = False) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            return x.to(device=device, dtype=dtype if (floating and dtype is not None) else None)

        return dataclasses.replace(
            self,
            tokens=move(self.tokens, True),
            mask=move(self.mask),
            size=move(self.size),
            positions=move(self.positions),
            origin=move(self.origin),
            cls=move(self.cls, True),
            per_token={k: move(v) for k, v in self.per_token.items()},
            query=move(self.query, True),
            query_mask=move(self.query_mask),
            images=move(self.images),
            llm=None if self.llm is None else self.llm.to(device, dtype),
        )

    # ------------------------------------------------------------ construction
    @classmethod
    def from_patches(
        cls,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        *,
        cls_token: torch.Tensor | None = None,
        per_token: Mapping[str, torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
    ) -> "TokenState":
        """The state of a freshly encoded image: one token per patch in raster order."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
            raise StateError(f"from_patches: expected tokens [B, N0, D], got {_describe(tokens)}")
        H0, W0 = int(grid[0]), int(grid[1])
        B, N0, _ = tokens.shape
        if N0 != H0 * W0:
            raise StateError(f"from_patches: {N0} tokens do not fill a {H0}x{W0} grid ({H0 * W0} patches)")
        device = tokens.device
        index = torch.arange(N0, device=device)
        rows = torch.div(index, W0, rounding_mode="floor")
        positions = torch.stack([rows, index - rows * W0], -1).to(torch.float32)
        state = cls(
            tokens=tokens,
            mask=torch.ones(B, N0, dtype=torch.bool, device=device),
            size=torch.ones(B, N0, dtype=torch.float32, device=device),
            positions=positions.expand(B, N0, 2).contiguous(),
            origin=index.expand(B, N0).contiguous(),
            grid=(H0, W0),
            cls=cls_token,
            per_token=per_token or {},
            images=images,
        )
        # No value check here, as in every constructor: a Pipeline checks its encoder's output (check_stage_output),
        # and inside a model (arrcoc.hf, arrcoc.vllm) a tower or LLM that overflows must compute as without arrcoc.
        return state


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``isfinite(x).all(-1)`` in two reductions that allocate no tensor of ``x``'s size (20x faster on a CPU
    for [8, 576, 1024]): ``amax`` and ``amin`` propagate NaN, and an inf is the row's max or its min."""
    if x.shape[-1] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.amax(-1)) & torch.isfinite(x.amin(-1))


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} dtype {x.dtype} on {x.device}"
    return type(x).__name__
