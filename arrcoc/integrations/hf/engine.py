"""In-LLM pruning: ``llm:`` stages between the decoder layers of an unmodified model.

Forward pre-hooks (``with_kwargs=True``) on every decoder layer; nothing in
``transformers`` is forked.  Everything here is sequence surgery on the
:class:`~.call.Call` in progress: the Run (:mod:`.apply`) owns the hooks of
the top model and hands each forward's inputs to :meth:`LLMEngine.begin_forward`.

Prefill.  :meth:`LLMEngine.begin_forward` reads ``input_ids`` /
``attention_mask`` and finds the image positions.  A stage acting at layer ``a`` gets its
signals from layer ``a - 1``'s attention (:mod:`.attention` records only the
rows it needs).  The pre-hook of layer ``a`` builds the stage's
:class:`~arrcoc.state.TokenState` of visual hidden states, runs the stage,
and either **removes** the dropped tokens (gathers hidden states, rotary
``(cos, sin)``, position ids; left-pads ragged rows so the last token stays
last; builds the 4-D mask with ``create_causal_mask(layer_idx=a)``) or
**masks** them as keys.  A model whose prompt has blocks that attend both ways
(:meth:`~.adapter.Adapter.attention_blocks`: Gemma 3's images) keeps them: the
kept tokens of a block are one block again in the rebuilt mask; a model whose
layer types have rotary tables of their own gets each type its table.
Later layers get the same replaced kwargs, so every
layer keeps running its own attention kernel, and the KV cache of layers
``>= a`` holds only what they saw.

Decode.  Layers ``>= a`` get a mask built from their segment's prefill key
mask plus the new columns; positions continue from the unpruned length
(``generate`` numbers new tokens from ``attention_mask``), which is FastV's
rule and what SparseVLM v1.0 does after its compact prefill numbering; after a
compact stage whose ``decode_position_rule`` is ``shifted`` (PyramidDrop), the
layers from it on number new tokens from that length minus the prompt tokens
they no longer see (:attr:`~.call.Segment.position_shift`).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch

from arrcoc import ops
from arrcoc.errors import InputError, ModelError, StateError
from arrcoc.pipeline import run_stage
from arrcoc.plugin import LLM_SIGNALS, LLMCompressor
from arrcoc.registry import Registry
from arrcoc.state import LLMContext, TokenState

from . import compat
from .adapter import Adapter
from .attention import Recorder, attach, detach, probe_last_row
from .call import Call, Segment
from .prompt import padding_mask, placeholder_mask

#: per_token field numbering the visual tokens handed to a stage.
SLOT = "llm_slot"
#: Signals recorded in the attention of the layer before a stage's (LLM_SIGNALS name -> the recorder's request).
_SIGNAL_ROWS = {"attn_from_last": "last", "attn_from_text": "text", "attn_logits": "logits", "key_norms": "key_norms"}
#: Signals that carry the text after the image (``state.llm.text_mask``, ``text_positions``).
_TEXT_SIGNALS = ("attn_from_text", "key_norms", "normed_hidden")
#: The attribute a KV cache filled by a prefill with llm: stages carries: that prefill's segments (its masks).
SEGMENTS = "_arrcoc_segments"


class LLMEngine:
    """Runs ``llm:`` stages inside one model; :meth:`install` / :meth:`remove` its hooks."""

    def __init__(self, adapter: Adapter, stages: list[tuple[str, LLMCompressor]], current: Callable[[], Call],
                 registry: Registry) -> None:
        """``current()`` is the call in progress (its Run's); ``registry`` fires the observer hooks."""
        self.adapter = adapter
        self.current = current
        self.registry = registry
        self.layers = adapter.decoder_layers
        self.num_layers = len(self.layers)
        self.plan: dict[int, list[tuple[str, LLMCompressor]]] = {}
        requests: dict[int, set[str]] = {}
        self.probed: set[int] = set()  # layers whose own attention a stage reads (attn_from_last_here)
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
                if "attn_from_last_here" in stage.requirements():
                    self.probed.add(layer)
        other = sorted(set(getattr(adapter.text_config, "layer_types", None) or ()) - set(_MASK_TYPES))
        if self.plan and other:
            raise ModelError(
                f"arrcoc.hf: llm: stages rebuild each decoder layer's attention mask; this model has layers of "
                f"attention type {other}, whose masks arrcoc cannot build (supported: {list(_MASK_TYPES)}); use "
                "pre-LLM stages only"
            )
        self.recorder = Recorder(requests=requests, text_rows=self._text_rows, results=self._recording,
                                 last_rows=self._last_rows)
        self.handles: list[Any] = []
        # Each cache's own prefill segments: a conversation continued from one cache after another generate
        # (other prompts, same Run) decodes with the masks of the prompt that cache holds, not the last prefill's.
        # Kept ON the cache (the attribute SEGMENTS), so a copy.deepcopy of it (transformers' way of reusing a
        # prompt's cache) has them too; a cache that takes no attribute is looked up here instead.
        self._segments_of: "weakref.WeakKeyDictionary[Any, list[Segment]]" = weakref.WeakKeyDictionary()

    @property
    def active(self) -> bool:
        return bool(self.plan)

    @property
    def scoring(self) -> bool:
        """Whether the model must run arrcoc's scoring attention function (a stage reads attention or keys)."""
        return bool(self.recorder.requests or self.probed)

    def _recording(self) -> dict[int, dict[str, torch.Tensor]] | None:
        call = self.current()
        return call.attention if call.recording else None

    # ----------------------------------------------------------- hooks
    def install(self) -> None:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._make_layer_pre(i), with_kwargs=True))
        attach(self.recorder, [self.adapter.attention_module(layer) for layer in self.layers])
        self.handles.extend(self.adapter.llm_hooks(self._changed_sequence))

    def _changed_sequence(self) -> Segment | None:
        """The sequence the decoder layers run now see in a prefill, None while it is the model's own."""
        call = self.current()
        if not call.prefill or not call.segments or call.segments[-1].start == 0:
            return None
        return call.segments[-1]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        detach([self.adapter.attention_module(layer) for layer in self.layers])

    # ------------------------------------------------- one forward of a call
    def begin_forward(self, call: Call, ids: torch.Tensor | None, embeds: torch.Tensor | None, raw_mask: Any,
                      cache: Any, inputs: dict | None = None) -> None:
        """A forward of ``call`` starts with these inputs (as the LLM gets them, after any pre-LLM shortening;
        ``inputs``: all its keyword arguments): a prefill sets up its first segment, a decoding step finds the
        segments of the prompt its cache holds."""
        past = 0 if cache is None else cache.get_seq_length()
        call.prefill = past == 0
        # generate with a static cache (and compiled forwards) pass a dict of 4-D masks: read the 2-D one behind it.
        if not call.prefill and isinstance(raw_mask, dict) and raw_mask and "full_attention" not in raw_mask:
            # Windowed masks only (a static window cache rolls its columns): the columns since the prefill, which
            # are all decoding reads, are generate's own tokens, all real.
            raw_mask = None
        attention_mask = padding_mask(raw_mask, past)
        if not call.prefill:
            call.decode_masks, call.decode_positions = {}, {}
            call.decode_attention_mask = attention_mask
            segments = None if cache is None or not self.active else compat.marked(cache, SEGMENTS, self._segments_of)
            if segments is not None:
                call.segments = segments
            return
        call.begin_prefill()
        call.input_ids = ids
        # A prompt given as embeddings: its image slots hold the image token's embedding (found as transformers does).
        call.placeholders = None if ids is None and embeds is None else placeholder_mask(
            ids, embeds, self.adapter.image_token_id, self.adapter.embed)
        call.real = None if attention_mask is None else attention_mask.bool()
        if not self.active:
            return
        if call.placeholders is None:
            raise InputError("arrcoc.hf: llm stages need input_ids or inputs_embeds (to find the image positions), "
                             "got neither")
        B, L = call.placeholders.shape
        device = call.placeholders.device
        call.blocks = None if inputs is None else self.adapter.attention_blocks(inputs)
        if call.blocks is not None:
            if tuple(call.blocks.shape) != (B, L):
                raise ModelError(f"arrcoc.hf: {self.adapter.family}'s attention blocks have shape "
                                 f"{tuple(call.blocks.shape)}, the prompt {(B, L)}")
            call.blocks = call.blocks.to(device)
        real = torch.ones(B, L, dtype=torch.bool, device=device) if call.real is None else call.real
        visual = call.placeholders & real
        index = torch.arange(L, device=device).expand(B, L)
        call.segments = [Segment(0, index, real, real.clone(), visual, None, None, None,
                                 present=torch.ones_like(real))]
        call.recording = True

    def end_forward(self, call: Call, cache: Any) -> None:
        """The forward of ``call`` ended with ``cache``: a prefill marks the cache with its segments (the masks
        its decoding steps need)."""
        call.recording = False
        if not call.prefill:
            return
        if cache is not None:
            # Written at every prefill, None without stages: a cache generate reuses (a static one) must not carry
            # an earlier prompt's segments into another.
            segments = [dataclasses.replace(s, hidden=None) for s in call.segments] if self.active else None
            compat.mark(cache, SEGMENTS, segments, self._segments_of)

    # ------------------------------------------------------- decoder layers
    def _make_layer_pre(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
            call = self.current()
            if call.prefill:
                return self._prefill_layer(call, layer, args, kwargs)
            return self._decode_layer(call, layer, args, kwargs)

        return hook

    def _prefill_layer(self, call: Call, layer: int, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not self.active:
            self._count_layer(call, layer, hidden, None)
            return None
        if layer == 0:
            if call.segments[0].index.shape != hidden.shape[:2]:
                raise ModelError(
                    f"arrcoc.hf: the LLM got hidden states of {tuple(hidden.shape[:2])} (batch, tokens), but the "
                    f"model's inputs described {tuple(call.segments[0].index.shape)}; a forward pre-hook or "
                    "wrapper changed the sequence between the model's inputs and its language model"
                )
            call.input_hidden = hidden
            call.layer_kwargs = {k: kwargs.get(k) for k in ("position_embeddings", "position_ids", "attention_mask")}
        for label, stage in self.plan.get(layer, []):
            hidden = self._act(call, layer, label, stage, hidden, kwargs)
        seg = call.segments[-1] if call.segments else None
        self._count_layer(call, layer, hidden, seg)
        if seg is None or seg.start == 0:
            return None
        kwargs = self._segment_kwargs(seg, layer, kwargs)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _segment_kwargs(self, seg: Segment, layer: int, kwargs: dict) -> dict:
        """Decoder layer ``layer``'s kwargs for the sequence ``seg`` (the model's own for the unchanged one)."""
        if seg.start == 0:
            return kwargs
        return dict(kwargs, attention_mask=_for_layer(self.adapter, seg.mask, layer),
                    position_embeddings=_for_layer(self.adapter, seg.cos_sin, layer), position_ids=seg.position_ids)

    @staticmethod
    def _count_layer(call: Call, layer: int, hidden: torch.Tensor, seg: Segment | None) -> None:
        """The real tokens and visual keys layer ``layer`` sees, per sample (tensors: read back once, later)."""
        if seg is None:
            B, n = hidden.shape[:2]
            real = call.real if call.real is not None and call.real.shape == (B, n) else torch.ones(
                B, n, dtype=torch.bool, device=hidden.device)
            tokens = real.sum(1)
            if call.placeholders is not None and call.placeholders.shape == (B, n):
                visual = (call.placeholders & real).sum(1)
            else:
                visual = torch.zeros_like(tokens)
        else:
            tokens = seg.real.sum(1)
            visual = (seg.visual & seg.keys).sum(1)
        call.layer_counts_raw.append((layer, tokens, visual.to(tokens.device)))

    def _decode_layer(self, call: Call, layer: int, args: tuple, kwargs: dict):
        seg = None
        for s in call.segments:
            if s.start <= layer:
                seg = s
        if seg is None or seg.start == 0:
            return None
        if seg.start not in call.decode_masks:
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = compat.cache_of(kwargs)
            prefill_length = call.segments[0].index.shape[1]
            new = call.decode_attention_mask
            if new is None:  # no padding anywhere: every column since the prompt is real
                steps = cache.get_seq_length(0) + hidden.shape[1] - prefill_length
                new = torch.ones(hidden.shape[0], prefill_length + steps, dtype=torch.long, device=hidden.device)
            mask2d = torch.cat([seg.keys.long(), new[:, prefill_length:].long()], 1)
            call.decode_masks[seg.start] = _causal_mask(self.adapter, hidden, mask2d, cache, seg.start)
            if seg.position_shift is not None:
                position_ids = kwargs["position_ids"] - seg.position_shift[:, None]
                call.decode_positions[seg.start] = (position_ids, self.adapter.rotary(hidden, position_ids))
        kwargs = dict(kwargs, attention_mask=_for_layer(self.adapter, call.decode_masks[seg.start], layer))
        if seg.position_shift is not None:
            position_ids, cos_sin = call.decode_positions[seg.start]
            kwargs.update(position_ids=position_ids, position_embeddings=_for_layer(self.adapter, cos_sin, layer))
        return args, kwargs

    # ---------------------------------------------------------------- act
    def _last_rows(self) -> torch.Tensor:
        """``[B]``: the row of each prompt's last real token in the current segment (right padding follows it)."""
        real = self.current().segments[-1].real
        pos = torch.arange(real.shape[1], device=real.device).expand_as(real)
        return torch.where(real, pos, torch.full_like(pos, -1)).amax(1).clamp(min=0)

    def _text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the text after the last visual token in the current segment: ``(index [B, T], valid)``."""
        return _text_after_image(self.current().segments[-1])

    def _act(self, call: Call, layer: int, label: str, stage: LLMCompressor, hidden: torch.Tensor,
             kwargs: dict) -> torch.Tensor:
        """Run one stage at decoder layer ``layer`` (through the stage runner, as any stage) and cut the sequence
        to what it keeps."""
        seg = call.segments[-1]
        vidx, vvalid = ops.pack(seg.visual & seg.keys)
        state = self._visual_state(call, hidden, vidx, vvalid)
        state = self._attach_signals(call, stage, layer, state, seg, vidx, vvalid, hidden,
                                     self._segment_kwargs(seg, layer, kwargs))
        out = run_stage(f"{label}@{layer}", stage, state, self.registry, hidden.device,
                        where=f"{label} at decoder layer {layer}")
        if SLOT not in out.per_token:
            raise StateError(f"{label} ({stage.name}): must return a TokenState that keeps per_token[{SLOT!r}]")
        slots = out.per_token[SLOT]
        keep_fields = {k: v for k, v in out.per_token.items() if k not in LLM_SIGNALS and k != SLOT}
        # What goes on (and what run.llm_states shows): the tokens and their bookkeeping, not the signals.
        record = dataclasses.replace(out, per_token=keep_fields, meta={}, query=None, query_mask=None, llm=None)
        call.llm_states[f"{label}@{layer}"] = record
        call.llm_records.append(record.trace[-1])
        if stage.removes:
            new, visual_order = self._remove(call, seg, hidden, out.tokens, out.mask, slots, vidx,
                                             stage.position_rule, stage.decode_position_rule, layer,
                                             compat.cache_of(kwargs))
            call.segments.append(new)
            call.carried = ops.keep(record, *visual_order)
            return new.hidden
        if out.N and not torch.equal(out.tokens, ops.gather_rows(hidden, vidx.gather(1, slots.clamp(min=0)), out.mask)):
            raise StateError(f"{label} ({stage.name}): mode 'mask' can only drop tokens, not change them")
        keep = torch.zeros_like(seg.keys)
        sink = torch.where(out.mask, vidx.gather(1, slots.clamp(min=0)), torch.full_like(slots, keep.shape[1]))
        keep = torch.cat([keep, keep[:, :1]], 1).scatter(1, sink, True)[:, :-1]
        keys = seg.keys & (~seg.visual | keep)
        by_slot = torch.sort(slots.masked_fill(~out.mask, slots.shape[1] + vidx.shape[1]), dim=1).indices
        call.carried = ops.keep(record, by_slot, out.mask.gather(1, by_slot))
        blocks = None if call.blocks is None else call.blocks.gather(1, seg.index).masked_fill(~seg.real, -1)
        mask = _causal_mask(self.adapter, hidden, keys.long(), compat.cache_of(kwargs), layer, blocks)
        cos_sin = seg.cos_sin or self._input_rotary(call, hidden)
        pos = seg.position_ids if seg.position_ids is not None else call.layer_kwargs.get("position_ids")
        call.segments.append(dataclasses.replace(seg, start=layer, keys=keys, mask=mask, cos_sin=cos_sin,
                                                 position_ids=pos, hidden=None))
        return hidden

    def _input_rotary(self, call: Call, hidden: torch.Tensor) -> Any:
        """The rotary table(s) of the sequence as the model numbered it: layer 0's, which every layer shares, or
        ``{layer type: (cos, sin)}`` from layer 0's positions where the types have their own (computed as the model
        computes them: the same values)."""
        if not self.adapter.rotary_per_layer_type:
            return call.layer_kwargs.get("position_embeddings")
        positions = call.layer_kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return self.adapter.rotary(hidden, positions)

    def _visual_state(self, call: Call, hidden: torch.Tensor, vidx: torch.Tensor, vvalid: torch.Tensor
                      ) -> TokenState:
        tokens = ops.gather_rows(hidden, vidx, vvalid)
        B, N = vidx.shape
        slot = torch.arange(N, device=hidden.device).expand(B, N).contiguous()
        carried = call.carried
        if carried is None:
            carried = self._initial_visual(call.pre_llm, tokens, vvalid)
        return carried.replace(tokens=tokens, cls=None, query=None, query_mask=None,
                               per_token={**carried.per_token, SLOT: slot})

    @staticmethod
    def _initial_visual(pre_llm: TokenState | None, tokens: torch.Tensor, valid: torch.Tensor) -> TokenState:
        """The visual tokens' bookkeeping at the first act: the pre-LLM state when it matches (one state per
        prompt, same tokens), else a 1 x N grid; the trace goes on from the pre-LLM stages' either way."""
        pre = pre_llm
        if pre is not None and pre.B == tokens.shape[0] and pre.N == tokens.shape[1] and torch.equal(
                pre.mask.cpu(), valid.cpu()):
            return pre.replace(tokens=tokens, cls=None, per_token={}, query=None, query_mask=None)
        B, N, D = tokens.shape
        width = max(N, 1)
        padded = tokens if N else tokens.new_zeros(B, 1, D)
        state = TokenState.from_patches(padded, (1, width))
        index = torch.arange(width, device=tokens.device).expand(B, width)
        state = ops.keep(state, index, valid if N else torch.zeros(B, 1, dtype=torch.bool, device=tokens.device))
        return state if pre is None else dataclasses.replace(state, trace=pre.trace)

    def _attach_signals(self, call: Call, stage: LLMCompressor, layer: int, state: TokenState, seg: Segment,
                        vidx: torch.Tensor, vvalid: torch.Tensor, hidden: torch.Tensor,
                        layer_kwargs: dict) -> TokenState:
        """The stage's inputs (:data:`~arrcoc.plugin.LLM_SIGNALS`: from layer ``layer - 1``'s attention and
        keys, from the hidden states here, or from this layer's own attention) and its
        :class:`~arrcoc.state.LLMContext`.  ``seg`` / ``vidx`` / ``hidden`` / ``layer_kwargs``: the sequence as
        it reaches ``layer`` now."""
        results = call.attention.get(layer - 1, {})
        # The attention was recorded over the sequence as layer - 1 saw it; an earlier stage acting at this same
        # layer may have changed it since: find each token's column there (a merged token: its source's).
        recorded = [s for s in call.segments if s.start <= layer - 1][-1]
        prefill_length = call.segments[0].index.shape[1]
        to_recorded = lambda columns: columns  # noqa: E731  (identity while the sequence is the recorded one)
        if recorded is not seg:
            # Padded entries write into a spare last column: sent to column 0 they would collide with the real
            # token that came from the prompt's column 0 (a prompt that starts with its image) and, written after
            # it (the caller's right padding) or in any order (a GPU scatter), hide where it is.
            column = torch.zeros(seg.index.shape[0], prefill_length + 1, dtype=torch.long, device=vidx.device)
            column.scatter_(1, recorded.index.masked_fill(~recorded.real, prefill_length),
                            torch.arange(recorded.index.shape[1], device=vidx.device).expand_as(recorded.index))
            to_recorded = lambda columns: column.gather(1, seg.index.gather(1, columns))  # noqa: E731
        rec_vidx = to_recorded(vidx)
        needs = stage.requirements()
        fields: dict[str, torch.Tensor] = {}
        first = call.segments[0]
        # Each original column's index among its prompt's real tokens (the prompt as the LLM got it, unpadded).
        prompt_index = (first.real.long().cumsum(1) - 1).clamp(min=0)
        in_prompt = lambda columns, valid: prompt_index.gather(1, seg.index.gather(1, columns)) * valid  # noqa: E731
        context: dict[str, Any] = {"input_visual_counts": first.visual.sum(1), "visual_positions": in_prompt(vidx, vvalid)}
        if "attn_from_last" in needs:
            fields["attn_from_last"] = ops.gather_rows(results["last"][:, 0, :, None], rec_vidx, vvalid)[..., 0]
        if any(signal in needs for signal in _TEXT_SIGNALS):
            t_cols, t_valid = _text_after_image(seg)
            context.update(text_mask=t_valid, text_positions=in_prompt(t_cols, t_valid))
        if "attn_from_text" in needs:
            probs = results["text"]  # [B, T, S]
            fields["attn_from_text"] = probs.transpose(1, 2).gather(
                1, rec_vidx[:, :, None].expand(-1, -1, probs.shape[1])) * vvalid[:, :, None]
            t_index, t_valid0 = _text_after_image(first)
            v_index, v_valid = ops.pack(first.visual)
            # The LLM-input hidden states of the text and of every visual token (before any pruning).
            context["input_visual"] = ops.gather_rows(call.input_hidden, v_index, v_valid)
            context["input_visual_mask"] = v_valid
            state = state.replace(query=ops.gather_rows(call.input_hidden, t_index, t_valid0).to(state.dtype),
                                  query_mask=t_valid0)
        if "attn_logits" in needs:
            context.update(attn_logits=results["logits"], visual_columns=rec_vidx, sequence_mask=recorded.keys)
        if "key_norms" in needs:
            norms = results["key_norms"]  # [B, S at layer - 1]
            fields["key_norms"] = norms.gather(1, rec_vidx) * vvalid
            context["text_key_norms"] = norms.gather(1, to_recorded(t_cols)) * t_valid
        if "normed_hidden" in needs:
            norm = self._final_norm()
            fields["normed_hidden"] = norm(state.tokens) * vvalid[:, :, None]
            context["text_normed_hidden"] = norm(ops.gather_rows(hidden, t_cols, t_valid)) * t_valid[:, :, None]
        if "attn_from_last_here" in needs:
            decoder_layer = self.layers[layer]
            row = probe_last_row(self.recorder, self.adapter.attention_module(decoder_layer),
                                 decoder_layer.input_layernorm(hidden), layer_kwargs)
            fields["attn_from_last_here"] = row.gather(1, vidx) * vvalid
        llm = LLMContext(layer=layer, num_layers=self.num_layers, **context)
        return state.with_per_token(**fields).replace(llm=llm)

    def _final_norm(self) -> torch.nn.Module:
        norm = getattr(self.adapter.language_model, "norm", None)
        if norm is None:
            raise ModelError(f"arrcoc.hf: {type(self.adapter.language_model).__name__} has no final norm (.norm); "
                             "the signal 'normed_hidden' is the hidden states through it")
        return norm

    def _remove(self, call: Call, seg: Segment, hidden: torch.Tensor, vis_tokens: torch.Tensor,
                vis_mask: torch.Tensor, slots: torch.Tensor, vidx: torch.Tensor, rule: str, decode_rule: str,
                layer: int, cache: Any) -> tuple[Segment, tuple[torch.Tensor, torch.Tensor]]:
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
        order, valid = ops.pack(select, key, end=True)
        source_hidden = torch.cat([hidden, vis_tokens.to(hidden.dtype)], 1)
        new_hidden = ops.gather_rows(source_hidden, order, valid)
        orig = torch.cat([seg.index, seg.index.gather(1, src_pos)], 1).gather(1, order).masked_fill(~valid, 0)
        current = torch.cat([pos, src_pos], 1).gather(1, order).masked_fill(~valid, 0)  # column in ``seg``
        is_visual = torch.cat([torch.zeros_like(text), vis_mask], 1).gather(1, order) & valid
        real = torch.cat([seg.real, vis_mask], 1).gather(1, order) & valid
        # Positions as the tokens have them NOW (an earlier compact stage may have renumbered them).
        cur_cos_sin = seg.cos_sin or self._input_rotary(call, hidden)
        cur_pos = seg.position_ids if seg.position_ids is not None else call.layer_kwargs.get("position_ids")
        if cur_pos is None:
            cur_pos = torch.arange(S, device=device)[None]
        cur_pos = cur_pos.expand(B, -1)
        if rule == "compact" and self.adapter.multimodal_rope:
            raise ModelError(
                f"arrcoc.hf: positions 'compact' renumbers 1-D positions; {self.adapter.family} uses multimodal "
                "rotary positions, for which it is undefined: use positions: original"
            )
        shift = seg.position_shift
        if rule == "compact":
            # Renumber the kept tokens contiguously from the row's first original position (SparseVLM v1.0).
            first = cur_pos.masked_fill(~seg.real, torch.iinfo(torch.int64).max).amin(1, keepdim=True)
            position_ids = torch.where(real, first + real.long().cumsum(1) - 1, torch.ones_like(orig))
            cos_sin = self.adapter.rotary(new_hidden, position_ids)
            if decode_rule == "shifted":
                # Decoding continues this numbering: a new token's position is its unpruned one minus the prompt
                # tokens these layers no longer see (PyramidDrop, pdrop_forward l.1259-1268).
                shift = call.segments[0].real.sum(1) - real.sum(1)
            elif decode_rule == "unpruned":
                shift = None
            else:
                raise StateError(f"arrcoc.hf: unknown decode position rule {decode_rule!r} "
                                 "(expected 'unpruned' or 'shifted')")
        elif rule == "original":
            position_ids = cur_pos.gather(1, current).masked_fill(~valid, 1)
            cos_sin = _per_type(cur_cos_sin, lambda table: tuple(_gather_positions(t, current, B) for t in table))
        else:
            raise StateError(f"arrcoc.hf: unknown position rule {rule!r} (expected 'original' or 'compact')")
        # A kept token keeps its block (its source column's; a merged token its first source's).
        blocks = None if call.blocks is None else call.blocks.gather(1, orig).masked_fill(~real, -1)
        mask = _causal_mask(self.adapter, new_hidden, real.long(), cache, layer, blocks)
        # The stage's output tokens in the order they now stand in the sequence.
        visual_order = ops.pack(is_visual)
        from_output = (order - S).clamp(min=0)
        visual_order = (from_output.gather(1, visual_order[0]), visual_order[1])
        return Segment(layer, orig, real, real.clone(), is_visual, cos_sin, position_ids, mask, new_hidden,
                       present=valid, position_shift=shift), visual_order


