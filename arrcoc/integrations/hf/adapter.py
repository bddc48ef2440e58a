"""The adapter contract: what the shared core needs to know about one model family.

The shared core (:mod:`.apply`, :mod:`.engine`, :mod:`.prompt`) never names a
model class.  An adapter file per family (``llava.py``, ...) subclasses
:class:`Adapter`, lists the ``transformers`` classes it serves in
``model_classes`` and is registered with :func:`register_adapter`;
:func:`adapter_for` picks it by the model's class (or a base class).

An adapter answers four questions:

1. **Vision**: run the tower on ``pixel_values`` and return the hidden states
   of every layer (:meth:`vision_hidden_states`), the feature layer and CLS
   handling (:attr:`feature_layer`, :attr:`has_cls`), the patch grid
   (:meth:`grid`), a layer's attention inputs (:meth:`vision_qk`) and the
   projector (:meth:`project`).
2. **Prompt**: the image placeholder id and the pad id; how image features
   are handed to the model's own ``forward`` / ``generate``
   (:meth:`feature_kwargs`).
3. **LLM**: the decoder layers, their attention modules, the text config,
   the input embeddings and the rotary embedding (:meth:`rotary`).
4. **Names**: ``family`` for messages and reports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from arrcoc.errors import ModelError

_ADAPTERS: list[type["Adapter"]] = []


class Adapter(ABC):
    """Base of the per-family adapters; see the module docstring for the contract."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------- vision
    @property
    @abstractmethod
    def vision_tower(self) -> torch.nn.Module:
        """The vision tower module."""

    @property
    @abstractmethod
    def feature_layer(self) -> int:
        """Index into the tower's hidden states whose rows become the image features."""

    @property
    @abstractmethod
    def has_cls(self) -> bool:
        """Whether the tower's sequence starts with a class token (dropped from the features)."""

    @property
    @abstractmethod
    def num_vision_layers(self) -> int:
        """Number of layers of the vision tower."""

    @abstractmethod
    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``num_layers + 1`` hidden states; entry ``i`` is the input of layer ``i``."""

    @abstractmethod
    def vision_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-head ``(q, k, scale)`` ``[B, heads, N, head_dim]`` of vision layer ``layer`` on its input ``hidden``."""

    @abstractmethod
    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of ``pixel_values``."""

    @abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The multimodal projector: vision features -> LLM input space."""

    # ------------------------------------------------------------- prompt
    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""

    @property
    @abstractmethod
    def pad_token_id(self) -> int:
        """Id used to left-pad rebuilt prompts."""

    @abstractmethod
    def feature_kwargs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments that hand per-image features ``[K_i, D]`` to the model instead of pixels."""

    # ---------------------------------------------------------------- LLM
    @property
    @abstractmethod
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (with ``layers``, ``rotary_emb``, input embeddings)."""

    @property
    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.language_model.layers)

    def attention_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` serve the classes named in its ``model_classes``."""
    if not cls.model_classes:
        raise ModelError(f"adapter {cls.__name__}: model_classes is empty")
    _ADAPTERS.append(cls)
    return cls


def supported_models() -> list[str]:
    return sorted(name for cls in _ADAPTERS for name in cls.model_classes)


def adapter_for(model: Any) -> Adapter:
    """The adapter serving ``model``'s class (or one of its bases); a clear error otherwise."""
    mro = [c.__name__ for c in type(model).__mro__]
    for name in mro:
        for cls in _ADAPTERS:
            if name in cls.model_classes:
                return cls(model)
    raise ModelError(
        f"arrcoc.hf: no adapter for {type(model).__name__}; supported: {', '.join(supported_models())}"
    )
