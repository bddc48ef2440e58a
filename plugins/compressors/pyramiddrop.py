"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction", arXiv 2410.17247).

Faithful to Cooperx521/PyramidDrop @ 6444f30, ``llava/model/modeling_llama_pdrop.py``:
``pdrop_forward`` (l.1106-1288: the stages and the decode positions) and
``pdrop_rank_drop`` (l.1291-1465: the ranking and the drop), with the counts set
in ``llava/model/llava_arch.py`` (l.412-430, l.474) and
``llava/eval/model_vqa_loader.py`` (l.84-96), and the settings of
``scripts/v1_5/pdrop_eval/*.sh`` (``--layer_list '[8,16,24]'
--image_token_ratio_list "[0.5,0.25,0.125]"``):

* where: inside the LLM, in prefill, at the input of each layer ``a`` of
  ``layers`` (official: after layer ``a - 1`` runs, ``rank_layer = layer_idx +
  1`` in ``layer_list``), so layers ``0 .. 7`` see every visual token, ``8 ..
  15`` half of them, and so on (paper Sec. 3.2, the pyramid);
* score: the attention the **last instruction token** (the prompt's last
  token, official ``prompt_len + image_tokens - 1``) gives each visual token,
  recomputed with **layer a's own** weights on the sequence as it reaches
  ``a``: ``layers[a].input_layernorm``, the q / k projections, rotary
  embeddings at the tokens' current positions, the causal mask, softmax in
  float32, mean over heads (paper Eq. 2-3, "lightweight attention").  A model
  integration hands it to the stage as ``per_token["attn_from_last_here"]``;
  :func:`last_query_attention` is the same computation on query / key tensors;
* how many: at stage ``s`` (1-based index of ``a`` in ``layers``) an image
  keeps ``int(N0 * ratio ** s)`` tokens, ``N0`` the visual tokens at the LLM
  input (:func:`pdrop_keep_counts`): 576 -> 288 -> 144 -> 72 with the
  defaults.  The official counts are ``int()`` of the ORIGINAL count times the
  stage's ratio, not of the previous stage's count: copied;
* which: ``topk`` of the score, returned in sequence order (official
  ``topk(keep_length).indices ... .sort()``); ties go to the lower index here
  (:func:`arrcoc.ops.topk_per_row`);
* positions: after each drop the kept sequence is **renumbered 0, 1, 2, ...**
  (l.1445-1446, ``positions: compact``), and while decoding, every stage
  subtracts the tokens it dropped from the new token's position (l.1259-1268,
  ``decode_positions: shifted``), so generated tokens continue the compact
  numbering.  ``positions: original`` (kept tokens keep their ids, generated
  tokens numbered from the unpruned length, like FastV) is arrcoc's option,
  and the one for multimodal rotary positions (Qwen2-VL).

Quirks of the official code (docs/methods/pyramiddrop.md):

* the 4-D mask is rebuilt after a drop from the ORIGINAL ``(batch,
  seq_length)`` (l.1244-1257), consistent only when it collapses to None
  (flash-attn, or sdpa without padding); arrcoc's engine builds the mask of
  the new length;
* no ``repeat_kv`` in the ranking (l.1331-1342, l.1395): a GQA model's query heads
  cannot meet its fewer key heads; the engine's signal (and
  :func:`last_query_attention`) repeat the key heads, as attention does;
* batching is per row, right padding only (``ValueError`` otherwise); arrcoc
  runs ragged, left-padded batches through masks;
* in training the query is every token just before an answer span,
  averaged; arrcoc implements the inference rule (the last prompt token);
* ``N0`` on LLaVA-NeXT is ``image_features.shape[0]``, newline tokens
  included: the engine's ``input_visual_counts`` counts every visual token the
  LLM gets, newlines included, as officially;
* the official probabilities are cast back to the model's dtype before the
  head mean (``softmax(..., dtype=float32).to(query_states.dtype)``); the
  engine's signal keeps them in float32 (:func:`last_query_attention` takes
  ``probs_dtype`` to reproduce the cast).  It changes only near-ties in fp16.

A count of 0 (``N0 * ratio ** s < 1``) would drop the whole image (official:
``topk(0)``); arrcoc keeps at least one token, as its ratio rule does
(:func:`arrcoc.ops.resolve_keep`).  The budget rule (:meth:`PyramidDrop.budget_params`)
is arrcoc's: the paper's 192 / 128 / 64 settings are not in the repository.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from arrcoc import ops
from arrcoc.budget import bisect_increasing, layer_mean, nearest
from arrcoc.errors import BudgetError, MissingInputError, StateError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, LLMCompressor, Params
from arrcoc.state import TokenState

FIELD = "attn_from_last_here"
#: Decoder layers the official scripts drop before (``--layer_list '[8,16,24]'``, LLaVA-1.5).
OFFICIAL_LAYERS: tuple[int, ...] = (8, 16, 24)
#: The official ratio between stages (``--image_token_ratio_list "[0.5,0.25,0.125]"`` = 0.5 ** s).
OFFICIAL_RATIO = 0.5


# ------------------------------------------------------------------ tensors
def pdrop_keep_counts(input_counts: torch.Tensor, ratio: float, stage: int) -> torch.Tensor:
    """Visual tokens kept per prompt at ``stage`` (1-based): ``int(N0 * ratio ** stage)``, at least 1.

    Official ``keep_length = [int(cur_image_token * image_token_ratio_list[cur_num + 1]) ...]`` with
    ``image_tokens`` the counts at the LLM input: every stage takes ``int()`` of the ORIGINAL count times its
    ratio (so 7 tokens at 0.5 give 3, then 1: ``int(1.75)``, not ``int(3 * 0.5)``).  The product is formed in
    float64 like Python's (elementwise over ``[B]``); a prompt without visual tokens keeps 0, any other at
    least 1 (official: 0 drops the whole image).  Returns ``[B]`` int64 on ``input_counts.device``.
    """
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
        raise StateError(f"pdrop_keep_counts: stage is the 1-based index of a pruning layer, got {stage!r}")
    if not 0.0 < ratio <= 1.0:
        raise BudgetError(f"pdrop_keep_counts: ratio must lie in (0, 1], got {ratio}")
    n0 = input_counts.to(torch.int64)
    kept = n0.double().mul_(ratio ** stage).floor_().to(torch.int64)  # Python's int() of a product >= 0
    return torch.where(n0 > 0, kept.clamp_(min=1), n0)


def last_query_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    probs_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of one query row per prompt over its keys: PyramidDrop's ranking score.

    ``query`` ``[B, H, d]`` is the last prompt token's post-rotary query and ``keys`` ``[B, Hkv, L, d]`` the
    post-rotary keys of the sequence (``H`` a multiple of ``Hkv``: the key heads are repeated, as the model's
    attention does; the official ranking has no ``repeat_kv`` and fails for GQA); ``key_mask`` ``[B, L]``
    marks the keys the query may attend to (its causal past, padding excluded).  Official ``pdrop_rank_drop``:
    ``softmax(q k^T / sqrt(d) + mask, dim=-1, dtype=float32)``, mean over heads.  The products and the division
    by ``sqrt(d)`` are taken in the inputs' dtype like the official matmul; ``probs_dtype`` casts the
    probabilities before the head mean as the official ``.to(query_states.dtype)`` does (default: kept in
    float32).  Returns ``[B, L]`` float32 (0 at masked keys).
    """
    if query.ndim != 3 or keys.ndim != 4 or query.shape[0] != keys.shape[0] or query.shape[2] != keys.shape[3]:
        raise StateError(
            f"last_query_attention: expected query [B, H, d] and keys [B, Hkv, L, d], got {list(query.shape)} "
            f"and {list(keys.shape)}"
        )
    B, H, d = query.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    if Hkv < 1 or H % Hkv:
        raise StateError(f"last_query_attention: {H} query heads are not a multiple of {Hkv} key heads")
    if key_mask is not None and tuple(key_mask.shape) != (B, L):
        raise StateError(f"last_query_attention: key_mask must be [B, L]={[B, L]}, got {list(key_mask.shape)}")
    # [B, Hkv, H / Hkv, d] x [B, Hkv, L, d]: query head h reads key head h // (H / Hkv), as repeat_kv.
    logits = torch.einsum("bgrd,bgld->bgrl", query.reshape(B, Hkv, H // Hkv, d), keys).reshape(B, H, L)
    logits = (logits / math.sqrt(d)).float()  # official: matmul(q, k^T) / sqrt(head_dim) in the model's dtype
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    probs = logits.softmax(-1)
    if probs_dtype is not None:  # official: the head mean of the probabilities cast back to the model's dtype
        return probs.to(probs_dtype).mean(1).float()
    return probs.mean(1)


def pdrop_select(scores: torch.Tensor, k: torch.Tensor | int, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` visual tokens with the highest ``scores`` ``[B, N]``, in sequence order (official ``topk``
    then ``sort``; ties go to the lower index).  Returns ``(index [B, K], valid [B, K])``."""
    return ops.topk_per_row(scores, k, mask, order="position")


# ------------------------------------------------------------------ plugin
class PyramidDropParams(Params):
    layers: list[int] = Field(
        default_factory=lambda: list(OFFICIAL_LAYERS),
        description="Decoder layers before which visual tokens are ranked (with that layer's own weights) and "
        "dropped; stage s is the s-th (official [8, 16, 24] for LLaVA-1.5).",
    )
    ratio: float = Field(
        OFFICIAL_RATIO, gt=0, le=1,
        description="lambda: stage s keeps int(N0 * ratio**s) of the N0 visual tokens at the LLM input (official "
        "0.5: 576 -> 288 -> 144 -> 72).",
    )
    positions: Literal["compact", "original"] = Field(
        "compact", description="compact: the kept sequence renumbered 0, 1, ... (official); original: kept ids.")
    decode_positions: Literal["shifted", "unpruned"] = Field(
        "shifted", description="Generated tokens' positions at the layers after a stage: shifted (official: minus "
        "the tokens dropped before them, continuing the compact numbering) or unpruned (from the unpruned prompt "
        "length). Defaults to unpruned with positions: original.",
    )

    @model_validator(mode="before")
    @classmethod
    def _decode_follows_positions(cls, data: Any) -> Any:
        # With original ids the shifted rule would number new tokens onto kept prompt positions: the default
        # follows `positions`, and an explicit `shifted` with `original` is refused below.
        if isinstance(data, dict) and data.get("positions") == "original" and "decode_positions" not in data:
            return {**data, "decode_positions": "unpruned"}
        return data

    @model_validator(mode="after")
    def _check(self) -> "PyramidDropParams":
        if not self.layers or any(layer < 1 for layer in self.layers) or sorted(set(self.layers)) != self.layers:
            raise ValueError(f"layers: increasing decoder layer indices >= 1, got {self.layers}")
        if self.positions == "original" and self.decode_positions == "shifted":
            raise ValueError(
                "decode_positions: shifted continues the compact numbering (positions: compact); with positions: "
                "original the kept tokens keep their ids, so generated tokens must be numbered from the unpruned "
                "length (decode_positions: unpruned)"
            )
        return self


class PyramidDrop(LLMCompressor):
    """PyramidDrop: at each of several layers, keep the visual tokens the last instruction token attends to most,
    ``int(N0 * ratio**s)`` at stage ``s`` (Xing et al. 2025)."""

    name = "pyramiddrop"
    Params = PyramidDropParams
    needs = frozenset({FIELD})

    # ------------------------------------------------------------ budget
    @staticmethod
    def _counts(n: int, ratio: float, stages: int) -> list[int]:
        """:func:`pdrop_keep_counts` on the host, for the budget rule (same float64 products)."""
        return [max(int(n * ratio ** s), 1) if n else 0 for s in range(1, stages + 1)]

    @staticmethod
    def budget_layers(spacing: int, stages: int, num_layers: int) -> list[int]:
        """``[K, 2K, ..., stages K]`` less the layers an LLM of ``num_layers`` does not have after layer 0."""
        return [spacing * s for s in range(1, stages + 1) if spacing * s < num_layers]

    @classmethod
    def _mean(cls, n: int, num_layers: int, layers: list[int], ratio: float) -> float:
        return layer_mean(n, num_layers, zip(layers, cls._counts(n, ratio, len(layers))))

    @classmethod
    def _spacings(cls, params: dict, context: BudgetContext) -> range:
        """``K`` a budget may use, latest first: the official spacing ``round(L / (stages + 1))`` (8 of 32 layers
        for 3 stages; at least 1), then every earlier one down to 1."""
        L = context.layers
        if L < 2:
            raise BudgetError(f"pyramiddrop: an LLM of {L} layer(s) has no layer after layer 0 to drop before")
        stages = len(cls.validate_params(params).layers)
        first = min(max(round(L / (stages + 1)), 1), L - 1)
        return range(first, 0, -1)

    @classmethod
    def _fewest(cls, n: int, num_layers: int, layers: list[int]) -> float:
        """The lowest mean with these layers: every stage keeps its floor of 1 token."""
        return layer_mean(n, num_layers, [(a, min(n, 1)) for a in layers])

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        n, L = context.tokens, context.layers
        stages = len(cls.validate_params(params).layers)
        return cls._fewest(n, L, cls.budget_layers(min(cls._spacings(params, context)), stages, L)), float(n)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """The mean over decoder layers of the visual tokens each sees (:func:`~arrcoc.budget.layer_mean`) is
        set by the pruning layers and ``ratio``.  Layers are evenly spaced, ``[K, 2K, 3K]`` (as many as the
        pipeline's ``layers``; those ``>= L`` dropped), and the pyramid keeps the pipeline's ``ratio`` (official
        0.5) as long as it can: ``K`` is the official spacing ``round(L / 4)`` (8 for 32 layers) or the latest
        earlier one whose mean at that ratio is at most the target, and ``ratio`` is then raised (bisected) until
        the mean is the reachable one nearest the target, unless the later spacing at the pipeline's ratio (just
        above the target) is nearer still: then that one.  Only when even ``K = 1`` at the pipeline's ratio stays
        above the target is ``ratio`` lowered below it, with ``K = 1``.  (Lowering ``ratio`` at a late ``K``
        instead would collapse the pyramid into one early drop to a handful of tokens.)  Python floats only:
        the same params on every machine."""
        p = cls.validate_params(params)
        n, L, stages = context.tokens, context.layers, len(p.layers)

        def mean_of(layers: list[int]):
            return lambda ratio: cls._mean(n, L, layers, ratio)

        later = None  # the previous (later) spacing's layers: at the pipeline's ratio their mean is above target
        for spacing in cls._spacings(params, context):
            layers = cls.budget_layers(spacing, stages, L)
            mean = mean_of(layers)
            if mean(p.ratio) <= target * (1 + 1e-12):
                ratio = nearest(mean, target, bisect_increasing(mean, target, p.ratio, 1.0))
                # Raising the ratio moves the mean in whole-token steps, which can land farther from a target
                # just below the later spacing's mean than that mean is: keep the later spacing then (the mean
                # nearest the target stays non-decreasing in it across spacings; a tie keeps the lower mean).
                if later is not None and abs(cls._mean(n, L, later, p.ratio) - target) < abs(mean(ratio) - target):
                    return {**params, "layers": later, "ratio": p.ratio}
                return {**params, "layers": layers, "ratio": ratio}
            later = layers
        fewest = cls._fewest(n, L, layers)
        if fewest > target * (1 + 1e-12):
            raise BudgetError(
                f"pyramiddrop: a mean of {target:.1f} visual tokens over {L} layers from {n} is out of reach: the "
                f"fewest is {fewest:.1f} (layers {layers}, one token kept after the first; layers before "
                f"{layers[0]} see all {n})"
            )
        # Below 1 / (n + 1) every stage keeps its floor of 1 token: the bracket's low end, a valid ratio (> 0).
        ratio = nearest(mean, target, bisect_increasing(mean, target, 1.0 / (n + 1), p.ratio))
        return {**params, "layers": layers, "ratio": ratio}

    # -------------------------------------------------------------- run
    def llm_layers(self, num_layers: int) -> tuple[int, ...]:
        # Official: ranked with layers[a]'s own weights, before it runs (rank_layer = layer_idx + 1).
        return tuple(self.params.layers)

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        llm = self.llm_context(state)
        scores = state.per_token.get(FIELD)
        if scores is None:
            raise MissingInputError(
                f"pyramiddrop: needs per_token[{FIELD!r}] [B, N] (the head-mean attention the prompt's last token "
                f"gives each visual token, computed with decoder layer {llm.layer}'s own norm, q / k projections "
                "and rotary positions); the Hugging Face integration (arrcoc.integrations.hf) provides it inside "
                "the LLM, or add it with state.with_per_token(...)"
            )
        if tuple(scores.shape) != tuple(state.mask.shape):
            raise StateError(
                f"pyramiddrop: per_token[{FIELD!r}] must be [B, N]={list(state.mask.shape)}, got {list(scores.shape)}"
            )
        stage = p.layers.index(llm.layer) + 1
        k = pdrop_keep_counts(llm.input_visual_counts.to(state.device), p.ratio, stage)
        # One host read per call: a count above what is present would drop padding slots (an earlier stage of
        # the pipeline removed more than this stage's official count); the official topk raises there.
        if bool((k > state.counts).any()):
            raise BudgetError(
                f"pyramiddrop: stage {stage} (before layer {llm.layer}) keeps int(N0 * {p.ratio}**{stage}) = "
                f"{k.tolist()} of N0 = {llm.input_visual_counts.tolist()} visual tokens at the LLM input, but only "
                f"{state.counts.tolist()} are present there (an earlier stage removed more)"
            )
        return ops.keep_topk(state, scores, k, order="position")


@hookimpl
def arrcoc_register_plugins(register):
    register(PyramidDrop)
