"""Every difference between the supported ``transformers`` versions, in one place.

arrcoc supports ``transformers >= 5.18, < 6`` (:data:`MIN_VERSION`): 5.18 is
the first release whose multimodal ``forward`` / ``generate`` take
pre-computed image features (``mm_encoder_outputs``), which is how
:mod:`.apply` hands the compressed features to an unmodified model; vLLM
0.32 / 0.33 pin ``transformers < 5.20`` / ``< 5.21``, so the range must reach
that low.  What changed inside it and matters to arrcoc:

* 5.24 renamed the cache keyword of model forwards, decoder layers and the
  mask builders from ``past_key_values`` to ``cache`` (the old name is
  accepted, with a deprecation warning, until 5.40).  :func:`causal_mask`
  passes whichever keyword the installed ``create_causal_mask`` declares
  (:func:`cache_kwarg` for any other function), :func:`cache_of` reads
  whichever the caller used, :func:`output_cache` whichever an output has.

Checked, and the same from 5.18 to 5.25 (nothing to adapt): the
``mm_encoder_outputs`` layout (``{"image": BaseModelOutputWithPooling(pooler_output=[...])}``),
``get_placeholder_mask``, Qwen2-VL's ``get_rope_index(input_ids,
mm_token_type_ids, image_grid_thw, ...)``, ``AttentionInterface`` /
``AttentionMaskInterface`` registration, ``DynamicCache.layers[i].keys`` and
``get_mask_sizes(q_len, layer_idx)``, rotary embeddings returning
``(cos, sin)`` ``[B, L, head_dim]``, and model forwards without
``cache_position``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from arrcoc.errors import ModelError

#: The oldest transformers release arrcoc.hf runs on (see the module docstring for why).
MIN_VERSION = (5, 18)


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_version(version: str | None = None) -> None:
    """A clear error for a transformers release outside the supported range (``version``: the installed one)."""
    if version is None:
        import transformers

        version = transformers.__version__
    # Only the lower bound is checked here: it is known to break (generate rejects mm_encoder_outputs as an
    # unused argument); the upper one is the packaging pin's, a guess about releases that do not exist yet.
    if _release(version) < MIN_VERSION:
        low = ".".join(map(str, MIN_VERSION))
        raise ModelError(
            f"arrcoc.hf needs transformers >= {low}, < 6 (pre-computed image features through "
            f"mm_encoder_outputs appeared in {low}), found {version}; pip install 'transformers>={low},<6'"
        )


@functools.lru_cache(maxsize=None)
def _cache_keyword(function: Any) -> str:
    parameters = inspect.signature(function).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwarg(function: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a transformers function taking the KV cache (a mask builder, a forward), under
    the keyword it declares."""
    return {_cache_keyword(function): cache}


def causal_mask(config: Any, inputs_embeds: Any, attention_mask: Any, cache: Any, layer_idx: int,
                sliding: bool = False, blocks: Any = None) -> Any:
    """``create_causal_mask`` (``sliding``: ``create_sliding_window_causal_mask``, the config's window) sized
    against cache layer ``layer_idx``, under either cache keyword.

    ``blocks`` ``[B, S]`` (an adapter's :meth:`~.adapter.Adapter.attention_blocks` over the sequence): entries of
    one block (``>= 0``) also attend to each other both ways, OR-ed with the causal mask; on a sliding layer the
    window then cuts that union (``window AND (causal OR block)``, Gemma 3's ``create_masks_for_vision_model``; a
    sliding mask OR a block would let a block reach past the window).  Written as mask functions, which every
    supported release takes (``block_sequence_ids`` is newer).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    create = create_sliding_window_causal_mask if sliding else create_causal_mask
    functions: dict[str, Any] = {}
    if blocks is not None:
        functions["or_mask_function"] = _block_overlay(blocks)
        if sliding:
            create = create_causal_mask
            functions["and_mask_function"] = _window_overlay(int(config.sliding_window))
    keyword = _cache_keyword(create)
    return create(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=None,
                  layer_idx=layer_idx, **functions, **{keyword: cache})


def _block_overlay(blocks: Any) -> Any:
    """Mask function: query and key in the same block (``>= 0``).  Keys past ``blocks`` (a static cache's
    unwritten slots) are in none; indices are clamped so that they index nothing outside it."""
    last = blocks.shape[1] - 1

    def same_block(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        q_block = blocks[batch_idx, q_idx.clamp(max=last)]
        kv_block = blocks[batch_idx, kv_idx.clamp(max=last)]
        return (q_block == kv_block) & (q_block >= 0) & (kv_idx <= last)

    return same_block


def _window_overlay(window: int) -> Any:
    """Mask function: the key is fewer than ``window`` entries back (transformers' ``sliding_window_overlay``)."""

    def in_window(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx > q_idx - window

    return in_window


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward or decoder layer was called with (``cache`` from 5.24, ``past_key_values`` before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return getattr(output, "past_key_values", None) if cache is None else cache


def mark(obj: Any, name: str, value: Any, table: Any) -> None:
    """Set attribute ``name`` of ``obj`` (a KV cache) to ``value``, so copies of it (``copy.deepcopy``) carry it
    too; an object without instance attributes goes in ``table`` (a ``WeakKeyDictionary``) instead, or nowhere
    when it cannot be weakly referenced either.  ``None`` clears the mark."""
    try:
        setattr(obj, name, value)
        return
    except (AttributeError, TypeError):
        pass
    try:
        if value is None:
            table.pop(obj, None)
        else:
            table[obj] = value
    except TypeError:
        pass


def marked(obj: Any, name: str, table: Any) -> Any:
    """What :func:`mark` left on ``obj`` (``None``: nothing)."""
    value = getattr(obj, name, None)
    if value is not None:
        return value
    try:
        return table.get(obj)
    except TypeError:
        return None
