"""Pre-LLM compression inside a model: encode the images, run the pre-LLM stages, shorten the prompt.

The pre-LLM stages (``compress``, ``score``, ``allocate``) run on the
model's own image features (:mod:`.vision`'s wrapper around the live tower),
per image in a ragged batch; the prompt handed to the LLM carries as many
placeholders per image as tokens were kept (left-padded).  Stages declared
``stage = "vision"`` run before the projector, the others after it
(``projector="auto"``); ``"before"`` / ``"after"`` project before / after
every stage.  Multi-view images (LLaVA-NeXT) are one state row per view; a
stage whose ``packed_images`` is true (e.g. a method whose official code
selects over the whole image sequence the LLM receives) gets them packed
first: from that stage on, one row per image holding the tokens
:meth:`~.adapter.Adapter.assemble` hands the LLM (base view, unpadded crops,
newline tokens), and those rows go to the LLM as they come out.  Query-aware
stages get the prompt's text after the image, embedded by the LLM's input
embeddings, as the query (after the projector it lives in the same space as
the visual tokens).

:meth:`PreLLM.shorten` reads a forward's (or generate's) keyword arguments and
returns those the model's own forward gets instead, writing what it did into
the :class:`~.call.Call` (``pre_llm``, ``vision_ms``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from arrcoc import ops
from arrcoc.errors import InputError, ModelError
from arrcoc.pipeline import Pipeline
from arrcoc.state import TokenState
from arrcoc.timing import clock

from . import compat
from .adapter import Adapter
from .call import Call
from .prompt import (image_slots, padding_mask, placeholder_mask, shrink_embeds, shrink_prompts, source_cells,
                     source_columns)
from .vision import VisionTower

PROJECTOR_CHOICES = ("auto", "before", "after")


def split_stages(stages: list, projector: str) -> tuple[list, list]:
    """A pipeline's ``(label, plugin)`` stages split into those before and after the model's projector
    (``projector``: ``"auto"`` by each stage's kind, ``"before"`` or ``"after"``); arrcoc.vllm uses it too."""
    if projector == "before":
        return [], list(stages)
    if projector == "after":
        return list(stages), []
    first = next((i for i, (_, p) in enumerate(stages) if p.stage != "vision"), len(stages))
    for label, plugin in stages[first:]:
        if plugin.stage == "vision":
            raise ModelError(
                f"{label} ({plugin.name}) runs on vision features, but an earlier stage ({stages[first][0]}) runs "
                "after the projector; reorder the stages or pass projector='before' / 'after'"
            )
    return list(stages[:first]), list(stages[first:])


def packs_images(plugin: Any) -> bool:
    """Whether a stage acts on each image as the one sequence the LLM receives (its ``packed_images`` flag)."""
    return bool(getattr(plugin, "packed_images", False))


def packed_state(state: TokenState, features: list[torch.Tensor], layout: list[tuple[int, int]]) -> TokenState:
    """The state of multi-view images (one row per view) as one row per image: ``features`` (what
    :meth:`~.adapter.Adapter.assemble` made of ``state``: the LLM's image sequences), each on a one-row grid
    ``(1, n_i)``; each image keeps its first view's query and question text (``meta["query_text"]``, one string
    per row), and the trace and meta (``views`` dropped)."""
    from .vision import ragged_state

    grids = [(1, int(f.shape[0])) for f in features]
    packed = ragged_state(features, grids, None, {})
    first_view = torch.tensor([0] + [1 + r * c for r, c in layout][:-1], device=state.device).cumsum(0)
    query = None if state.query is None else state.query[first_view]
    query_mask = None if state.query_mask is None else state.query_mask[first_view]
    meta = {k: v for k, v in state.meta.items() if k != "views"}
    if meta.get("query_text") is not None:  # per row like the query: one string per image from here on
        meta["query_text"] = tuple(meta["query_text"][i] for i in first_view.tolist())
    packed = packed.replace(query=query, query_mask=query_mask)
    return dataclasses.replace(packed, meta={**meta, "grids": grids}, trace=state.trace)


class PreLLM:
    """The pre-LLM part of a pipeline inside one model: its tower (``encoder``) and the stages before and after
    the projector."""

    def __init__(self, model: Any, adapter: Adapter, pipeline: Pipeline, encoder: VisionTower, projector: str,
                 tokenizer: Any = None) -> None:
        if projector not in PROJECTOR_CHOICES:
            raise InputError(f"arrcoc.hf.apply: projector must be one of {PROJECTOR_CHOICES}, got {projector!r}")
        self.model, self.adapter, self.pipeline, self.encoder = model, adapter, pipeline, encoder
        self.tokenizer = tokenizer  # decodes the prompt's text for stages that need it as text (query_text)
        self.vision_stages, self.projector_stages = split_stages(pipeline.stages, projector)

    @property
    def active(self) -> bool:
        """Whether the pipeline has pre-LLM stages (else the model encodes its images itself)."""
        return bool(self.vision_stages or self.projector_stages)

    def image_inputs(self, kwargs: dict) -> dict:
        """The call's image inputs besides ``pixel_values`` (e.g. LLaVA-NeXT's ``image_sizes``)."""
        return {name: kwargs[name] for name in self.adapter.image_input_names if kwargs.get(name) is not None}

    def encoding_overrides(self, kwargs: dict) -> dict:
        """The call's arguments that make the model encode its images otherwise than its config says (LLaVA's
        ``vision_feature_layer`` / ``vision_feature_select_strategy``)."""
        config = self.model.config
        return {name: kwargs[name] for name in self.adapter.config_only_inputs
                if kwargs.get(name) is not None and _as_list(kwargs[name]) != _as_list(getattr(config, name, None))}

    def check_placeholders(self, ids: torch.Tensor | None, kwargs: dict) -> None:
        """Images and placeholders must match (the model itself would fail with a less helpful message).  A call
        encoding otherwise than the config is left to the model's own check: the counts here follow the config
        (a per-call select strategy 'full' gives each image one placeholder more)."""
        pixels = kwargs.get("pixel_values")
        if pixels is not None and ids is not None and not self.encoding_overrides(kwargs):
            counts = self.adapter.tokens_per_image(pixels, self.image_inputs(kwargs))
            image_slots(ids, self.adapter.image_token_id, counts)

    def shorten(self, call: Call, kwargs: dict) -> dict:
        """Encode, run the pre-LLM stages, shrink the prompts: the kwargs for the model's own forward (or
        generate); ``call.pre_llm`` and ``call.vision_ms`` say what was done."""
        adapter = self.adapter
        original = dict(kwargs)
        kwargs = dict(kwargs)
        pixels = kwargs.pop("pixel_values")
        for name, given in self.encoding_overrides(kwargs).items():
            # The model would encode the images with the call's value; the stages run on the config's.
            configured = getattr(self.model.config, name, None)
            raise InputError(
                f"arrcoc.hf: this call gives {name}={given!r}, the model's config {configured!r}; pre-LLM stages "
                f"encode the images as the config says: set model.config.{name} = {given!r} before "
                "arrcoc.hf.apply instead of passing it to the call"
            )
        image_inputs = self.image_inputs(kwargs)
        for name in image_inputs:
            kwargs.pop(name)
        ids = kwargs.get("input_ids")
        # A forward may get the dict of 4-D masks generate prepares for a static cache or a compiled forward;
        # the shortened prompt gets a 2-D mask the model expands itself.
        cache = compat.cache_of(kwargs)
        attention_mask = padding_mask(kwargs.get("attention_mask"), 0 if cache is None else cache.get_seq_length())
        original["attention_mask"] = attention_mask
        # generate may get both: the embeddings are the prefill's prompt, the ids what it returns before the new tokens.
        embeds = kwargs.get("inputs_embeds")
        # A prompt given as embeddings: its image slots are where the image token's embedding is (as transformers).
        is_image = placeholder_mask(ids if embeds is None else None, embeds, adapter.image_token_id, adapter.embed)
        per_image = adapter.tokens_per_image(pixels, image_inputs)
        _, image_of, _ = image_slots(ids, adapter.image_token_id, per_image, placeholders=is_image)
        start = clock(pixels)
        with torch.inference_mode(torch.is_inference_mode_enabled()):
            state = self.encoder.encode_inputs(pixels, image_inputs)
            vision_ms = (clock(pixels) - start) * 1e3
            layout = adapter.view_layout(image_inputs)
            if layout is not None:
                state = state.with_meta(views=layout)
            if any(need in p.requirements() for _, p in [*self.vision_stages, *self.projector_stages]
                   for need in ("query", "query_text")):
                state = self._prompt_query(state, ids, embeds, is_image, attention_mask, image_of, layout)
            state = self.pipeline.run_stages(state, self.vision_stages)
            state = self.encoder.project(state)
            stages, packed_stages = self.projector_stages, []
            if layout is not None:
                self._refuse_packing_before_the_projector()
                first = next((i for i, (_, p) in enumerate(stages) if packs_images(p)), len(stages))
                stages, packed_stages = stages[:first], stages[first:]
            state = self.pipeline.run_stages(state, stages)
            if packed_stages:
                state = packed_state(state, adapter.assemble(state, image_inputs), layout)
                state = self.pipeline.run_stages(state, packed_stages)
        if packed_stages:  # already the LLM's sequences, one row per image
            features = [state.tokens[i, : int(n)] for i, n in enumerate(state.counts.tolist())]
        else:
            features = adapter.assemble(state, image_inputs)
        counts = torch.tensor([f.shape[0] for f in features], device=is_image.device)
        if embeds is None:
            new_ids, new_mask, index, valid = shrink_prompts(ids, attention_mask, adapter.image_token_id,
                                                             adapter.pad_token_id, per_image, counts)
            kwargs.update(input_ids=new_ids)
        else:
            pad = adapter.embed(torch.tensor(adapter.pad_token_id, device=embeds.device))
            image = adapter.embed(torch.tensor(adapter.image_token_id, device=embeds.device))
            new_embeds, new_mask, index, valid = shrink_embeds(embeds, is_image, attention_mask, pad, per_image,
                                                               counts, image)
            kwargs.update(inputs_embeds=new_embeds)
            if ids is not None:  # the same columns, or generate's output would not line up with its prompt
                kwargs.update(input_ids=ids.gather(1, index).masked_fill(~valid, adapter.pad_token_id))
        kwargs.update(attention_mask=new_mask, **adapter.feature_kwargs(features))
        given = kwargs.get("position_ids")
        if given is not None:
            # The caller's numbering of the long prompt does not fit the short one: its real tokens are numbered
            # as generate does; the caller's masked columns keep the caller's numbers (generate numbers the next
            # token after the last column, padding on the right included), the padding added in front 0.
            numbered = new_mask.cumsum(1) - 1
            if given.ndim == 2 and given.shape == is_image.shape:
                padding = given.to(numbered.device).gather(1, index).masked_fill(~valid, 0)
            else:
                padding = torch.zeros_like(numbered)
            kwargs["position_ids"] = torch.where(new_mask.bool(), numbered, padding)
        if adapter.multimodal_rope and ids is None:
            # A prompt given as embeddings alone: the model numbers it as text (generate's own rule without ids),
            # the short one too; only each column's modality goes with it.
            mm = original.get("mm_token_type_ids")
            if mm is not None and mm.shape == is_image.shape:
                kwargs["mm_token_type_ids"] = mm.gather(1, index).masked_fill(~valid, 0)
        else:
            if adapter.multimodal_rope:
                # Each kept token takes the position of its own original cell, not of the j-th placeholder.
                grids = state.meta.get("grids") or [state.grid] * state.B
                cells = source_cells(state.positions, state.mask, grids)
                index = source_columns(ids, adapter.image_token_id, per_image, index, valid, cells)
            kwargs.update(adapter.shortened_kwargs({**original, **image_inputs}, index, valid))
        call.pre_llm = state
        call.vision_ms = vision_ms
        return kwargs

    def _refuse_packing_before_the_projector(self) -> None:
        """Multi-view images are packed in the LLM's space (newline tokens): a stage that wants them packed must run
        after the projector."""
        for label, plugin in self.vision_stages:
            if packs_images(plugin):
                raise ModelError(
                    f"{label} ({plugin.name}) acts on each image as the sequence the LLM receives (base view, crops, "
                    f"newline tokens), which exists only after the {self.adapter.family} projector; let it run after "
                    "the projector (projector='auto' or 'before')"
                )

    def _prompt_query(self, state: TokenState, ids: torch.Tensor | None, embeds: torch.Tensor | None,
                      is_image: torch.Tensor, attention_mask: torch.Tensor | None, image_of: torch.Tensor,
                      layout: list[tuple[int, int]] | None) -> TokenState:
        """Each image's query: the LLM input embeddings of its prompt's text after the last image token
        (``embeds``: the prompt given as embeddings, else ``ids``)."""
        B, L = is_image.shape
        device = is_image.device
        real = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
        pos = torch.arange(L, device=device).expand(B, L)
        last = torch.where(is_image, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
        text = real & ~is_image & (pos > last)
        index, valid = ops.pack(text, end=True)
        if embeds is None:
            emb = self.adapter.embed(ids.gather(1, index))
        else:
            emb = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        emb = emb * valid[..., None]
        images = state.B if layout is None else len(layout)
        row_of_image = torch.zeros(images, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)[:, None].expand(B, L)
        row_of_image[image_of[is_image]] = rows[is_image]
        if layout is not None:  # every view of an image asks its image's question
            views = torch.tensor([1 + r * c for r, c in layout], device=device)
            row_of_image = row_of_image.repeat_interleave(views)
        if bool((~valid.any(1))[row_of_image].any()):
            raise InputError("arrcoc.hf: a query-aware stage needs text after the image in every prompt")
        state = state.replace(query=emb[row_of_image].to(state.dtype), query_mask=valid[row_of_image])
        if self.tokenizer is not None and ids is not None:
            # The question as text (one string per state row): the same tokens, decoded with the model's tokenizer.
            text_ids = ids.gather(1, index)
            texts = self.tokenizer.batch_decode([row[ok].tolist() for row, ok in zip(text_ids, valid)],
                                                skip_special_tokens=True)
            state = state.with_meta(query_text=tuple(texts[r] for r in row_of_image.tolist()))
        return state


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
