"""The multimodal-processor side of arrcoc's vLLM classes, shared by every family (mixins before vLLM's classes).

For a query-aware pipeline the processor adds each prompt's text after its
last image (token ids, field :data:`QUERY_FIELD`) to every image of it, and
folds those ids into the image's hash: vLLM keys its encoder-output cache
and its prefix cache by that hash, so one prompt's selection is never handed
to another prompt about the same image.  Its processor cache is bypassed for
such pipelines (it would cache an image's inputs without the prompt).
Image embeddings are refused: a pipeline needs the pixels' tower signals.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import cached_property
from typing import Any, Sequence

import torch
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldConfig, MultiModalFieldElem, \
    MultiModalKwargsItem
from vllm.multimodal.parse import ImageEmbeddingItems

from arrcoc.errors import InputError

from .settings import Settings, query_aware, settings_from_config

#: Multimodal field holding, per image, the token ids of its prompt's text after the last image (query-aware).
QUERY_FIELD = "arrcoc_query_ids"


def query_ids(prompt: list[int], image_token_id: int) -> list[int]:
    """The prompt's text after its last image placeholder (what ``arrcoc.hf.apply`` embeds as the query)."""
    last = max((i for i, t in enumerate(prompt) if t == image_token_id), default=-1)
    return [t for t in prompt[last + 1:] if t != image_token_id]


def keyed_hash(item_hash: str, ids: list[int]) -> str:
    """An image's hash made specific to one query (the encoder-output and prefix caches key by it)."""
    return hashlib.sha256(f"{item_hash}|arrcoc-query|{','.join(map(str, ids))}".encode()).hexdigest()


def embed_queries(model: Any, queries: Any, device: torch.device, *,
                  reads_query: bool) -> list[torch.Tensor] | None:
    """Each image's query ids (the :data:`QUERY_FIELD` vLLM hands ``embed_multimodal``) embedded by the LLM's own
    input embeddings; ``None`` when the pipeline reads no query."""
    if not reads_query:
        return None
    if queries is None:
        raise InputError(f"arrcoc.vllm: the query-aware pipeline got images without their prompt's text "
                         f"({QUERY_FIELD!r} is missing)")
    rows = list(queries) if not isinstance(queries, torch.Tensor) or queries.ndim == 2 else [queries]
    return [model.language_model.embed_input_ids(ids.to(device).long()) for ids in rows]


class ArrcocProcessingInfo:
    """The engine's settings, read from the HF config (a mixin before vLLM's ``ProcessingInfo``)."""

    @cached_property
    def arrcoc_settings(self) -> Settings:
        return settings_from_config(self.get_hf_config())

    @cached_property
    def arrcoc_query_aware(self) -> bool:
        return query_aware(self.arrcoc_settings.spec)

    @property
    def arrcoc_image_token_id(self) -> int:
        """The id of the image placeholder in prompts (families name it differently in their configs)."""
        config = self.get_hf_config()
        token = getattr(config, "image_token_id", None)
        return int(config.image_token_index if token is None else token)


class ArrcocMultiModalProcessor:
    """Query-aware inputs and hashes, and the refusal of image embeddings (a mixin before vLLM's processor)."""

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> dict[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if self.info.arrcoc_query_aware:
            fields[QUERY_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _query(self, prompt: Sequence[int]) -> list[int]:
        ids = query_ids(list(prompt), self.info.arrcoc_image_token_id)
        if not ids:
            raise InputError(
                f"arrcoc.vllm: pipeline {self.info.arrcoc_settings.spec.name!r} is query-aware and needs text after "
                "the last image of the prompt (the question); the prompt has none"
            )
        return ids

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)
        if not self.info.arrcoc_query_aware:
            return hashes
        ids = self._query(inputs.prompt)
        return {modality: [keyed_hash(h, ids) for h in items] for modality, items in hashes.items()}

    def _cached_apply_hf_processor(self, inputs: Any, timing_ctx: Any) -> Any:
        images = inputs.mm_data_items.get("image")
        if isinstance(images, ImageEmbeddingItems):
            raise InputError(
                "arrcoc.vllm: image embeddings cannot be reduced by arrcoc (the pipeline needs the tower's "
                "attention and the features of the pixels); send the images themselves"
            )
        if self.info.arrcoc_query_aware:
            # The processor cache keys an image's inputs by its hash alone; a query-aware image carries its prompt.
            return self._apply_hf_processor(inputs, timing_ctx)
        return super()._cached_apply_hf_processor(inputs, timing_ctx)

    def _apply_hf_processor(self, inputs: Any, timing_ctx: Any) -> Any:
        result = super()._apply_hf_processor(inputs, timing_ctx)
        if not self.info.arrcoc_query_aware or "image" not in result.kwargs:
            return result
        ids = torch.tensor(self._query(inputs.prompt), dtype=torch.long)
        field = MultiModalBatchedField()
        items = [MultiModalKwargsItem({**item, QUERY_FIELD: MultiModalFieldElem(data=ids, field=field)})
                 for item in result.kwargs["image"]]
        result.kwargs["image"] = items
        return result

    def get_dummy_inputs(self, seq_len: int, mm_counts: Any, mm_options: Any) -> Any:
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        if not self.info.arrcoc_query_aware:
            return inputs
        # The profiling prompt is images only; a query-aware pipeline needs a word after them.
        eos = getattr(self.info.get_tokenizer(), "eos_token_id", None)
        return dataclasses.replace(inputs, prompt=[*inputs.prompt, 0 if eos is None else int(eos)])
