"""``generate`` with a prompt arrcoc shortened: its arguments, its limits, its streamer.

Pure helpers of :class:`~.apply.Run`'s ``generate``: they read the model's
own ``generate`` signature and generation config, and change nothing else.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from arrcoc.errors import InputError


def arguments_by_name(generate: Callable, model: Any, args: tuple, kwargs: dict) -> dict:
    """``generate``'s arguments by name, as the model's own generate reads them: positional ones
    (``inputs``, ``generation_config``, ``logits_processor``, ...) are kept, and the prompt given as
    ``inputs`` (positionally or by name) is the ``input_ids`` the pre-LLM stages read and shorten."""
    if args:  # (too many of them: the TypeError generate itself raises)
        signature = inspect.signature(generate)
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
            if len(args) > 1:  # a wrapped generate that names nothing: only the prompt can be placed
                raise InputError("arrcoc.hf: this model's generate takes *args; pass its arguments after the "
                                 "prompt by name")
            return dict(kwargs, input_ids=args[0])
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = next((bound.pop(p.name, {}) for p in signature.parameters.values()
                      if p.kind is inspect.Parameter.VAR_KEYWORD), {})
        kwargs = {**bound, **extra}
    name = getattr(model, "main_input_name", "input_ids")
    if kwargs.get("inputs") is not None and name == "input_ids" and kwargs.get("input_ids") is None:
        kwargs = dict(kwargs)
        kwargs["input_ids"] = kwargs.pop("inputs")
    return kwargs


def keep_lengths(model: Any, kwargs: dict, dropped: int) -> dict:
    """``max_length`` / ``min_length`` count the caller's prompt: a prompt ``dropped`` columns shorter gets
    limits as many columns smaller, so that generate makes as many new tokens as it would without arrcoc
    (``max_new_tokens`` / ``min_new_tokens``, when set, take precedence in generate, as here)."""
    if dropped <= 0:
        return kwargs
    configs = [c for c in (kwargs.get("generation_config"), model.generation_config) if c is not None]

    def setting(name: str) -> Any:
        if kwargs.get(name) is not None:
            return kwargs[name]
        return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

    kwargs = dict(kwargs)
    max_length = setting("max_length")
    if setting("max_new_tokens") is None and max_length is not None:
        kwargs["max_length"] = max_length - dropped
    min_length = setting("min_length")
    if setting("min_new_tokens") is None and min_length:
        kwargs["min_length"] = max(min_length - dropped, 0)
    return kwargs


def inferred_mask(model: Any, ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The attention mask ``generate`` infers for ``ids`` when none is given: 0 on pad ids, unless the pad id
    is unset or is an end-of-sequence id (then every column is real)."""
    config = kwargs.get("generation_config") or model.generation_config
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    eos = set() if eos is None else set(torch.as_tensor(eos).flatten().tolist())
    if pad is None or int(pad) in eos:
        return torch.ones_like(ids)
    return (ids != int(pad)).long()


def uses_cache(model: Any, kwargs: dict) -> bool:
    """Whether ``generate`` will decode with a KV cache, as it reads it: the call's ``use_cache``, else its
    generation config's, else the model's."""
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(kwargs.get("generation_config") or model.generation_config, "use_cache", True)
    return use_cache is not False


def prompt_length(kwargs: dict) -> int:
    """Columns of the prompt a generate call got (its ids, else its embeddings; 0 for neither)."""
    prompt = kwargs.get("input_ids")
    prompt = kwargs.get("inputs_embeds") if prompt is None else prompt
    return 0 if prompt is None else int(prompt.shape[1])


def with_caller_prompt(out: Any, prompt: torch.Tensor, cut: int) -> Any:
    """``generate``'s output with the caller's ``prompt`` in front of the new tokens (those after column
    ``cut`` of what it returned): exactly the layout of generate without arrcoc."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    # num_return_sequences / beams return several rows per prompt, in prompt order.
    prompts = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], 0)
    if isinstance(out, torch.Tensor):
        return torch.cat([prompts, out[:, cut:]], 1)
    out.sequences = torch.cat([prompts, out.sequences[:, cut:]], 1)
    return out


class PromptStreamer:
    """A ``generate`` streamer handed the caller's prompt where ``generate`` puts the one arrcoc shortened
    (its first ``put``): what it streams is what ``generate`` returns.  Everything else goes to ``streamer``."""

    def __init__(self, streamer: Any, prompt: torch.Tensor) -> None:
        self._streamer, self._prompt = streamer, prompt

    def put(self, value: torch.Tensor) -> None:
        if self._prompt is not None:
            value, self._prompt = self._prompt.to(value.device), None
        self._streamer.put(value)

    def end(self) -> None:
        self._streamer.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._streamer, name)
