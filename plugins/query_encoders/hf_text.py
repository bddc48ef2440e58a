"""``hf_text``: a Hugging Face VLM's own tokenizer and LLM input embeddings as the query encoder.

The query lives where the LLM reads text: each word piece of the query is
looked up in the model's input embedding table.  After the projector
(``hf_vision`` with ``project: true``) the visual tokens live in the same
space, so query-aware scorers and compressors compare like with like — the
same query ``arrcoc.hf.apply`` builds from a prompt's text inside the model.
Special tokens (BOS, padding) are not part of the query.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from arrcoc.errors import InputError, ModelError
from arrcoc.hookspecs import hookimpl
from arrcoc.models import resolve_model
from arrcoc.plugin import Params, QueryEncoder


class HFTextParams(Params):
    model: str = Field(..., description="Model directory, hub id or shipped model (arrcoc:toyvqa): its tokenizer "
                       "and LLM input embeddings.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class HFText(QueryEncoder):
    """Query words -> the LLM's input embeddings of their tokens (the visual tokens' space after the projector)."""

    name = "hf_text"
    Params = HFTextParams

    def __init__(self, params: HFTextParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        from transformers import AutoTokenizer

        from arrcoc.integrations.hf.vision import load_vlm

        model = load_vlm(self.params.model, self.params.dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.params.model))
        except Exception as exc:
            raise ModelError(f"hf_text: cannot load the tokenizer of {self.params.model!r}: {exc}") from None
        self.embeddings = model.get_input_embeddings()

    def encode(self, queries: Sequence[str], *, dim: int, device: torch.device, dtype: torch.dtype):
        width = self.embeddings.embedding_dim
        if dim != width:
            raise InputError(
                f"hf_text: the LLM embeds text in {width} channels but the visual tokens have {dim}; run the "
                "encoder with `project: true` (hf_vision) so both live in the LLM's input space"
            )
        batch = self.tokenizer(list(queries), add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        special = torch.tensor([[i in self.tokenizer.all_special_ids for i in row] for row in ids.tolist()],
                               dtype=torch.bool).view_as(ids)
        mask &= ~special
        empty = [i for i, row in enumerate(mask.tolist()) if not any(row)]
        if empty:
            raise InputError(f"hf_text: queries {empty} have no token the tokenizer knows besides special tokens")
        with torch.no_grad():
            emb = self.embeddings(ids.to(self.embeddings.weight.device))
        return emb.to(device=device, dtype=dtype), mask.to(device)


@hookimpl
def arrcoc_register_plugins(register):
    register(HFText)
