"""``Call``: one ``forward`` or ``generate`` of a model inside ``arrcoc.hf.apply``, as one record.

A :class:`~arrcoc.integrations.hf.apply.Run` opens a Call when a call of the
model starts and keeps it until the next one; everything arrcoc does for that
call lands here, in the order it happens:

1. the Run's pre-hooks read the prompt (:attr:`Call.input_ids`, the
   real-token mask :attr:`Call.real`, the image slots);
2. the pre-LLM stages (:mod:`.shorten`) encode the images, compress them and
   shorten the prompt: :attr:`Call.pre_llm`, :attr:`Call.vision_ms`;
3. the in-LLM stages (:mod:`.engine`) change the sequence between decoder
   layers: :attr:`Call.segments`, :attr:`Call.llm_states`, one
   :class:`~arrcoc.state.StageRecord` each in :attr:`Call.llm_records`,
   the tokens each layer saw (:attr:`Call.layer_counts`);
4. the Run's post-hook closes the forward: times, KV bytes; at the end of the
   call :meth:`Report.from_call <arrcoc.integrations.hf.report.Report.from_call>`
   summarises it once.

A model call made in the middle of another (a logits processor's forward
inside ``generate``) gets a Call of its own; the outer one is set aside and
comes back when it ends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from arrcoc.state import StageRecord, TokenState

#: A generate whose first forward (which names the generate's cache) has not run yet.
UNSET = object()


@dataclass
class Segment:
    """The sequence as the decoder layers from ``start`` on see it during prefill.

    ``index`` ``[B, S]``: original sequence position of each entry (0 on
    padding); ``real``: a token (not padding); ``keys``: attendable as a key
    (real and not masked); ``visual``: a visual token; ``cos_sin``,
    ``position_ids`` and ``mask`` are the decoder-layer kwargs for it (``cos_sin`` and ``mask`` per layer type,
    ``{type: value}``, where the types differ).
    """

    start: int
    index: torch.Tensor
    real: torch.Tensor
    keys: torch.Tensor
    visual: torch.Tensor
    cos_sin: Any
    position_ids: torch.Tensor | None
    mask: Any
    hidden: torch.Tensor | None = None  # replacement hidden states at ``start`` (removal only)
    present: torch.Tensor | None = None  # the entry holds an original column (real or the caller's padding)
    position_shift: torch.Tensor | None = None  # [B]: decoding positions at these layers = unpruned - shift


@dataclass
class LayerCount:
    """What one decoder layer saw in prefill: real tokens and visual keys per sample."""

    layer: int
    tokens: list[int]
    visual: list[int]


@dataclass(eq=False)
class Call:
    """One ``generate`` or ``forward`` inside ``apply``: inputs, what each stage did, timings.

    Times are milliseconds on :func:`arrcoc.timing.clock` (which waits for
    the device).  Fields marked *working* hold the prefill's intermediate
    tensors, kept until the next prefill (as the model keeps its cache).
    """

    kind: str = "forward"                       # "generate" or "forward"
    # ---- where the call is (the Run's bookkeeping)
    generating: bool = False                    # inside the model's own generate
    in_forward: bool = False                    # a forward of this call is running
    generate_cache: Any = UNSET                 # the cache the generate decodes in (its forwards carry it)
    # ---- the prompt of the prefill forward, as the LLM gets it
    input_ids: torch.Tensor | None = None       # [B, L] (None for a prompt given as embeddings)
    placeholders: torch.Tensor | None = None    # [B, L] image slots
    blocks: torch.Tensor | None = None          # [B, L] bidirectional blocks (Adapter.attention_blocks), None: causal
    real: torch.Tensor | None = None            # [B, L] real tokens (the attention mask), None: all real
    prefill: bool = False                       # the forward in progress fills an empty cache
    # ---- pre-LLM stages
    pre_llm: TokenState | None = None           # their output (trace: one record per stage)
    vision_ms: float = 0.0                      # the tower, inside the pre-LLM stages
    outside_vision_ms: float = 0.0              # generate's own image encoding before its prefill forward
    # ---- in-LLM stages
    segments: list[Segment] = field(default_factory=list)
    llm_states: dict[str, TokenState] = field(default_factory=dict)   # "llm[i]@layer" -> tokens after it
    llm_records: list[StageRecord] = field(default_factory=list)
    layer_counts_raw: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    carried: TokenState | None = None           # working: the visual tokens' bookkeeping, in sequence order
    input_hidden: torch.Tensor | None = None    # working: the hidden states at the LLM input
    layer_kwargs: dict[str, Any] = field(default_factory=dict)  # working: layer 0's positions and mask
    attention: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # working: recorded rows
    recording: bool = False                     # the attention recorder writes into ``attention``
    decode_masks: dict[int, Any] = field(default_factory=dict)    # this decoding step's mask per segment
    decode_positions: dict[int, Any] = field(default_factory=dict)  # (position ids, rotary) per shifted segment
    decode_attention_mask: torch.Tensor | None = None
    filled: Any = None                          # a weak reference to the cache the prefill filled, if any
    # ---- times and sizes
    forward_start: float = 0.0
    llm_start: float = 0.0
    prefill_ms: float = 0.0                     # the prefill forward (tower inside it included)
    llm_prefill_ms: float = 0.0                 # the language model alone in prefill
    decode_ms: float = 0.0
    decode_steps: int = 0
    forwards: int = 0                           # forwards finished (a generate: one per new token)
    kv_bytes: int = 0
    _layers: list[LayerCount] | None = field(default=None, repr=False)

    @property
    def layer_counts(self) -> list[LayerCount]:
        """What each decoder layer saw in prefill (read back to the host once, not at every layer)."""
        if self._layers is None or len(self._layers) != len(self.layer_counts_raw):
            raw = self.layer_counts_raw
            rows = torch.stack([torch.stack([t, v]) for _, t, v in raw]).tolist() if raw else []
            self._layers = [LayerCount(layer, tokens, visual) for (layer, _, _), (tokens, visual) in zip(raw, rows)]
        return self._layers

    @property
    def trace(self) -> tuple[StageRecord, ...]:
        """Every stage that ran in this call, in the order it ran: the pre-LLM stages, then each in-LLM stage
        at each decoder layer it acts at (``"llm[i]@layer"``)."""
        pre = tuple(self.pre_llm.trace) if self.pre_llm is not None else ()
        return pre + tuple(self.llm_records)

    @property
    def state(self) -> TokenState | None:
        """The pre-LLM stages' output (None without them), with :attr:`trace` as its ``trace``: every stage of
        the call in order, the in-LLM ones included (their tokens: :attr:`llm_states`)."""
        if self.pre_llm is None or not self.llm_records:
            return self.pre_llm
        return dataclasses.replace(self.pre_llm, trace=self.trace)

    def continues(self, cache: Any) -> bool:
        """Whether a forward decoding in ``cache`` goes on from this call (its prefill filled that cache): a
        decoding loop written by hand (or a generate bound before ``apply``) is one call, as ``generate`` is."""
        return cache is not None and self.filled is not None and self.filled() is cache

    def begin_prefill(self) -> None:
        """A prefill forward starts: what an earlier prefill of this call left is dropped."""
        self.segments, self.llm_states, self.llm_records = [], {}, []
        self.layer_counts_raw, self._layers = [], None
        self.carried, self.input_hidden, self.layer_kwargs = None, None, {}
        self.attention = {}
