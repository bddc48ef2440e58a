"""The adapter contract: what the shared core needs to know about one model family.

The shared core (:mod:`.apply`, :mod:`.engine`, :mod:`.prompt`) never names a
model class.  An adapter file per family (``llava.py``, ...) subclasses
:class:`Adapter`, lists the ``transformers`` classes it serves in
``model_classes`` and is registered with :func:`register_adapter`;
:func:`adapter_for` picks it by the model's class (or a base class).

An adapter answers four questions:

1. **Vision**: run the tower on a batch of images (:meth:`encode_images`:
   per-image features and grids, class tokens, every layer's hidden
   states when attention signals are wanted), a layer's attention inputs
   (:meth:`vision_qk`, towers with a class token), the attention each token
   receives in the tower (:attr:`attention_received_layer`; ``encode_images(...,
   received=True)``, towers that give it), the projector
   (:meth:`project`; ``projected`` towers return LLM-space features), and
   the placeholders per image (:meth:`tokens_per_image`), and what the
   budget rules need to know of an image (:meth:`budget_context`).
2. **Prompt**: the image placeholder id and the pad id; how image features
   are handed to the model's own ``forward`` / ``generate``
   (:meth:`feature_kwargs`) and what else a shortened prompt needs
   (:meth:`shortened_kwargs`: e.g. multimodal rotary positions computed
   from the original prompt).
3. **LLM**: the decoder layers, their attention modules, the text config,
   the input embeddings, the rotary embedding (:meth:`rotary`; one table per
   layer type where the types differ, :attr:`rotary_per_layer_type`) and the
   blocks of the prompt that attend both ways (:meth:`attention_blocks`,
   Gemma 3's images), which the engine keeps when it rebuilds a layer's mask.
4. **Names**: ``family`` for messages and reports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch

from arrcoc.errors import ModelError
from arrcoc.state import TokenState

_ADAPTERS: list[type["Adapter"]] = []


#: Most attention logits held at once by the attention-received signals of towers without a class token
#: (float32: 256 MiB): the queries (or tiles) are taken in chunks that fit, so a large image never holds its whole
#: ``heads x N x N`` matrix.
RECEIVED_CHUNK_ELEMENTS = 1 << 26


def received_sums(q: torch.Tensor, k: torch.Tensor, scale: float, key_bias: torch.Tensor | None = None,
                  query_real: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, heads, L]``: the softmax attention each key receives, summed over the queries, from ``q`` / ``k``
    ``[B, heads, L, hd]`` (``key_bias``: added to the logits, e.g. -inf at padded keys; ``query_real`` ``[B, L]``:
    the queries that count), the queries in chunks of at most :data:`RECEIVED_CHUNK_ELEMENTS` logits.  The towers'
    "attention received" signals (VisPruner's rule without a class token) divide it by their query counts."""
    B, heads, L, _ = q.shape
    received = torch.zeros(B, heads, L, dtype=q.dtype, device=q.device)
    chunk = max(1, RECEIVED_CHUNK_ELEMENTS // max(1, B * heads * L))
    for start in range(0, L, chunk):
        logits = (q[:, :, start:start + chunk] @ k.transpose(-1, -2)) * scale
        probs = (logits if key_bias is None else logits + key_bias).softmax(-1)
        if query_real is not None:
            probs = probs * query_real[:, None, start:start + chunk, None]  # padded queries count for nothing
        received += probs.sum(2)
    return received


class VisionOutput(NamedTuple):
    """What :meth:`Adapter.encode_images` returns for a batch of images."""

    features: list[torch.Tensor]          # per image [n_i, D]: vision space, or LLM space if ``projected``
    grids: list[tuple[int, int]]          # per image (rows, cols) of its feature grid, rows * cols = n_i
    cls: torch.Tensor | None              # [images, D_vision] class tokens, or None
    hidden_states: tuple | None           # every layer's input [images, P + N, D_vision] (for attention signals)
    #: per image [n_i]: the attention each token receives in vision block ``attention_received_layer`` (query
    #: mean, then head mean), asked with ``received=True``; None otherwise
    received: list[torch.Tensor] | None = None
    #: name -> per image [n_i, ...]: more values the LLM takes with each token (Qwen3-VL's DeepStack planes); they
    #: become per_token fields of the state, so every stage moves them with the tokens (``ops.keep`` gathers them,
    #: ``ops.merge`` averages them with the tokens' weights) and :meth:`Adapter.assemble` reads them back
    per_token: dict[str, list[torch.Tensor]] | None = None


class Adapter(ABC):
    """Base of the per-family adapters; see the module docstring for the contract."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: Model keyword arguments that describe the images besides ``pixel_values`` (e.g. ``image_grid_thw``).
    image_input_names: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`encode_images` already returns features in the LLM's input space (no separate projector).
    projected: ClassVar[bool] = False
    #: Whether the LLM uses multimodal rotary positions (a compact renumbering is then undefined).
    multimodal_rope: ClassVar[bool] = False
    #: Model keyword arguments that change the image features per call (LLaVA's ``vision_feature_layer``): pre-LLM
    #: stages encode the images as the config says, so a call giving another value is refused, not ignored.
    config_only_inputs: ClassVar[tuple[str, ...]] = ()
    #: Whether the decoder's layer types (``text_config.layer_types``) have rotary tables of their own (Gemma 3:
    #: local and global bases): :meth:`rotary` then returns ``{layer type: (cos, sin)}``.
    rotary_per_layer_type: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------- vision
    @property
    def has_cls(self) -> bool:
        """Whether the tower's sequence starts with a class token (then CLS attention can be read)."""
        return False

    @property
    @abstractmethod
    def num_vision_layers(self) -> int:
        """Number of layers of the vision tower."""

    @property
    def default_attention_layer(self) -> int:
        """The vision layer whose attention signals are read by default."""
        return self.num_vision_layers - 1

    @property
    def feature_width(self) -> int:
        """Width of the tower's features before the projector (several feature layers concatenated: their sum)."""
        return int(self.model.config.vision_config.hidden_size)

    @property
    def attention_received_layer(self) -> int | None:
        """The vision block whose attention gives each token the attention it *receives* (every query's
        softmax row averaged, then the heads; VisPruner's official rule for towers without a class token), for a
        tower that gives it: its :meth:`encode_images` then takes ``received=True`` and fills
        ``VisionOutput.received``.  ``None`` (default): the tower gives no such signal."""
        return None

    @property
    def num_vision_heads(self) -> int:
        """Attention heads of the tower's layers (the attention signals are head means over this many)."""
        vc = self.model.config.vision_config
        heads = getattr(vc, "num_heads", None) or getattr(vc, "num_attention_heads", None)
        if heads is None:
            raise ModelError(f"{self.family}: the vision config states no head count")
        return int(heads)

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool
                      ) -> VisionOutput:
        """Run the tower on a batch of images; ``keep_hidden`` asks for every layer's input hidden states.

        An adapter whose :attr:`attention_received_layer` is set also takes ``received: bool`` (keyword): the
        attention each token receives, per image, in ``VisionOutput.received``; the others are never asked.
        """

    @abstractmethod
    def tokens_per_image(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[int]:
        """Image placeholders each image takes in the prompt (before any compression)."""

    def vision_qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-head ``(q, k, scale)`` ``[B, heads, N, head_dim]`` of vision layer ``layer`` on its input ``hidden``."""
        raise ModelError(f"{self.family}: the vision tower's attention cannot be read per layer")

    def signal_per_token(self, values: torch.Tensor) -> torch.Tensor:
        """The tower's per-patch attention signals ``[images, patches, ...]`` (CLS attention, keys of the layer
        whose attention is read; the class row already dropped) as one value per feature token ``[images, n,
        ...]``, for a tower whose tokens fold several patches before the projector (InternVL's pixel shuffle: the
        mean over a token's patches).  Default: each token is one patch, the values as they are."""
        return values

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The multimodal projector: vision features -> LLM input space (identity when ``projected``)."""
        return features

    def downsampling(self, processor: Any, tokens: int) -> tuple[dict[str, Any], Any, tuple[int, int]]:
        """The image-downsampling baseline (``arrcoc eval``): a smaller input image with about ``tokens``
        visual tokens, through the model's own processor.

        Returns ``(processor kwargs, context manager inside which the model accepts such images, the
        feature grid (rows, cols))``.
        """
        raise ModelError(
            f"{self.family}: no image-downsampling path is implemented for this family (arrcoc implements it for "
            "LLaVA-1.5, whose CLIP tower interpolates its position embeddings to a smaller image)"
        )

    def budget_context(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image, what the budget rules need to set a pipeline for it: the keyword arguments of
        :func:`arrcoc.budget.plan_budget` (``original``: the image's placeholders in the prompt, ``grid``: its
        feature grid ``(rows, cols)``, ``has_cls``, ``layers``: decoder layers, ``encoder_layers``: the tower's
        blocks up to the one whose attention signals are read, counted).  ``arrcoc eval`` plans every method's
        budget from it.

        A family answers it from the processor's inputs and the config, without running the model (LLaVA-1.5,
        Qwen2-VL).  This default, for a family that does not, reads the grids and class token from one forward of
        the tower (:meth:`encode_images`), as ``arrcoc eval`` did for every family before; what the tower
        refuses is refused with its error.
        """
        with torch.inference_mode():
            out = self.encode_images(pixel_values, image_inputs, keep_hidden=False)
        contexts = self._budget_contexts(self.tokens_per_image(pixel_values, image_inputs), list(out.grids))
        return [{**context, "has_cls": out.cls is not None} for context in contexts]

    def _budget_contexts(self, tokens: list[int], grids: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """:meth:`budget_context` of images with ``tokens`` placeholders and feature ``grids``; the rest is the
        model's: its decoder depth, its class token, the blocks up to :attr:`default_attention_layer`."""
        layers, encoder_layers = len(self.decoder_layers), self.default_attention_layer + 1
        return [{"original": int(n), "grid": (int(rows), int(cols)), "layers": layers, "has_cls": self.has_cls,
                 "encoder_layers": encoder_layers} for n, (rows, cols) in zip(tokens, grids)]

    def view_layout(self, image_inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """Multi-view images (LLaVA-NeXT): each image's crop grid; its ``1 + rows * cols`` views are
        consecutive state rows.  ``None``: one state row per image."""
        return None

    def llm_hooks(self, sequence: Any) -> list[Any]:
        """What the model needs, for as long as a Run lasts, to follow a sequence that ``llm:`` stages changed
        between decoder layers, for a model that adds something at given positions between its layers (Qwen3-VL's
        DeepStack planes, added at the visual positions after the first decoder layers): handles with ``remove()``.
        ``sequence()`` is the :class:`~.call.Segment` the layers now run see during a prefill (each entry's
        original column, which entries are visual), or None while the sequence is the model's own.  Default:
        nothing to install."""
        return []

    def assemble(self, state: TokenState, image_inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image, the feature rows handed to the LLM, from the final state (default: one row each)."""
        return [state.tokens[i, : int(n)] for i, n in enumerate(state.counts.tolist())]

    # ------------------------------------------------------------- prompt
    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""

    @property
    def pad_token_id(self) -> int:
        """Id used to left-pad rebuilt prompts."""
        pad = getattr(self.text_config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def feature_kwargs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments that hand per-image features ``[K_i, D]`` to the model instead of pixels."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}

    def shortened_kwargs(self, kwargs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        """Model kwargs for a prompt shortened to columns ``index`` (``valid``) of the original ``kwargs``.

        ``kwargs`` still holds the original ``input_ids`` / ``attention_mask``
        and image inputs.  Default: nothing more to pass.
        """
        return {}

    @property
    def position_state(self) -> Any:
        """What the model keeps between calls to number a conversation continued from its cache (Qwen's
        ``rope_deltas``), saved with a cache that holds a shortened prompt and put back when that conversation
        goes on; ``None``: nothing (positions follow from the attention mask alone)."""
        return None

    @position_state.setter
    def position_state(self, value: Any) -> None:
        pass

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

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """``(cos, sin)`` of ``position_ids`` for every decoder layer, or ``{layer type: (cos, sin)}``
        (:attr:`rotary_per_layer_type`)."""
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def attention_blocks(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """``[B, L]``: per column of the prompt the LLM gets (``inputs``: a prefill forward's keyword arguments,
        after any pre-LLM shortening), the block it belongs to, whose entries attend to each other both ways on top
        of the causal mask (Gemma 3: the tokens of one image), -1 for causal columns.  ``None`` (default): causal
        everywhere.  The engine gives the tokens it keeps their blocks when it rebuilds a layer's mask."""
        return None


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