def _text_after_image(seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    """The real text after the last visual token of each row of ``seg``, packed: ``(index [B, T], valid)``."""
    S = seg.index.shape[1]
    pos = torch.arange(S, device=seg.index.device).expand_as(seg.index)
    last_visual = torch.where(seg.visual, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
    return ops.pack(seg.real & ~seg.visual & (pos > last_visual))


def _gather_positions(table: torch.Tensor, index: torch.Tensor, B: int) -> torch.Tensor:
    """Rows ``index`` ``[B, S']`` of a rotary table ``[B or 1, S, D]``."""
    table = table.expand(B, *table.shape[1:])
    return table.gather(1, index[:, :, None].expand(-1, -1, table.shape[-1]))


#: The attention types of decoder layers whose masks the engine builds (``config.layer_types``).
_MASK_TYPES = ("full_attention", "sliding_attention")


def _causal_mask(adapter: Adapter, hidden: torch.Tensor, mask2d: torch.Tensor, cache: Any, layer: int,
                 blocks: torch.Tensor | None = None) -> Any:
    """The 4-D mask of layers ``>= layer`` over ``mask2d`` (``blocks``: the sequence's bidirectional blocks, see
    :func:`.compat.causal_mask`); a model whose layers attend in windows gets one mask per attention type
    (``{type: mask}``, each sized against the first cache layer of its type from ``layer`` on; :func:`_for_layer`
    picks a layer's)."""
    config = adapter.text_config
    types = list(getattr(config, "layer_types", None) or ())
    if not types or set(types) == {"full_attention"}:
        return compat.causal_mask(config, hidden, mask2d, cache, layer, blocks=blocks)
    masks = {}
    for i in range(layer, len(types)):
        if types[i] not in masks:
            masks[types[i]] = compat.causal_mask(config, hidden, mask2d, cache, i,
                                                 sliding=types[i] == "sliding_attention", blocks=blocks)
    return masks


def _for_layer(adapter: Adapter, value: Any, layer: int) -> Any:
    """Layer ``layer``'s entry of a value built per attention type (``{type: value}``: a mask of
    :func:`_causal_mask`, a rotary table of a model whose types have their own), or the value itself."""
    return value[adapter.text_config.layer_types[layer]] if isinstance(value, dict) else value


def _per_type(value: Any, function: Callable[[Any], Any]) -> Any:
    """``function`` applied to a value, or to each entry of one built per attention type (``{type: value}``)."""
    return {kind: function(entry) for kind, entry in value.items()} if isinstance(value, dict) else function(value)
