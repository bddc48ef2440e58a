"""``run.report``: tokens per pre-LLM stage and per decoder layer, prefill FLOPs, KV bytes, time.

FLOPs are analytic, from the text config, counted per sample over its real
tokens (padding excluded), 2 FLOPs per multiply-add, for one decoder layer
with ``n`` query tokens attending to ``n`` keys (prefill, full square: the
same convention as FastV's and SparseVLM's ``4nd^2 + 2n^2d + ...``)::

    q, o projections     2 * n * d * (H * hd)  each
    k, v projections     2 * n * d * (Hkv * hd) each
    scores and values    2 * 2 * n * n * H * hd
    gated MLP            2 * 3 * n * d * m

``d`` hidden size, ``H`` / ``Hkv`` query / key-value heads, ``hd`` head
dim, ``m`` MLP width.  Tokens masked instead of removed still cost their
FLOPs (they are computed), so a masking method saves none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from arrcoc.state import StageRecord

if TYPE_CHECKING:
    from .call import Call


def layer_flops(config: Any, n: int) -> int:
    """Prefill FLOPs of one decoder layer over ``n`` tokens (see the module docstring)."""
    d = int(config.hidden_size)
    H = int(config.num_attention_heads)
    Hkv = int(getattr(config, "num_key_value_heads", None) or H)
    hd = int(getattr(config, "head_dim", None) or d // H)
    m = int(config.intermediate_size)
    proj = 2 * n * d * (H * hd) * 2 + 2 * n * d * (Hkv * hd) * 2
    attn = 2 * 2 * n * n * H * hd
    mlp = 2 * 3 * n * d * m
    return proj + attn + mlp


@dataclass
class Report:
    """What one call did; ``str(report)`` is a plain summary, :meth:`table` a rich table."""

    batch: int = 0
    pre_llm: list[StageRecord] = field(default_factory=list)
    layer_tokens: list[list[int]] = field(default_factory=list)   # [layer][sample] real tokens in prefill
    layer_visual: list[list[int]] = field(default_factory=list)   # [layer][sample] visual tokens attended
    layer_flops: list[int] = field(default_factory=list)          # [layer] prefill FLOPs, batch total
    kv_cache_bytes: int = 0
    vision_ms: float = 0.0
    stages_ms: float = 0.0
    llm_prefill_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0
    llm_stage_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_call(cls, call: "Call", text_config: Any) -> "Report":
        """The summary of one finished call (``text_config``: the LLM's, for the FLOPs)."""
        layers = call.layer_counts
        records = list(call.pre_llm.trace) if call.pre_llm is not None else []  # the encoder adds none here
        stages_ms = sum(r.ms for r in records)
        vision_ms = call.vision_ms + call.outside_vision_ms
        return cls(
            batch=len(layers[0].tokens) if layers else 0,
            pre_llm=records,
            layer_tokens=[r.tokens for r in layers],
            layer_visual=[r.visual for r in layers],
            layer_flops=[sum(layer_flops(text_config, n) for n in r.tokens) for r in layers],
            kv_cache_bytes=call.kv_bytes,
            vision_ms=vision_ms,
            stages_ms=stages_ms,
            llm_prefill_ms=call.llm_prefill_ms,
            prefill_ms=call.prefill_ms + vision_ms + stages_ms,
            decode_ms=call.decode_ms,
            new_tokens=call.forwards if call.kind == "generate" else 0,
            llm_stage_ms={r.stage: r.ms for r in call.llm_records},
        )

    @property
    def prefill_flops(self) -> int:
        return sum(self.layer_flops)

    @property
    def visual_tokens_in(self) -> list[int]:
        return self.layer_visual[0] if self.layer_visual else []

    @property
    def visual_tokens_mean(self) -> float:
        """Visual tokens the LLM sees, averaged over layers and samples (the budget of ``arrcoc eval``)."""
        if not self.layer_visual:
            return 0.0
        return sum(sum(v) for v in self.layer_visual) / (len(self.layer_visual) * max(self.batch, 1))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pre_llm"] = [r.as_dict() for r in self.pre_llm]
        out["prefill_flops"] = self.prefill_flops
        out["visual_tokens_mean"] = self.visual_tokens_mean
        return out

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title=f"arrcoc.hf report (batch {self.batch})")
        t.add_column("where")
        t.add_column("visual tokens per sample")
        t.add_column("tokens per sample")
        t.add_column("GFLOPs", justify="right")
        for r in self.pre_llm:
            t.add_row(f"{r.stage} ({r.plugin})", f"{list(r.tokens_in)} -> {list(r.tokens_out)}", "", "")
        for i, (tok, vis, fl) in enumerate(zip(self.layer_tokens, self.layer_visual, self.layer_flops)):
            changed = i == 0 or vis != self.layer_visual[i - 1] or tok != self.layer_tokens[i - 1]
            if changed or i == len(self.layer_tokens) - 1:
                t.add_row(f"decoder layer {i}", str(vis), str(tok), f"{fl / 1e9:.3f}")
        t.caption = (f"prefill {self.prefill_flops / 1e9:.3f} GFLOPs, KV cache {self.kv_cache_bytes / 2**20:.2f} MiB; "
                     f"{self._vision_text()}, pre-LLM stages {self.stages_ms:.1f} ms, LLM prefill "
                     f"{self.llm_prefill_ms:.1f} ms, prefill {self.prefill_ms:.1f} ms, decode {self.decode_ms:.1f} ms "
                     f"({self.new_tokens} tokens)")
        return t

    def _vision_text(self) -> str:
        # Without pre-LLM stages the model runs its own tower inside its forward: that time is in
        # prefill_ms, not measured apart, and "vision 0.0 ms" would read as free.
        if not self.pre_llm and self.vision_ms == 0.0:
            return "vision inside the model's prefill"
        return f"vision {self.vision_ms:.1f} ms"

    def __str__(self) -> str:
        vis = self.layer_visual
        return (f"Report(batch={self.batch}, visual tokens layer 0 -> last: {vis[0] if vis else []} -> "
                f"{vis[-1] if vis else []}, prefill {self.prefill_flops / 1e9:.3f} GFLOPs, "
                f"KV {self.kv_cache_bytes} B, prefill {self.prefill_ms:.1f} ms, decode {self.decode_ms:.1f} ms)")


def cache_bytes(cache: Any) -> int:
    """Bytes held by a ``DynamicCache``'s keys and values (0 without a cache)."""
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
