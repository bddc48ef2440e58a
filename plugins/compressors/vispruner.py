"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting
Visual Cues for Effective Token Pruning in VLMs").

Faithful to Theia-4869/VisPruner @ aefa01a, ``llava/model/llava_arch.py``
(``encode_images`` l.141-186) with ``multimodal_encoder/clip_encoder.py``
(``feature_select`` l.36-52): before the projector, on CLIP's
``hidden_states[-2][:, 1:]`` and the CLS row of ``attentions[-2]`` (layer 22)
over the patches, averaged over heads (``timm_vit`` with ``layer: -2``: its
``cls_attn`` is that head mean):

* budget ``T`` (``--visual_token_num``), ``T_imp = int(T * r)`` important
  tokens (``--important_ratio``, loader default 0.5), ``T_div = T - T_imp``
  diverse ones;
* important tokens (paper Sec. 4.1): the ``T_imp`` patches of highest CLS
  attention; the residual list is the rest, still in attention-descending
  order;
* diverse tokens (paper Sec. 4.2): while the residual list holds more than
  ``T_div`` tokens, ``r = min(8, R - T_div)``; split the *current* list
  alternately (a = even positions, b = odd), score each a-token by its highest
  cosine to a b-token, drop the ``r`` a-tokens of highest score; the new list
  is the surviving a-tokens in score-descending order, then every b-token
  (so the pairs change every round);
* output: the union through a boolean mask, i.e. the kept tokens in their
  original order (positions contiguous in the LLM: nothing to remember).

How it is computed: :func:`vispruner_select` (pure, batched) returns the
``[B, N]`` selection and :func:`arrcoc.ops.keep` moves the tokens.  The
cosines are computed once as an ``[N, N]`` matrix per image
(:func:`unit_cosines`, float32, unit vectors first as the official code) and
each round gathers the
``a x b`` block it needs: ``N^2 C`` once instead of the official ``R^2 C / 4``
per round (cheaper from the first rounds on: 56 rounds at ``T = 128``).  The
number of rounds and each row's drop per round depend on the counts only, so
the schedule is worked out on the host from one read of the counts, and the
rounds run without a device sync.  Ragged rows: each row's residual list is
padded at its *end*, which leaves the even/odd split of its real entries as
the row alone has it, so a ragged batch picks what each image picks alone.

Differences from the official code, on purpose (docs/methods/vispruner.md):

* ties (equal attention, equal cosines) go to the lower index / earlier list
  position; the official ``argsort`` is unstable;
* the cosines are float32 (or the features' dtype, if wider) whatever the
  features' dtype (official: normalised in the model dtype, fp16 in the
  paper); as the official code the features are normalised first and the
  unit vectors multiplied (dividing the products by the norms instead rounds
  differently and reorders near-equal scores: other picks for about 1 image
  in 8 at N = 576); a zero vector has cosine 0 (official: NaN);
* a residual list of odd length (``N - T_imp`` odd, e.g. ``T = 66`` at
  ``r = 0.5``) makes the official indexing raise a shape error; here the
  a-tokens (``ceil(R / 2)``) are scored against the ``floor(R / 2)``
  b-tokens as for even lengths;
