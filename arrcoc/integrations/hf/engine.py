"""In-LLM pruning: ``llm:`` stages between the decoder layers of an unmodified model.

Forward pre-hooks (``with_kwargs=True``) on the top model and on every
decoder layer; nothing in ``transformers`` is forked.

Prefill.  The top model's pre-hook reads ``input_ids`` / ``attention_mask``
and finds the image positions.  A stage acting at layer ``a`` gets its
signals from layer ``a - 1``'s attention (:mod:`.attention` records only the
rows it needs).  The pre-hook of layer ``a`` builds the stage's
:class:`~arrcoc.state.TokenState` of visual hidden states, runs the stage,
and either **removes** the dropped tokens (gathers hidden states, rotary
``(cos, sin)``, position ids; left-pads ragged rows so the last token stays
last; builds the 4-D mask with ``create_causal_mask(layer_idx=a)``) or
**masks** them as keys.  Later layers get the same replaced kwargs, so every
layer keeps running its own attention kernel, and the KV cache of layers
``>= a`` holds only what they saw.

Decode.  Layers ``>= a`` get a mask built from their segment's prefill key
mask plus the new columns; positions continue from the unpruned length
(``generate`` numbers new tokens from ``attention_mask``), which is FastV's
rule and what SparseVLM v1.0 does after its compact prefill numbering.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from arrcoc import ops
from arrcoc.errors import InputError, ModelError, StateError
from arrcoc.pipeline import check_stage_output, stage_errors
from arrcoc.plugin import LLMCompressor
from arrcoc.state import LLMContext, TokenState
from arrcoc.timing import clock

from . import compat
from .adapter import Adapter
from .attention import Recorder, attach, detach
from .prompt import pack_end, padding_mask, placeholder_mask

#: per_token field numbering the visual tokens handed to a stage.
SLOT = "llm_slot"
_SIGNAL_ROWS = {"attn_from_last": "last", "attn_from_text": "text", "attn_logits": "logits"}
#: The attribute a KV cache filled by a prefill with llm: stages carries: that prefill's segments (its masks).
SEGMENTS = "_arrcoc_segments"


@dataclass
class Segment:
    """The sequence as the layers from ``start`` on see it during prefill.

    ``index`` ``[B, S]``: original sequence position of each entry (0 on
    padding); ``real``: a token (not padding); ``keys``: attendable as a key
    (real and not masked); ``visual``: a visual token; ``cos_sin``,
    ``position_ids`` and ``mask`` are the decoder-layer kwargs for it.
    """

    start: int
    index: torch.Tensor
    real: torch.Tensor
    keys: torch.Tensor
    visual: torch.Tensor
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None
    position_ids: torch.Tensor | None
    mask: Any
    hidden: torch.Tensor | None = None  # replacement hidden states at ``start`` (removal only)
    present: torch.Tensor | None = None  # the entry holds an original column (real or the caller's padding)


@dataclass
class LayerRecord:
    """What one decoder layer saw in prefill: real tokens and visual keys per sample."""

    layer: int
    tokens: list[int]
    visual: list[int]


@dataclass
class ForwardTrace:
    """Bookkeeping of one ``generate`` / forward call (reset at each prefill).

    The prefill records each layer's counts as tensors (``counts``: ``(layer, tokens [B], visual [B])``); they
    are read back to the host once, when :attr:`layers` is first read, not at every layer.
    """

    counts: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    states: dict[str, TokenState] = field(default_factory=dict)  # "label@layer" -> visual tokens after the stage
    stage_ms: dict[str, float] = field(default_factory=dict)
    kv_bytes: int = 0
    llm_prefill_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0
    _layers: list[LayerRecord] | None = field(default=None, repr=False)

    @property
    def layers(self) -> list[LayerRecord]:
        """What each decoder layer saw in prefill (one host sync for all layers)."""
        if self._layers is None or len(self._layers) != len(self.counts):
            rows = torch.stack([torch.stack([t, v]) for _, t, v in self.counts]).tolist() if self.counts else []
            self._layers = [LayerRecord(layer, tokens, visual)
                            for (layer, _, _), (tokens, visual) in zip(self.counts, rows)]
        return self._layers


class LLMEngine:
    """Runs ``llm:`` stages inside one model; :meth:`install` / :meth:`remove` its hooks."""

    def __init__(self, adapter: Adapter, stages: list[tuple[str, LLMCompressor]]) -> None:
        self.adapter = adapter
        self.layers = adapter.decoder_layers
        self.num_layers = len(self.layers)
        self.plan: dict[int, list[tuple[str, LLMCompressor]]] = {}
        requests: dict[int, set[str]] = {}
        for label, stage in stages:
            layers = stage.llm_layers(self.num_layers)
            if not layers:
                raise ModelError(
                    f"{label} ({stage.name}): acts at no decoder layer of this {self.num_layers}-layer LLM with "
                    f"{stage.params!r}; set its layers for this depth"
                )
            if not stage.removes and stage.position_rule != "original":
                raise ModelError(
                    f"{label} ({stage.name}): positions {stage.position_rule!r} renumbers tokens that leave the "
                    "sequence; with mode 'mask' nothing leaves: use positions: original, or mode: remove"
                )
            for layer in layers:
                if not 1 <= layer < self.num_layers:
                    raise ModelError(
                        f"{label} ({stage.name}): acts at decoder layer {layer}, but the LLM has "
                        f"{self.num_layers} layers (valid: 1..{self.num_layers - 1}; layer 0 has no earlier "
                        "attention to score with)"
                    )
                self.plan.setdefault(layer, []).append((label, stage))
                signals = {_SIGNAL_ROWS[s] for s in stage.requirements() if s in _SIGNAL_ROWS}
                requests.setdefault(layer - 1, set()).update(signals)
        other = sorted(set(getattr(adapter.text_config, "layer_types", None) or ()) - set(_MASK_TYPES))
        if self.plan and other:
            raise ModelError(
                f"arrcoc.hf: llm: stages rebuild each decoder layer's attention mask; this model has layers of "
                f"attention type {other}, whose masks arrcoc cannot build (supported: {list(_MASK_TYPES)}); use "
                "pre-LLM stages only"
            )
        self.recorder = Recorder(requests=requests, text_rows=self._text_rows)
        self.handles: list[Any] = []
        self.visual_state: TokenState | None = None  # the pre-LLM state of this batch's images, if any
        self.trace = ForwardTrace()
        self._segments: list[Segment] = []
        # Each cache's own prefill segments: a conversation continued from one cache after another generate
        # (other prompts, same Run) decodes with the masks of the prompt that cache holds, not the last prefill's.
        # Kept ON the cache (the attribute SEGMENTS), so a copy.deepcopy of it (transformers' way of reusing a
        # prompt's cache) has them too; a cache that takes no attribute is looked up here instead.
        self._segments_of: "weakref.WeakKeyDictionary[Any, list[Segment]]" = weakref.WeakKeyDictionary()
        self._prefill = False
        self._decode_masks: dict[int, Any] = {}
        self._layer_kwargs: dict[str, Any] = {}
        self._top_start = 0.0
        self._llm_start = 0.0
        self._text_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._input_hidden: torch.Tensor | None = None
        self._carried: TokenState | None = None  # the visual tokens' bookkeeping, in sequence order
        self._placeholders: torch.Tensor | None = None  # the prefill prompt's image slots [B, L]
        self._real: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.plan)

    # ------------------------------------------------------ one call's state
    #: What belongs to the call in progress (a generate, or a forward on its own): the prefill's bookkeeping and
    #: trace, the current decoding step's masks, the pre-LLM state of its images.  A model call made in the middle
    #: of another in the same thread (a logits processor's forward inside generate) gets a fresh one and gives the
    #: outer call's back when it ends (:meth:`begin_nested_call` / :meth:`end_nested_call`).
    _CALL_STATE = ("visual_state", "trace", "_segments", "_prefill", "_decode_masks", "_decode_attention_mask",
                   "_layer_kwargs", "_top_start", "_llm_start", "_input_hidden", "_carried", "_placeholders", "_real")

    def begin_nested_call(self) -> dict[str, Any]:
        """Set the state of the call in progress aside (returned) and start a fresh one."""
        saved = {name: getattr(self, name, None) for name in self._CALL_STATE}
        saved["recorder"] = (self.recorder.results, self.recorder.active)
        self.visual_state, self.trace, self._segments, self._prefill = None, ForwardTrace(), [], False
        self._decode_masks, self._decode_attention_mask, self._layer_kwargs = {}, None, {}
        self._top_start = self._llm_start = 0.0
        self._input_hidden = self._carried = self._placeholders = self._real = None
        self.recorder.results, self.recorder.active = {}, False
        return saved

    def end_nested_call(self, saved: dict[str, Any]) -> None:
        """Give the call set aside by :meth:`begin_nested_call` its state back."""
        self.recorder.results, self.recorder.active = saved["recorder"]
        for name in self._CALL_STATE:
            setattr(self, name, saved[name])

    # ----------------------------------------------------------- hooks
    def install(self) -> None:
        model = self.adapter.model
        self.handles.append(model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._top_post, with_kwargs=True))
        lm = self.adapter.language_model
        self.handles.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(lm.register_forward_hook(self._lm_post))
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._make_layer_pre(i), with_kwargs=True))
        attach(self.recorder, [self.adapter.attention_module(layer) for layer in self.layers])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        detach([self.adapter.attention_module(layer) for layer in self.layers])

    # ---------------------------------------------------------- top level
    def _top_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = compat.cache_of(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._top_start = clock(ids)
        past = 0 if cache is None else cache.get_seq_length()
        self._prefill = past == 0
        # generate with a static cache (and compiled forwards) pass a dict of 4-D masks: read the 2-D one behind it.
        raw = kwargs.get("attention_mask")
        if not self._prefill and isinstance(raw, dict) and raw and "full_attention" not in raw:
            # Windowed masks only (a static window cache rolls its columns): the columns since the prefill, which
            # are all decoding reads, are generate's own tokens, all real.
            raw = None
        attention_mask = padding_mask(raw, past)
        if not self._prefill:
            self._decode_masks.clear()
            self._decode_attention_mask = attention_mask
            segments = None if cache is None or not self.active else compat.marked(cache, SEGMENTS, self._segments_of)
            if segments is not None:
                self._segments = segments
            return None
        self.trace = ForwardTrace()
        self._segments = []
        self._carried = None
        embeds = kwargs.get("inputs_embeds")
        # A prompt given as embeddings: its image slots hold the image token's embedding (found as transformers does).
        self._placeholders = None if ids is None and embeds is None else placeholder_mask(
            ids, embeds, self.adapter.image_token_id, self.adapter.embed)
        self._real = None if attention_mask is None else attention_mask.bool()
        if not self.active:
            return None
        if self._placeholders is None:
            raise InputError("arrcoc.hf: llm stages need input_ids or inputs_embeds (to find the image positions), "
                             "got neither")
        B, L = self._placeholders.shape
        device = self._placeholders.device
        real = torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        visual = self._placeholders & real
        index = torch.arange(L, device=device).expand(B, L)
        self._segments = [Segment(0, index, real, real.clone(), visual, None, None, None,
                                  present=torch.ones_like(real))]
        self.recorder.results.clear()
        self.recorder.active = True
        return None

    def _top_post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.recorder.active = False
        ms = (clock(getattr(output, "logits", None)) - self._top_start) * 1e3
        if not self._prefill:
            self.trace.decode_ms += ms
            self.trace.decode_steps += 1
            return
        self.trace.prefill_ms = ms
        cache = compat.output_cache(output)
        self.trace.kv_bytes = cache_bytes(cache)
        if cache is not None:
            # Written at every prefill, None without stages: a cache generate reuses (a static one) must not carry
            # an earlier prompt's segments into another.
            segments = [dataclasses.replace(s, hidden=None) for s in self._segments] if self.active else None
            compat.mark(cache, SEGMENTS, segments, self._segments_of)

    def _lm_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._llm_start = clock(kwargs.get("inputs_embeds"))

    def _lm_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._prefill:
            self.trace.llm_prefill_ms = (clock(getattr(output, "last_hidden_state", None)) - self._llm_start) * 1e3

    # ------------------------------------------------------- decoder layers
    def _make_layer_pre(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
            if self._prefill:
                return self._prefill_layer(layer, args, kwargs)
            return self._decode_layer(layer, args, kwargs)

        return hook

    def _current(self) -> Segment | None:
        return self._segments[-1] if self._segments else None

    def _prefill_layer(self, layer: int, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not self.active:
            self._record_layer(layer, hidden, None)
            return None
        if layer == 0:
            self._input_hidden = hidden
            self._layer_kwargs = {k: kwargs.get(k) for k in ("position_embeddings", "position_ids", "attention_mask")}
        for label, stage in self.plan.get(layer, []):
            hidden = self._act(layer, label, stage, hidden, kwargs)
        seg = self._current()
        self._record_layer(layer, hidden, seg)
        if seg is None or seg.start == 0:
            return None
        kwargs = dict(kwargs, attention_mask=_layer_mask(self.adapter, seg.mask, layer),
                      position_embeddings=seg.cos_sin, position_ids=seg.position_ids)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _record_layer(self, layer: int, hidden: torch.Tensor, seg: Segment | None) -> None:
        if seg is None:
            B, n = hidden.shape[:2]
            real = self._real if self._real is not None and self._real.shape == (B, n) else torch.ones(
                B, n, dtype=torch.bool, device=hidden.device)
            tokens = real.sum(1)
            if self._placeholders is not None and self._placeholders.shape == (B, n):
                visual = (self._placeholders & real).sum(1)
            else:
                visual = torch.zeros_like(tokens)
        else:
            tokens = seg.real.sum(1)
            visual = (seg.visual & seg.keys).sum(1)
        self.trace.counts.append((layer, tokens, visual.to(tokens.device)))

    def _decode_layer(self, layer: int, args: tuple, kwargs: dict):
        seg = None
        for s in self._segments:
            if s.start <= layer:
                seg = s
        if seg is None or seg.start == 0:
            return None
        if seg.start not in self._decode_masks:
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = compat.cache_of(kwargs)
            new = self._decode_attention_mask
            if new is None:  # no padding anywhere: every column since the prompt is real
                steps = cache.get_seq_length(0) + hidden.shape[1] - self._prefill_length()
                new = torch.ones(hidden.shape[0], self._prefill_length() + steps, dtype=torch.long, device=hidden.device)
            mask2d = torch.cat([seg.keys.long(), new[:, self._prefill_length():].long()], 1)
            self._decode_masks[seg.start] = _causal_mask(self.adapter, hidden, mask2d, cache, seg.start)
        return args, dict(kwargs, attention_mask=_layer_mask(self.adapter, self._decode_masks[seg.start], layer))

    def _prefill_length(self) -> int:
        return self._segments[0].index.shape[1]

    # ---------------------------------------------------------------- act
    def _text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the text after the last visual token in the current segment: ``(index [B, T], valid)``."""
        seg = self._current()
        S = seg.index.shape[1]
        pos = torch.arange(S, device=seg.index.device).expand_as(seg.index)
        last_visual = torch.where(seg.visual, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
        after = seg.real & ~seg.visual & (pos > last_visual)
        return ops.pack(after)

    def _act(self, layer: int, label: str, stage: LLMCompressor, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        seg = self._current()
        start = time.perf_counter()
        vidx, vvalid = ops.pack(seg.visual & seg.keys)
        state = self._visual_state(hidden, vidx, vvalid)
        state = self._attach_signals(stage, layer, state, seg, vidx, vvalid)
        state = state.with_meta(layer=layer, num_layers=self.num_layers)
        with stage_errors(f"{label} at decoder layer {layer}", stage.name):
            out = stage(state)
        out = check_stage_output(f"{label} at decoder layer {layer}", stage.name, state, out)
        if SLOT not in out.per_token:
            raise StateError(f"{label} ({stage.name}): must return a TokenState that keeps per_token[{SLOT!r}]")
        slots = out.per_token[SLOT]
        keep_fields = {k: v for k, v in out.per_token.items() if k not in _SIGNAL_ROWS and k != SLOT}
        record = dataclasses.replace(out, per_token=keep_fields, meta={}, query=None, query_mask=None, llm=None)
        self.trace.states[f"{label}@{layer}"] = record
        self.trace.stage_ms[f"{label}@{layer}"] = (time.perf_counter() - start) * 1e3
        if stage.removes:
            new, visual_order = self._remove(seg, hidden, out.tokens, out.mask, slots, vidx, stage.position_rule, layer,
                                             compat.cache_of(kwargs))
            self._segments.append(new)
            self._carried = ops.keep(record, *visual_order)
            return new.hidden
        if out.N and not torch.equal(out.tokens, ops.gather_rows(hidden, vidx.gather(1, slots.clamp(min=0)), out.mask)):
            raise StateError(f"{label} ({stage.name}): mode 'mask' can only drop tokens, not change them")
        keep = torch.zeros_like(seg.keys)
        sink = torch.where(out.mask, vidx.gather(1, slots.clamp(min=0)), torch.full_like(slots, keep.shape[1]))
        keep = torch.cat([keep, keep[:, :1]], 1).scatter(1, sink, True)[:, :-1]
        keys = seg.keys & (~seg.visual | keep)
        by_slot = torch.sort(slots.masked_fill(~out.mask, slots.shape[1] + vidx.shape[1]), dim=1).indices
        self._carried = ops.keep(record, by_slot, out.mask.gather(1, by_slot))
        mask = _causal_mask(self.adapter, hidden, keys.long(), compat.cache_of(kwargs), layer)
        cos_sin = seg.cos_sin or self._layer_kwargs.get("position_embeddings")
        pos = seg.position_ids if seg.position_ids is not None else self._layer_kwargs.get("position_ids")
        self._segments.append(dataclasses.replace(seg, start=layer, keys=keys, mask=mask, cos_sin=cos_sin,
                                                  position_ids=pos, hidden=None))
        return hidden

    def _visual_state(self, hidden: torch.Tensor, vidx: torch.Tensor, vvalid: torch.Tensor) -> TokenState:
        tokens = ops.gather_rows(hidden, vidx, vvalid)
        B, N = vidx.shape
        slot = torch.arange(N, device=hidden.device).expand(B, N).contiguous()
        carried = self._carried
        if carried is None:
            carried = self._initial_visual(tokens, vvalid)
        return carried.replace(tokens=tokens, cls=None, query=None, query_mask=None,
                               per_token={**carried.per_token, SLOT: slot})

    def _initial_visual(self, tokens: torch.Tensor, valid: torch.Tensor) -> TokenState:
        """The visual tokens' bookkeeping at the first act: the pre-LLM state when it matches, else a 1 x N grid."""
        pre = self.visual_state
        if pre is not None and pre.B == tokens.shape[0] and pre.N == tokens.shape[1] and torch.equal(
                pre.mask.cpu(), valid.cpu()):
            return pre.replace(tokens=tokens, cls=None, per_token={}, query=None, query_mask=None)
        B, N, D = tokens.shape
        width = max(N, 1)
        padded = tokens if N else tokens.new_zeros(B, 1, D)
        state = TokenState.from_patches(padded, (1, width))
        index = torch.arange(width, device=tokens.device).expand(B, width)
        return ops.keep(state, index, valid if N else torch.zeros(B, 1, dtype=torch.bool, device=tokens.device))

    def _attach_signals(self, stage: LLMCompressor, layer: int, state: TokenState, seg: Segment,
                        vidx: torch.Tensor, vvalid: torch.Tensor) -> TokenState:
        results = self.recorder.results.get(layer - 1, {})
        # The attention was recorded over the sequence as layer - 1 saw it; an earlier stage acting at this same
        # layer may have changed it since: find each visual token's column there (a merged token: its source's).
        recorded = [s for s in self._segments if s.start <= layer - 1][-1]
        if recorded is not seg:
            column = torch.full((seg.index.shape[0], self._prefill_length()), 0, dtype=torch.long, device=vidx.device)
            column.scatter_(1, recorded.index.masked_fill(~recorded.real, 0),
                            torch.arange(recorded.index.shape[1], device=vidx.device).expand_as(recorded.index)
                            .masked_fill(~recorded.real, 0))
            vidx = column.gather(1, seg.index.gather(1, vidx))
            seg = dataclasses.replace(seg, keys=recorded.keys)
        needs = stage.requirements()
        fields: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        if "attn_from_last" in needs:
            fields["attn_from_last"] = ops.gather_rows(results["last"][:, 0, :, None], vidx, vvalid)[..., 0]
        if "attn_from_text" in needs:
            probs = results["text"]  # [B, T, S]
            fields["attn_from_text"] = probs.transpose(1, 2).gather(
                1, vidx[:, :, None].expand(-1, -1, probs.shape[1])) * vvalid[:, :, None]
            first = self._segments[0]
            t_index, t_valid = self._text_index_at_input()
            v_index, v_valid = ops.pack(first.visual)
            meta["text_mask"] = self._text_rows()[1]
            # The LLM-input hidden states of the text and of every visual token (before any pruning).
            meta["input_visual"] = ops.gather_rows(self._input_hidden, v_index, v_valid)
            meta["input_visual_mask"] = v_valid
            state = state.replace(query=ops.gather_rows(self._input_hidden, t_index, t_valid).to(state.dtype),
                                  query_mask=t_valid)
        if "attn_logits" in needs:
            meta.update(attn_logits=results["logits"], visual_columns=vidx, sequence_mask=seg.keys)
        meta["input_visual_counts"] = self._segments[0].visual.sum(1)
        context = LLMContext(layer=layer, num_layers=self.num_layers, **meta)
        return state.with_per_token(**fields).with_meta(**meta).replace(llm=context)

    def _text_index_at_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self._segments[0]
        S = first.index.shape[1]
        pos = torch.arange(S, device=first.index.device).expand_as(first.index)
        last_visual = torch.where(first.visual, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
        return ops.pack(first.real & ~first.visual & (pos > last_visual))

    def _remove(self, seg: Segment, hidden: torch.Tensor, vis_tokens: torch.Tensor, vis_mask: torch.Tensor,
                slots: torch.Tensor, vidx: torch.Tensor, rule: str, layer: int, cache: Any) -> Segment:
        """The sequence with the stage's visual tokens in place of the old ones; ragged rows left-padded."""
        B, S = seg.index.shape
        device = hidden.device
        pos = torch.arange(S, device=device).expand(B, S)
        # A visual token goes where its image's run starts; within a run, in the stage's output order.
        run_start = torch.where(seg.visual & ~torch.cat([seg.visual[:, :1] & False, seg.visual[:, :-1]], 1), pos, 0)
        run_start = run_start.cummax(1).values
        src_pos = vidx.gather(1, slots.clamp(min=0))  # sequence position of each output token's source
        M = S + 2
        # Text and the caller's padding stay in place (padding masked): a stage that keeps every visual token
        # leaves the sequence, its cache and its outputs as the model's own.
        text = seg.present & ~seg.visual
        key = torch.cat([pos * M, run_start.gather(1, src_pos) * M + 1 + torch.arange(
            vis_tokens.shape[1], device=device)[None, :]], 1)
        select = torch.cat([text, vis_mask], 1)
        order, valid = pack_end(select, key)
        source_hidden = torch.cat([hidden, vis_tokens.to(hidden.dtype)], 1)
        new_hidden = ops.gather_rows(source_hidden, order, valid)
        orig = torch.cat([seg.index, seg.index.gather(1, src_pos)], 1).gather(1, order).masked_fill(~valid, 0)
        current = torch.cat([pos, src_pos], 1).gather(1, order).masked_fill(~valid, 0)  # column in ``seg``
        is_visual = torch.cat([torch.zeros_like(text), vis_mask], 1).gather(1, order) & valid
        real = torch.cat([seg.real, vis_mask], 1).gather(1, order) & valid
        # Positions as the tokens have them NOW (an earlier compact stage may have renumbered them).
        cur_cos_sin = seg.cos_sin or self._layer_kwargs.get("position_embeddings")
        cur_pos = seg.position_ids if seg.position_ids is not None else self._layer_kwargs.get("position_ids")
        if cur_pos is None:
            cur_pos = torch.arange(S, device=device)[None]
        cur_pos = cur_pos.expand(B, -1)
        if rule == "compact" and self.adapter.multimodal_rope:
            raise ModelError(
                f"arrcoc.hf: positions 'compact' renumbers 1-D positions; {self.adapter.family} uses multimodal "
                "rotary positions, for which it is undefined: use positions: original"
            )
        if rule == "compact":
            # Renumber the kept tokens contiguously from the row's first original position (SparseVLM v1.0).
            first = cur_pos.masked_fill(~seg.real, torch.iinfo(torch.int64).max).amin(1, keepdim=True)
            position_ids = torch.where(real, first + real.long().cumsum(1) - 1, torch.ones_like(orig))
            cos_sin = self.adapter.rotary(new_hidden, position_ids)
        elif rule == "original":
            position_ids = cur_pos.gather(1, current).masked_fill(~valid, 1)
            cos_sin = tuple(_gather_positions(t, current, B) for t in cur_cos_sin)
        else:
            raise StateError(f"arrcoc.hf: unknown position rule {rule!r} (expected 'original' or 'compact')")
        mask = _causal_mask(self.adapter, new_hidden, real.long(), cache, layer)
        # The stage's output tokens in the order they now stand in the sequence.
        visual_order = ops.pack(is_visual)
        from_output = (order - S).clamp(min=0)
        visual_order = (from_output.gather(1, visual_order[0]), visual_order[1])
        return Segment(layer, orig, real, real.clone(), is_visual, cos_sin, position_ids, mask, new_hidden,
                       present=valid), visual_order


def _gather_positions(table: torch.Tensor, index: torch.Tensor, B: int) -> torch.Tensor:
    """Rows ``index`` ``[B, S']`` of a rotary table ``[B or 1, S, D]``."""
    table = table.expand(B, *table.shape[1:])
    return table.gather(1, index[:, :, None].expand(-1, -1, table.shape[-1]))


#: The attention types of decoder layers whose masks the engine builds (``config.layer_types``).
_MASK_TYPES = ("full_attention", "sliding_attention")


def _causal_mask(adapter: Adapter, hidden: torch.Tensor, mask2d: torch.Tensor, cache: Any, layer: int) -> Any:
    """The 4-D mask of layers ``>= layer`` over ``mask2d``; a model whose layers attend in windows gets one mask
    per attention type (``{type: mask}``, each sized against the first cache layer of its type from ``layer``
    on; :func:`_layer_mask` picks a layer's)."""
    config = adapter.text_config
    types = list(getattr(config, "layer_types", None) or ())
    if not types or set(types) == {"full_attention"}:
        return compat.causal_mask(config, hidden, mask2d, cache, layer)
    masks = {}
    for i in range(layer, len(types)):
        if types[i] not in masks:
            masks[types[i]] = compat.causal_mask(config, hidden, mask2d, cache, i,
                                                 sliding=types[i] == "sliding_attention")
    return masks


def _layer_mask(adapter: Adapter, mask: Any, layer: int) -> Any:
    """Layer ``layer``'s mask from what :func:`_causal_mask` built."""
    return mask[adapter.text_config.layer_types[layer]] if isinstance(mask, dict) else mask


def cache_bytes(cache: Any) -> int:
    """Bytes held by a ``DynamicCache``'s keys and values (0 without a cache)."""
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
