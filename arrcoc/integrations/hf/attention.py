"""Attention rows without eager attention: a registered attention function.

``transformers`` looks the attention function up by the name in
``config._attn_implementation``.  :func:`scoring_implementation` registers
``arrcoc_<base>`` (``base`` = ``sdpa`` or ``eager``) that computes the
softmax of **only the query rows a stage asked for** (the last token, the
text rows, or every row's logits for PageRank) and then calls the stock
``base`` function for the layer's output, so every layer keeps its kernel.
The mask function of ``base`` is registered under the same name (without it
mask creation returns ``None`` for an unknown name and padding would be
silently ignored; see shared HF.md).

A :class:`Recorder` says, per decoder layer, which rows to record; the
attention function finds the recorder of the module's model through
:data:`_RECORDERS` (keyed by the attention module), so several models can be
patched at once and an unpatched model pays nothing.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from arrcoc.errors import ModelError

#: Attention implementations a scoring function can wrap.
SUPPORTED_BASES = ("sdpa", "eager")

_RECORDERS: "weakref.WeakKeyDictionary[torch.nn.Module, Recorder]" = weakref.WeakKeyDictionary()

#: Whether :func:`probe_last_row` spares the projections the probed row does not read (see
#: :func:`_needed_projections_only`); off, the module projects every row's query, key and value.
PROBE_SHORTCUT = True

#: Rows of the query block the shortcut projects per prompt.  Not one row: BLAS computes a product of a few rows
#: with a matrix-vector kernel that sums in another order (MKL: under 4 rows), so the last row alone would
#: differ from its row of the full projection in the last bits; a block of 16 goes through the same
#: matrix-matrix kernel and is bit-identical (tests/integrations/test_hf_llm_signals.py checks it on the CPU; a
#: GPU BLAS that picks its kernel by the row count, a split-K one for few rows, could round the block otherwise).
_QUERY_BLOCK = 16


@dataclass
class Recorder:
    """What to record at which layer, and what was recorded during one forward.

    ``requests[layer]`` is a set of signals: ``"last"`` (the last query row),
    ``"text"`` (the rows given by ``text_rows()``), ``"logits"`` (every
    row's masked pre-softmax logits, for PageRank), ``"key_norms"`` (each
    key's L1 norm over the heads, concatenated after the key heads are
    repeated).  Results land in ``results()[layer][signal]``: head-mean
    probabilities ``[B, R, Lk]`` (fp32) for rows, ``[B, H, L, L]`` logits
    (fp32) for ``"logits"``, ``[B, Lk]`` (fp32) for ``"key_norms"``.

    ``probing``: the layer whose attention module is being *probed* (see
    :func:`probe_last_row`), None otherwise.  ``last_rows()``: ``[B]`` the
    query row of each prompt's last real token (``"last"`` and the probe; a
    right-padded prompt's is before its padding), None: the last row.
    """

    requests: dict[int, set[str]] = field(default_factory=dict)
    text_rows: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    last_rows: Callable[[], torch.Tensor] | None = None
    #: Where the forward in progress records (``results[layer][signal]``), None while nothing is recorded.
    results: Callable[[], dict[int, dict[str, torch.Tensor]] | None] = lambda: None

    probing: int | None = None

    def wants(self, layer: int) -> set[str]:
        return self.requests.get(layer, set()) if self.results() is not None else set()


class _Probed(Exception):
    """Carries a probed row out of the attention module, skipping its kernel and output projection."""

    def __init__(self, row: torch.Tensor) -> None:
        super().__init__("arrcoc probe")
        self.row = row


def probe_last_row(recorder: Recorder, attention_module: torch.nn.Module, hidden: torch.Tensor,
                   kwargs: dict[str, Any]) -> torch.Tensor:
    """Head-mean attention ``[B, Lk]`` (fp32) of the last query row in ``attention_module`` on ``hidden``.

    The module runs its own projections, norms and rotary (whatever the model family does) with ``kwargs``
    (the decoder layer's mask and positions) and no cache; the scoring function computes the row from its
    post-rotary query / key and stops the module there (:class:`_Probed`), so neither its value path nor its
    kernel runs, and no cache is written.  Where the module projects with ``q_proj`` / ``v_proj`` Linear layers,
    it projects no value and only the query rows around each prompt's last token
    (:func:`_needed_projections_only`).
    """
    layer = int(attention_module.layer_idx)
    recorder.probing = layer
    try:
        # No cache under any of its names (``cache`` from transformers 5.24, ``past_key_values`` before): the
        # module's default None, so nothing is written into the KV cache of the forward in progress.
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        with _needed_projections_only(attention_module, recorder):
            attention_module(hidden_states=hidden, **rest)
    except _Probed as probed:
        return probed.row
    finally:
        recorder.probing = None
    raise ModelError(
        f"arrcoc.hf: probing decoder layer {layer}'s attention did not reach arrcoc's scoring attention function "
        f"(the module {type(attention_module).__name__} does not call the configured attention implementation)"
    )


@contextlib.contextmanager
def _needed_projections_only(module: torch.nn.Module, recorder: Recorder):
    """While the probe runs: ``module.v_proj`` returns zeros without computing (the probe stops the module before
    the values are read) and ``module.q_proj`` projects only a block of :data:`_QUERY_BLOCK` rows ending at each
    prompt's last real token (``recorder.last_rows``; the other rows are zeros).  The probed row stays bit-identical:
    every step from the projection to the scoring function is row-wise (rotary; Qwen3's and Gemma 3's ``q_norm``
    normalise each head of each row; Gemma's ``query_pre_attn_scalar`` is only the scaling), and the block's rows
    are those of the full projection (see :data:`_QUERY_BLOCK`).  Both forwards are restored on the way out, also
    when the module raises.  A module without these Linear children runs whole."""
    q_proj, v_proj = getattr(module, "q_proj", None), getattr(module, "v_proj", None)
    if not (PROBE_SHORTCUT and isinstance(q_proj, torch.nn.Linear) and isinstance(v_proj, torch.nn.Linear)):
        yield
        return
    # The forward each call reaches now: the class's, or one set on the instance (accelerate's offloading hook).
    query_forward = q_proj.forward
    saved = {q_proj: q_proj.__dict__.get("forward"), v_proj: v_proj.__dict__.get("forward")}

    def query_rows(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] <= _QUERY_BLOCK:
            return query_forward(x)
        B, L, D = x.shape
        last = (recorder.last_rows().to(x.device) if recorder.last_rows is not None
                else torch.full((B,), L - 1, dtype=torch.long, device=x.device))
        # [B, block]: the rows up to each last token, starting at 0 where the last token is among the first rows.
        rows = (last - (_QUERY_BLOCK - 1)).clamp(min=0)[:, None] + torch.arange(_QUERY_BLOCK, device=x.device)
        block = query_forward(x.gather(1, rows[:, :, None].expand(B, _QUERY_BLOCK, D)))
        return block.new_zeros(B, L, block.shape[-1]).scatter_(
            1, rows[:, :, None].expand(B, _QUERY_BLOCK, block.shape[-1]), block)

    def no_values(x: torch.Tensor) -> torch.Tensor:
        # Broadcast zeros: no memory written, and the module's view / transpose of its values still work.
        return x.new_zeros(()).expand(*x.shape[:-1], v_proj.out_features)

    q_proj.forward, v_proj.forward = query_rows, no_values
    try:
        yield
    finally:
        for projection, forward in saved.items():
            if forward is None:
                del projection.forward
            else:
                projection.forward = forward


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _row_logits(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """Masked logits ``[B, H, R, Lk]`` (fp32) of query rows ``rows`` ``[B, R]``."""
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    q = query.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], D)).float()
    logits = (q @ key.float().transpose(-1, -2)) * scaling
    if mask is None:  # sdpa's implicit causal mask: query i sits at key position Lk - Lq + i
        allowed = torch.arange(Lk, device=query.device)[None, None, :] <= (rows + Lk - Lq)[:, :, None]
        return logits.masked_fill(~allowed[:, None], float("-inf"))
    m = mask.gather(2, rows[:, None, :, None].expand(mask.shape[0], mask.shape[1], rows.shape[1], Lk))
    if m.dtype == torch.bool:
        return logits.masked_fill(~m, float("-inf"))
    return logits + m.float()


def record(recorder: Recorder, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
           mask: torch.Tensor | None, scaling: float) -> None:
    """Compute the signals ``recorder`` wants at ``module.layer_idx`` from post-RoPE ``query`` / ``key``."""
    layer = int(module.layer_idx)
    wanted = recorder.wants(layer)
    key = _repeat_kv(key, query.shape[1] // key.shape[1])
    B, _, Lq, _ = query.shape
    out = recorder.results().setdefault(layer, {})
    if "last" in wanted:
        out["last"] = _last_row(query, key, mask, scaling, recorder)[:, None]
    if "text" in wanted:
        rows, valid = recorder.text_rows()
        probs = _row_logits(query, key, mask, rows, scaling).softmax(-1).nan_to_num(0.0).mean(1)
        out["text"] = probs * valid[:, :, None]
    if "logits" in wanted:
        rows = torch.arange(Lq, device=query.device).expand(B, Lq)
        out["logits"] = _row_logits(query, key, mask, rows, scaling)
    if "key_norms" in wanted:
        # DART's ``torch.norm(any_states.permute(0, 2, 1, 3).reshape(B, L, -1), p=1, dim=-1)``, in the key dtype.
        out["key_norms"] = torch.linalg.vector_norm(key.transpose(1, 2).flatten(2), ord=1, dim=-1).float()


def _last_row(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
              recorder: Recorder) -> torch.Tensor:
    """Head-mean attention ``[B, Lk]`` of each prompt's last real token (``recorder.last_rows``)."""
    key = _repeat_kv(key, query.shape[1] // key.shape[1])
    if recorder.last_rows is None:
        rows = torch.full((query.shape[0], 1), query.shape[2] - 1, dtype=torch.long, device=query.device)
    else:
        rows = recorder.last_rows()[:, None].to(query.device)
    return _row_logits(query, key, mask, rows, scaling).softmax(-1).mean(1)[:, 0]


def _eager_of(module: torch.nn.Module) -> Callable:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ModelError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def scoring_implementation(base: str) -> str:
    """Register (once) and return the name of the scoring attention wrapping ``base``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in SUPPORTED_BASES:
        raise ModelError(
            f"arrcoc.hf: in-LLM stages need the attention implementation 'sdpa' or 'eager', the model uses "
            f"{base!r}; load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )
    name = f"arrcoc_{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
        recorder = _RECORDERS.get(module)
        if recorder is not None:
            scaling = kwargs.get("scaling")
            scaling = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
            if recorder.probing == int(module.layer_idx):
                raise _Probed(_last_row(query, key, attention_mask, scaling, recorder))
            if recorder.wants(int(module.layer_idx)):
                record(recorder, module, query, key, attention_mask, scaling)
        fn = ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else _eager_of(module)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def attach(recorder: Recorder, attention_modules: list[torch.nn.Module]) -> None:
    for module in attention_modules:
        _RECORDERS[module] = recorder


def detach(attention_modules: list[torch.nn.Module]) -> None:
    for module in attention_modules:
        _RECORDERS.pop(module, None)