* a round drops ``min(r, ceil(R / 2))`` a-tokens: when ``r`` exceeds the
  a-tokens (only for ``R < 16``, e.g. ``T = 9`` at ``r = 0.5`` on 576
  patches) the official ``argsort(...)[:, r:]`` is empty but
  ``expand(-1, R // 2 - r)`` gets a negative size and raises; here every
  a-token goes, the b-tokens stay and the loop goes on;
* ``keep`` above an image's tokens is a :class:`~arrcoc.errors.BudgetError`
  (the official code keeps everything).

Towers without a class token: the official SigLIP path
(``siglip_encoder.py`` l.34-41) scores by the **last** layer's attention
averaged over queries (``attentions[-1].mean(dim=-2)``: what each token
receives), then the head mean.  ``signal: received`` reads it from one of two
places:

* ``attention_map: <block>`` (default ``-1``): computed from the encoder's
  ``meta["attention_maps"]`` (``timm_vit`` provides the head-mean map of every
  block it runs; ``-1``, the last one, is the official layer when the encoder
  runs the whole tower, ``layer: -1``), mapped to the current tokens through
  ``origin`` (a merged token: the mean of its patches);
* ``attention_map: null``: the per-token field ``attn_received`` (need
  ``attention_received``), the same quantity computed by the encoder itself.
  Inside a model (``arrcoc.hf``) the Qwen2-VL / 2.5-VL towers give it: their
  last full-attention block, each image's queries, a merged token the mean of
  its 4 patches (docs/methods/vispruner.md).  A tower with neither a class
  token nor this signal is refused before anything runs, naming what is missing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from arrcoc import ops
from arrcoc.errors import InputError, MissingInputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Keep, Params
from arrcoc.state import TokenState


#: The per-token field of the attention each token receives (need ``attention_received``), as encoders name it.
RECEIVED = "attn_received"


def split_budget(total: torch.Tensor, important_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_imp, T_div)`` per image: official ``int(T * r)`` and ``T - T_imp`` (``[B]`` int64 each)."""
    # Python's int(T * r) is the truncation of a float64 product >= 0; elementwise over [B], no matmul.
    important = (total.double() * important_ratio).to(torch.int64)
    return important, total - important


def unit_cosines(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` cosines of the real tokens as the official ``image_normalized = image_features /
    image_features.norm(...)`` then ``a @ b.T``: unit vectors first, then their products (float32, or the
    features' dtype if wider); padding rows and columns, and zero vectors (official: NaN), give 0.

    The product runs on whole tiles of :data:`arrcoc.ops.SIMILARITY_TILE` rows (as
    :func:`arrcoc.ops.similarity_key`), so an entry's rounding depends on its two vectors only: a ragged batch
    and the image alone, and the official per-round ``a @ b.T`` blocks, get the same values (CPU BLAS).
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    x = features.to(dtype)
    norm = x.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, x / norm.clamp_min(torch.finfo(dtype).tiny), 0.0) * mask[..., None].to(dtype)
    N = unit.shape[1]
    if N % ops.SIMILARITY_TILE:
        unit = F.pad(unit, (0, 0, 0, -N % ops.SIMILARITY_TILE))
    return torch.bmm(unit, unit.transpose(1, 2))[:, :N, :N]


def diverse_schedule(residual: int, diverse: int, step: int = 8) -> list[int]:
    """a-tokens dropped in each round for one image (official ``while`` loop, l.161-176).

    ``r = min(step, R - T_div)`` while positive, capped by the ``ceil(R / 2)``
    a-tokens the round has; the list ends at exactly ``T_div`` tokens.
    """
    drops = []
    while diverse > 0 and residual > diverse:
        drop = min(step, residual - diverse, (residual + 1) // 2)
        drops.append(drop)
        residual -= drop
    return drops


def vispruner_select(
    attn: torch.Tensor,
    features: torch.Tensor,
    mask: torch.Tensor,
    important: torch.Tensor,
    diverse: torch.Tensor,
    step: int = 8,
) -> torch.Tensor:
    """The tokens VisPruner keeps, as a ``[B, N]`` bool selection.

    Args:
        attn: ``[B, N]`` importance (CLS attention, head mean).
        features: ``[B, N, C]`` the features whose cosines find near-duplicates (pre-projector).
        mask: ``[B, N]`` real tokens.
        important: ``[B]`` ``T_imp``; diverse: ``[B]`` ``T_div``; ``T_imp + T_div`` at most each row's count.
        step: most a-tokens dropped per round (official 8).
    """
    B, N = mask.shape
    device = mask.device
    counts = mask.sum(1)
    # Every real token by decreasing attention, ties by index (official argsort(descending=True)).
    ranked, _ = ops.topk_per_row(attn, counts, mask, order="score")
    K = ranked.shape[1]
    # The one host read: counts and budgets, from which the rounds' drops (and the lists' widths) follow.
    host_counts, host_imp, host_div = torch.stack([counts, important, diverse]).tolist()
    schedules = [diverse_schedule(n - i, d, step) for n, i, d in zip(host_counts, host_imp, host_div)]
    rounds = max((len(s) for s in schedules), default=0)
    drops = torch.tensor([s + [0] * (rounds - len(s)) for s in schedules], dtype=torch.int64).reshape(B, rounds)
    lengths = torch.tensor([n - i for n, i in zip(host_counts, host_imp)], dtype=torch.int64)[:, None]
    lengths = (lengths - torch.cumsum(torch.cat([torch.zeros(B, 1, dtype=torch.int64), drops], 1), 1))  # [B, rounds+1]
    widths = lengths.amax(0).tolist() if B else [0] * (rounds + 1)  # (host tensors: no device sync)
    # Rounds where every row's list fills the width need no padding masks (a batch of equal images: all).
    padded = (lengths.amin(0) < lengths.amax(0)).tolist() if B else [False] * (rounds + 1)
    drops, lengths = drops.to(device), lengths.to(device)

    selected = torch.zeros(B, N + 1, dtype=torch.bool, device=device)
    slot = torch.arange(K, device=device)
    important_slot = torch.where(slot < important[:, None], ranked, N)  # N: a spare column, dropped below
    selected.scatter_(1, important_slot, True)

    # The residual list of each row: ranked[b, T_imp[b]:count[b]], padded at the end (parity unchanged).
    L = widths[0]
    pos = torch.arange(L, device=device)
    residual = ranked.gather(1, (important[:, None] + pos).clamp(max=max(K - 1, 0))) if L else ranked[:, :0]
    if rounds:
        # Cosines of every pair once (float32, equal in any batch: see unit_cosines), flat per image.
        sim = unit_cosines(features, mask).reshape(B, N * N)
    for t in range(rounds):
        R, drop, L_next = lengths[:, t], drops[:, t], widths[t + 1]
        a, b = residual[:, 0::2], residual[:, 1::2]
        La, Lb = a.shape[1], b.shape[1]
        a_pos, b_pos = torch.arange(La, device=device), torch.arange(Lb, device=device)
        # Official ``(a @ b.T).max(-1)``: each a-token's highest cosine to a b-token of its row (the a x b
        # block gathered from the matrix; a round runs only when some row holds >= 2 tokens, so Lb >= 1).
        block = sim.gather(1, (a[:, :, None] * N + b[:, None, :]).reshape(B, La * Lb)).view(B, La, Lb)
        if padded[t]:
            a_real = 2 * a_pos < R[:, None]
            b_real = 2 * b_pos + 1 < R[:, None]
            score = block.masked_fill_(~b_real[:, None, :], float("-inf")).amax(-1).masked_fill_(~a_real, float("-inf"))
        else:
            score = block.amax(-1)
        # Official argsort(descending)[:, r:]: the survivors in score-descending order (ties: list position;
        # padding is last because real a-tokens are a prefix).
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        n_a = (R + 1) // 2
        kept_a = (a_pos >= drop[:, None]) & (a_pos < n_a[:, None])
        a_dest = torch.where(kept_a, a_pos - drop[:, None], L_next)
        nxt = torch.zeros(B, L_next + 1, dtype=torch.int64, device=device)
        nxt.scatter_(1, a_dest, a.gather(1, order))
        if padded[t]:
            nxt.scatter_(1, torch.where(b_pos < (R // 2)[:, None], (n_a - drop)[:, None] + b_pos, L_next), b)
        else:
            nxt.scatter_(1, (n_a - drop)[:, None] + b_pos, b)
        residual = nxt[:, :L_next]
    final = residual.shape[1]
    diverse_slot = torch.where(torch.arange(final, device=device) < diverse[:, None], residual, N)
    selected.scatter_(1, diverse_slot, True)
    return selected[:, :N]


class VisPrunerParams(Params):
    keep: Keep = Field(
        64,
        description="Visual tokens kept per image, T (official --visual_token_num: 64 / 128 / 192), a count or a "
        "ratio of each image's tokens.",
    )
    important_ratio: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Share of `keep` taken as important tokens, T_imp = int(T * r) (official --important_ratio, "
        "loader default 0.5; README: 0.75 at 64 tokens -> 48 + 16).",
    )
    step: PositiveInt = Field(8, description="Most near-duplicates removed per round (official 8).")
    signal: Literal["cls", "received"] = Field(
        "cls",
        description="Importance: 'cls' = per_token `score` (official CLIP path: layer-22 CLS attention, head "
        "mean); 'received' = the attention each token receives in an encoder attention map, query mean "
        "(official path for towers without a class token, SigLIP: the last layer).",
    )
    score: str = Field(
        "cls_attn",
        description="per_token importance [B, N] read with signal 'cls' (timm_vit's `cls_attn` with `layer: -2`).",
    )
    attention_map: int | None = Field(
        -1,
        description="With signal 'received': which of meta['attention_maps'] (one per encoder block run) to read; "
        "-1 = the last (official: the tower's last layer; timm_vit `layer: -1` runs it). null = the encoder's own "
        "per_token 'attn_received' (need 'attention_received'; inside a model the Qwen2-VL / 2.5-VL towers give "
        "it, from their last full-attention block).",
    )


class VisPruner(Compressor):
    """VisPruner: important tokens by CLS attention, then diverse tokens by removing near-duplicates (Zhang et al. 2025)."""

    name = "vispruner"
    Params = VisPrunerParams
    stage = "vision"
    needs = frozenset({"cls_attention"})

    def requirements(self) -> frozenset[str]:
        if self.params.signal == "cls":
            return self.needs
        return frozenset({"attention_maps" if self.params.attention_map is not None else "attention_received"})

    def budgets(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T_imp [B], T_div [B])`` per image."""
        total = ops.resolve_keep(self.params.keep, state.counts, where="vispruner.keep")
        return split_budget(total, self.params.important_ratio)

    def importance(self, state: TokenState) -> torch.Tensor:
        """``[B, N]`` importance of each token, by ``signal``."""
        p = self.params
        if p.signal == "received" and p.attention_map is not None:
            return received_attention(state, p.attention_map)
        if p.signal == "received":
            attn = state.per_token.get(RECEIVED)
            if attn is None:
                raise MissingInputError(
                    f"vispruner (signal: received, attention_map: null): needs per_token[{RECEIVED!r}], the attention "
                    "each token receives (inside a model the Qwen2-VL / 2.5-VL towers give it when a stage needs "
                    "'attention_received'); the state has "
                    f"{sorted(state.per_token) or 'none'}; with timm_vit use `attention_map: -1` (its attention maps)"
                )
            if attn.shape != state.mask.shape:
                raise InputError(f"vispruner: per_token[{RECEIVED!r}] must be [B, N]={list(state.mask.shape)} scores, "
                                 f"got {list(attn.shape)}")
            return attn
        attn = state.per_token.get(p.score)
        if attn is None:
            no_cls = "" if state.cls is not None else (
                " The state has no class token: use `signal: received` (the official rule for such towers, "
                "SigLIP: the attention each token receives in the last layer; `attention_map: null` reads the "
                f"encoder's own per_token {RECEIVED!r})."
            )
            raise MissingInputError(
                f"vispruner: needs per_token[{p.score!r}], the importance of each token (official: layer-22 CLS "
                f"attention, head mean; the timm_vit encoder provides 'cls_attn' with `layer: -2`); the state has "
                f"{sorted(state.per_token) or 'none'}.{no_cls}"
            )
        if attn.shape != state.mask.shape:
            raise InputError(
                f"vispruner: per_token[{p.score!r}] must be [B, N]={list(state.mask.shape)} scores, got "
                f"{list(attn.shape)}"
            )
        return attn

    def __call__(self, state: TokenState) -> TokenState:
        important, diverse = self.budgets(state)
        selected = vispruner_select(self.importance(state), state.tokens, state.mask, important, diverse,
                                    self.params.step)
        return ops.keep(state, *ops.pack(selected))


def received_attention(state: TokenState, layer: int = -1) -> torch.Tensor:
    """Official SigLIP importance (``siglip_encoder.py`` ``feature_select``: ``attentions[-1].mean(dim=-2)``,
    then the head mean in ``encode_images``): the attention each patch receives, averaged over every query,
    from the head-mean map ``meta["attention_maps"][layer]`` (the two means commute), prefix columns left
    out; mapped to the current tokens through ``origin`` (mean over a merged token's patches)."""
    maps = state.meta.get("attention_maps")
    if not maps:
        raise MissingInputError(
            "vispruner (signal: received): state.meta['attention_maps'] is missing; the timm_vit encoder provides "
            "it when a stage needs 'attention_maps'"
        )
    if not -len(maps) <= layer < len(maps):
        raise InputError(
            f"vispruner.attention_map={layer}: the encoder gave {len(maps)} attention maps "
            f"(valid: {-len(maps)}..{len(maps) - 1})"
        )
    prefix = int(state.meta.get("num_prefix_tokens", 0))
    attention = maps[layer]
    n0 = state.origin.shape[1]
    if attention.ndim != 3 or attention.shape[0] != state.B or attention.shape[-1] != n0 + prefix:
        raise InputError(
            f"vispruner (signal: received): expected attention maps [B={state.B}, M, {n0 + prefix}] (the {n0} "
            f"original patches + {prefix} prefix tokens), got {list(attention.shape)}"
        )
    per_patch = attention.float().mean(dim=-2)[:, prefix:]
    return ops.patches_to_tokens(state, per_patch, "mean")


@hookimpl
def arrcoc_register_plugins(register):
    register(VisPruner)
