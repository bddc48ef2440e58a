"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494).

Official: ZichenWen1/DART @ 5a19452 (read from the fork xqy1111111/DART),
``llava/model/language_model/modeling_llama_self.py``: ``DART.forward``
(l.331-359, where it acts and the position ids) and
``get_retained_image_token`` (l.397-449, the selection);
``llava/eval/model_vqa_loader.py`` (l.18-34 the config, l.126-129 LLaVA-NeXT)
and ``scripts/v1_5/eval/*.sh`` (``--pruned_layer 2 --max_num_trunction 128
--pivot_image_token 4 --pivot_text_token 4``).

What the official code does, at the input of decoder layer ``K`` (2), prefill
only, so layers ``0 .. K-1`` see every token:

* signals of layer ``K - 1``: its output through the LLM's **final norm**
  (``self.norm(last_layer_state)``) for the cosines, and its **post-RoPE key
  states** (after ``repeat_kv``, heads concatenated to ``H * d``) for the
  pivots;
* pivots (paper Sec. 3.2): the 4 image tokens with the largest **L1 norm of
  their keys**, and the 4 tokens of largest key L1 norm among every token
  **after the image** (the question and the ``ASSISTANT:`` template);
* duplication (paper Eq. 4-5): ``TOKEN_TOPK = ceil(M // 8)`` = ``floor(M / 8)``
  for the budget ``M`` (``max_num_trunction``); for each pivot in turn, the
  ``TOKEN_TOPK`` candidates (image tokens not chosen yet, image pivots
  excluded) of **lowest** cosine to the pivot (``topk`` of ``-cos``) are
  kept and leave the candidates; the text pivots are not kept;
* the pivots are visited in the iteration order of a Python ``set`` of
  their **absolute sequence indices** (``indices_set = set(image_indices +
  query_indices)``; ints hash to themselves, so the order is roughly index
  modulo the table size, not score).  The order matters: each pivot takes
  candidates away from the later ones;
* the kept image tokens keep their original position ids
  (``position_ids = keep_indexs``, sorted) and decoding continues from the
  unpruned length.

Here:

* :func:`dart_takes` turns a budget into the tokens each pivot takes,
  :func:`dart_select` is the selection on tensors (batched, ragged rows
  through masks, ties to the lower index, 8 steps over a ``[B, N]``
  candidate mask, no host sync per step; a prompt without visual tokens,
  a text-only one in a batch, keeps none and asks for no pivots), and
  :func:`pivot_visit_order` the official set order;
* the ``dart`` plugin (``stage = "llm"``) reads the signals the Hugging
  Face integration fills (``needs = {"key_norms", "normed_hidden"}``):
  ``per_token["key_norms"]`` / ``per_token["normed_hidden"]`` for the visual
  tokens and ``state.llm.text_key_norms`` / ``text_normed_hidden`` /
  ``text_mask`` for the text after the image, with the sequence index of
  each (``state.llm.visual_positions`` / ``text_positions``) for the set
  order;
* ``dart_pre`` (``stage = "projector"``) is **an arrcoc choice**, not the
  official method: the official code needs layer ``K - 1``'s outputs (``K >=
  1``), so before the LLM the signals are substituted: cosines on the
  projected features, pivots by the features' L1 norm, text pivots from the
  LLM-input embeddings of the prompt's text after the image (``state.query``)
  by their L1 norm, pivots visited in score order.

Official quirks and what arrcoc does (docs/methods/dart.md):

* **4 more tokens than the budget**: kept = 4 image pivots + 8 x
  ``floor(M / 8)`` (132 for ``M = 128``): the published numbers, the default
  (``count: official``); ``count: exact`` keeps exactly ``M`` (the
  ``M - 4`` non-pivot tokens spread over the 8 pivots, the first ``(M - 4)
  % 8`` in visiting order taking one more).
* **Set order**: copied (``pivot_order: official``): one host read of the
  ``[B, 8]`` pivot sequence indices per call, ``list(set(...))`` per row, as
  the official loop.  ``pivot_order: score`` (image pivots by key norm, then
  text pivots) needs no host read and no positions.
* **``topk`` raises** when the pivots ask for more tokens than are left:
  a :class:`~arrcoc.errors.BudgetError` naming the image and the counts.
  Fewer than 4 text tokens after the image (the official ``topk(4)`` raises
  too): a :class:`~arrcoc.errors.MissingInputError` (no instruction).
* cosines in float32 through :func:`arrcoc.ops.similarity_key` (official:
  ``F.cosine_similarity`` in the model's dtype, fp16), so near-equal
  cosines are ranked by their float32 values, then by index.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from arrcoc import ops
from arrcoc.budget import layer_mean
from arrcoc.errors import BudgetError, MissingInputError, StateError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Compressor, Keep, LLMCompressor, Params
from arrcoc.state import TokenState

#: per_token fields the HF integration fills for ``needs = {"key_norms", "normed_hidden"}``.
KEY_NORMS = "key_norms"
NORMED_HIDDEN = "normed_hidden"


# ------------------------------------------------------------ budget
def dart_takes(keep: float | int, counts: torch.Tensor, *, image_pivots: int = 4, text_pivots: int = 4,
               count: str = "official", where: str = "dart") -> torch.Tensor:
    """``[B, P]`` int64: tokens the ``P = image_pivots + text_pivots`` pivots take, in visiting order.

    ``keep`` is the budget ``M`` per image: a count (official ``max_num_trunction``) or a ratio, ``floor(n *
    keep)`` (official fallback ``N (1 - reduction_ratio)`` when ``M`` is None; ``floor(floor(x) / 8) = floor(x /
    8)``, so the takes are the same).  ``count="official"``: every pivot takes ``floor(M / P)`` (official
    ``TOKEN_TOPK = ceil(M // (pivot_image_token + pivot_text_token))``), so an image keeps ``image_pivots + P
    floor(M / P)``; ``"exact"``: the ``M - image_pivots`` non-pivot tokens spread over the pivots, the first
    ``(M - image_pivots) % P`` taking one more, so an image keeps exactly ``M``.

    A :class:`~arrcoc.errors.BudgetError` when a count is above an image's tokens (``resolve_keep``) or, with
    ``count="exact"``, below the image pivots; :func:`dart_select` refuses takes above an image's candidates.
    A row of ``counts`` 0 (a prompt without an image) takes nothing.
    """
    pivots = image_pivots + text_pivots
    if pivots < 1:
        raise BudgetError(f"{where}: needs at least one pivot, got {image_pivots} image and {text_pivots} text pivots")
    counts = counts.to(torch.int64)
    # A prompt without visual tokens (a text-only one in a batch) has no image to budget: it takes nothing (a
    # count is checked against the images only).
    has_image = counts > 0
    checked = counts.masked_fill(~has_image, keep) if isinstance(keep, int) and keep >= 1 else counts
    budget = ops.resolve_keep(keep, checked, where=f"{where}.keep") * has_image  # a count above an image raises
    steps = torch.arange(pivots, device=counts.device)
    if count == "official":
        takes = (budget // pivots)[:, None].expand(-1, pivots)
    elif count == "exact":
        rest = budget - image_pivots
        takes = (rest.clamp(min=0) // pivots)[:, None] + (steps[None, :] < (rest.clamp(min=0) % pivots)[:, None])
    else:
        raise BudgetError(f"{where}.count: expected 'official' or 'exact', got {count!r}")
    if count == "exact":  # (a count is known on the host; a ratio costs one sync here)
        # (a prompt without visual tokens, a text-only one in a batch, has no image to keep pivots of)
        low = keep < image_pivots if isinstance(keep, int) else bool(((budget < image_pivots) & has_image).any())
        if low:
            raise BudgetError(f"{where}.keep: count: exact keeps {keep} tokens per image, fewer than its "
                              f"{image_pivots} image pivots")
    return takes


def dart_kept(budget: int, tokens: int, *, image_pivots: int = 4, text_pivots: int = 4,
              count: str = "official") -> int:
    """Tokens an image of ``tokens`` keeps for a count budget (host ints; the budget rule's arithmetic)."""
    pivots = image_pivots + text_pivots
    kept = image_pivots + pivots * (budget // pivots) if count == "official" else budget
    return min(kept, tokens)


# ------------------------------------------------------------ selection
def pivot_visit_order(pivot_positions: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` int64: the order in which the official loop visits the pivots (a permutation of ``0 .. P-1``).

    ``pivot_positions`` ``[B, P]`` holds the pivots' absolute sequence indices as the official code inserts them
    (image pivots in ``topk`` order, then text pivots); official ``for item in list(set(image_indices +
    query_indices))``.  This is a real CPython ``set``: one host read of ``[B, P]`` ints per call, the price of
    the published order (ints hash to themselves, so the order depends on the indices' values modulo the table
    size and on insertion collisions; no tensor formula reproduces it in general).
    """
    rows = pivot_positions.tolist()
    order = []
    for b, row in enumerate(rows):
        visited = list(set(row))
        if len(visited) != len(row):
            raise StateError(f"dart: pivots of image {b} share sequence indices {row}; expected distinct positions")
        where = {value: i for i, value in enumerate(row)}
        order.append([where[value] for value in visited])
    return torch.tensor(order, dtype=torch.int64).reshape(pivot_positions.shape).to(pivot_positions.device)


def _gather_vectors(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def dart_select(
    hidden: torch.Tensor,
    norms: torch.Tensor,
    mask: torch.Tensor,
    text_hidden: torch.Tensor | None,
    text_norms: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    takes: torch.Tensor | int,
    *,
    image_pivots: int = 4,
    text_pivots: int = 4,
    positions: torch.Tensor | None = None,
    text_positions: torch.Tensor | None = None,
    where: str = "dart",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DART's kept visual tokens (official ``get_retained_image_token``), batched over ragged rows.

    Args:
        hidden: ``[B, N, D]`` visual states the cosines compare (official: layer ``K - 1``'s output through the
            final norm).
        norms: ``[B, N]`` pivot scores of the visual tokens (official: L1 norm of their post-RoPE keys).
        mask: ``[B, N]`` real visual tokens (a row without any: a prompt without an image, which keeps none and
            needs no pivots).
        text_hidden, text_norms, text_mask: ``[B, T, D]``, ``[B, T]``, ``[B, T]``: the same for the text after
            the image (None with ``text_pivots=0``).
        takes: tokens each pivot takes, in visiting order: an int, or ``[B]`` / ``[B, P]`` int64
            (:func:`dart_takes`); ``sum + image_pivots`` must not exceed an image's tokens (a row without visual
            tokens takes none).
        image_pivots, text_pivots: pivots of largest score among the visual / text tokens (official 4 and 4).
        positions, text_positions: ``[B, N]`` / ``[B, T]`` absolute sequence indices; given, the pivots are
            visited in the official set order (:func:`pivot_visit_order`), else in score order (image pivots by
            decreasing score, then text pivots).
        where: the name errors give.

    Returns:
        ``(index [B, K], valid [B, K])``: the kept visual tokens (image pivots and every token a pivot took) in
        increasing index order (official ``keep_indexs.sort()``).
    """
    B, N = mask.shape
    device = hidden.device
    pivots = image_pivots + text_pivots
    if hidden.ndim != 3 or hidden.shape[:2] != (B, N) or norms.shape != (B, N):
        raise StateError(f"dart_select: expected hidden [B, N, D] and norms [B, N] for mask {list(mask.shape)}, got "
                         f"{list(hidden.shape)} and {list(norms.shape)}")
    if text_pivots:
        if text_hidden is None or text_norms is None or text_mask is None:
            raise MissingInputError(f"dart_select: {text_pivots} text pivots need text_hidden, text_norms and "
                                    "text_mask (the text after the image)")
        T = text_mask.shape[1]
        if text_hidden.shape[:2] != (B, T) or text_norms.shape != (B, T) or text_hidden.shape[-1] != hidden.shape[-1]:
            raise StateError(f"dart_select: expected text_hidden [B, T, {hidden.shape[-1]}] and text_norms [B, T] "
                             f"for text_mask {list(text_mask.shape)}, got {list(text_hidden.shape)} and "
                             f"{list(text_norms.shape)}")
    # A prompt without visual tokens (a text-only prompt in a batch: the model integration hands the stage one
    # row per prompt) has no image: no pivots are asked of it and it keeps nothing.
    counts = mask.sum(1)
    has_image = counts > 0
    take_rows = torch.as_tensor(takes, device=device).to(torch.int64)
    take_rows = (take_rows[:, None] if take_rows.ndim == 1 else take_rows).expand(B, pivots) * has_image[:, None]
    # One host read per call for what the loop needs to know: the top-k width of the steps, the rows whose
    # pivots ask for more than their candidates (official topk raises), the shortest text (official topk(4)).
    all_text = text_mask.sum(1) if text_pivots else torch.full_like(counts, text_pivots)
    text_counts = torch.where(has_image, all_text, text_pivots)
    short = counts - image_pivots * has_image - take_rows.sum(1)
    width, fewest_left, fewest_text, fewest_visual, most_visual, fewest_any_text = (
        torch.stack([take_rows.amax(), short.amin(), text_counts.amin(), counts.amin(), counts.amax(),
                     all_text.amin()]).tolist()
        if B else (0, 0, text_pivots, 0, 0, text_pivots))
    if fewest_left < 0:
        b = int((short < 0).nonzero()[0, 0])
        raise BudgetError(
            f"{where}: image {b} has {int(counts[b])} visual tokens, but its {image_pivots} image pivots and "
            f"{pivots} pivots taking {take_rows[b].tolist()} need {int(counts[b] - short[b])} (the official topk "
            "raises when the pivots ask for more than the candidates left)"
        )
    if fewest_text < text_pivots:
        few = (text_counts < text_pivots).nonzero().flatten().tolist()
        raise MissingInputError(
            f"{where}: {text_pivots} text pivots come from the text after the image (the instruction), but prompts "
            f"{few} have only {fewest_text} text token(s) after their image; put the question after the image, "
            "or set text_pivots lower"
        )
    if most_visual == 0:  # (no prompt has an image: nothing to choose from)
        return ops.pack(torch.zeros(B, N, dtype=torch.bool, device=device))
    # Image pivots: largest scores (official topk of the key L1 norms; ties here to the lower index).  Per-row
    # counts only where a prompt has fewer (one without an image: none), so the usual batch costs no sync here.
    image_k = image_pivots if fewest_visual >= image_pivots else torch.where(has_image, image_pivots, 0)
    image_index, image_valid = ops.topk_per_row(norms, image_k, mask, order="score")
    vectors = [_gather_vectors(hidden, image_index)]
    if text_pivots:
        text_k = text_pivots if fewest_any_text >= text_pivots else all_text.clamp(max=text_pivots)
        text_index, _ = ops.topk_per_row(text_norms, text_k, text_mask, order="score")
        vectors.append(_gather_vectors(text_hidden.to(hidden.dtype), text_index))
    pivot_vectors = torch.cat(vectors, 1)  # [B, P, D], image pivots then text pivots (official insertion order)
    if positions is not None:
        if text_pivots and text_positions is None:
            raise MissingInputError("dart_select: the set order needs text_positions with positions")
        seq = [positions.gather(1, image_index)]
        if text_pivots:
            seq.append(text_positions.gather(1, text_index))
        # (a prompt without an image takes nothing: any distinct indices give it an order)
        seq = torch.where(has_image[:, None], torch.cat(seq, 1), torch.arange(pivots, device=device))
        visit = pivot_visit_order(seq)
        pivot_vectors = _gather_vectors(pivot_vectors, visit)
    # Cosine of each pivot with every visual token (official -F.cosine_similarity(pivot, candidates)): [B, P, N].
    cosine = ops.similarity_key(pivot_vectors, hidden)

    chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=device).scatter_(
        1, image_index.masked_fill(~image_valid, N), True)[:, :N]
    candidates = mask & ~chosen  # official valid_indices: the image less its pivots
    negative_inf = torch.tensor(float("-inf"), device=device)
    for step in range(pivots):
        # Lowest cosine first (official topk of -cos); taken tokens and padding rank last, ties by index.
        score = torch.where(candidates, -cosine[:, step], negative_inf)
        picked, _ = ops.topk_per_row(score, width, None, order="score")
        hit = torch.zeros(B, N + 1, dtype=torch.bool, device=device)
        picked = picked.masked_fill(torch.arange(width, device=device)[None, :] >= take_rows[:, step:step + 1], N)
        hit = hit.scatter_(1, picked, True)[:, :N]
        chosen |= hit
        candidates &= ~hit
    return ops.pack(chosen)


def l1_norms(x: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` float32 L1 norms of ``[B, N, D]`` rows (official ``torch.norm(p=1, dim=-1)``)."""
    return x.float().abs().sum(-1)


# ------------------------------------------------------------ params
class _DARTParams(Params):
    keep: Keep = Field(
        128,
        description="Budget M (official max_num_trunction; 64 / 128 / 192 for ratios 0.889 / 0.778 / 0.667): a count, "
        "or a ratio of the image's tokens (floor(N * keep), the official N (1 - reduction_ratio)). count: official "
        "keeps 4 + 8 floor(M / 8) tokens (132 for 128).",
    )
    count: Literal["official", "exact"] = Field(
        "official",
        description="official: every pivot takes floor(M / 8), so 4 image pivots + 8 floor(M / 8) are kept (4 more "
        "than M, the published setting); exact: M kept, the M - 4 non-pivot tokens spread over the pivots.",
    )
    image_pivots: int = Field(4, ge=0, description="Image pivots: visual tokens of largest key L1 norm (official 4).")
    text_pivots: int = Field(4, ge=0, description="Text pivots: tokens after the image of largest key L1 norm "
                             "(official 4); they are not kept.")

    @model_validator(mode="after")
    def _some_pivot(self) -> "_DARTParams":
        if self.image_pivots + self.text_pivots < 1:
            raise ValueError("image_pivots + text_pivots: at least one pivot")
        return self


def _pivot_args(p: _DARTParams) -> dict:
    return {"image_pivots": p.image_pivots, "text_pivots": p.text_pivots}


def _kept_range(p: _DARTParams, n: int, where: str) -> tuple[list[int], list[int]]:
    """The counts an image of ``n`` tokens can keep, and the budget ``M`` giving each (host ints)."""
    P = p.image_pivots + p.text_pivots
    if n < p.image_pivots:
        raise BudgetError(f"{where}: an image of {n} tokens has fewer than its {p.image_pivots} image pivots")
    if p.count == "official":
        steps = (n - p.image_pivots) // P
        budgets = [max(P * j, 1) for j in range(steps + 1)]  # M in [1, P) takes 0 per pivot
    else:
        budgets = list(range(max(p.image_pivots, 1), n + 1))
    return [dart_kept(m, n, count=p.count, **_pivot_args(p)) for m in budgets], budgets


class DARTParams(_DARTParams):
    layer: int = Field(2, ge=1, description="Decoder layer K at whose input tokens leave (signals from layer K-1; "
                       "official --pruned_layer 2).")
    pivot_order: Literal["official", "score"] = Field(
        "official",
        description="official: pivots visited in the iteration order of a Python set of their sequence indices (one "
        "host read per call); score: image pivots by key norm, then text pivots (no host read).",
    )


class DART(LLMCompressor):
    """DART: keep the visual tokens least duplicated with a few pivot tokens, at layer K (Wen et al. 2025)."""

    name = "dart"
    Params = DARTParams
    needs = frozenset({KEY_NORMS, NORMED_HIDDEN})

    @classmethod
    def _layers(cls, params: dict, context: BudgetContext) -> range:
        """Layers ``K`` a budget may use: the pipeline's ``K`` first, then earlier ones (``K`` >= 1)."""
        if context.layers < 2:
            raise BudgetError(f"dart: an LLM of {context.layers} layer(s) has no layer K >= 1 to prune at")
        return range(min(cls.validate_params(params).layer, context.layers - 1), 0, -1)

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        p = cls.validate_params(params)
        n, L = context.tokens, context.layers
        layers = cls._layers(params, context)
        kept, _ = _kept_range(p, n, "dart")
        return layer_mean(n, L, [(min(layers), kept[0])]), layer_mean(n, L, [(max(layers), kept[-1])])

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """Layers ``0 .. K-1`` see all ``n`` visual tokens and layers ``K .. L-1`` the kept ones: the mean
        (:func:`~arrcoc.budget.layer_mean`) is ``(K n + (L - K) kept) / L``.  ``kept`` is ``4 + 8 floor(M / 8)``
        (``count: official``) or ``M`` (``exact``); ``M`` is chosen so that the mean is nearest ``target``, at the
        pipeline's ``K`` (official 2) when that mean can come within half a step of it, else at the latest
        earlier layer that can."""
        p = cls.validate_params(params)
        n, L = context.tokens, context.layers
        kept, budgets = _kept_range(p, n, "dart")
        for K in cls._layers(params, context):
            means = [layer_mean(n, L, [(K, k)]) for k in kept]
            half_step = (means[1] - means[0]) / 2 if len(means) > 1 else 0.0
            if target >= means[0] - half_step - 1e-9 or K == 1:
                best = min(range(len(means)), key=lambda i: (abs(means[i] - target), i))
                return {**params, "layer": K, "keep": budgets[best]}
        raise BudgetError(f"dart: no layer reaches a mean of {target:.1f} visual tokens")  # (K == 1 returns above)

    def llm_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.params.layer,)

    def _field(self, state: TokenState, name: str) -> torch.Tensor:
        value = state.per_token.get(name)
        if value is None:
            raise MissingInputError(
                f"dart: needs per_token[{name!r}] (layer {self.params.layer - 1}'s "
                f"{'key L1 norms' if name == KEY_NORMS else 'output through the final norm'}); the Hugging Face "
                "integration (arrcoc.hf.apply) fills it for a stage whose needs name it"
            )
        return value

    @staticmethod
    def _context_field(llm, name: str, signal: str) -> torch.Tensor:
        value = getattr(llm, name, None)
        if value is None:
            raise MissingInputError(
                f"dart: state.llm.{name} is missing; the model integration sets it for a stage that needs "
                f"{signal!r}"
            )
        return value

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        llm = self.llm_context(state)
        norms = self._field(state, KEY_NORMS)
        hidden = self._field(state, NORMED_HIDDEN)
        text = {"text_hidden": None, "text_norms": None, "text_mask": None}
        if p.text_pivots:
            text = {"text_hidden": self._context_field(llm, "text_normed_hidden", NORMED_HIDDEN),
                    "text_norms": self._context_field(llm, "text_key_norms", KEY_NORMS),
                    "text_mask": self._context_field(llm, "text_mask", KEY_NORMS)}
        positions = {}
        if p.pivot_order == "official":
            positions = {"positions": self._context_field(llm, "visual_positions", KEY_NORMS)}
            if p.text_pivots:
                positions["text_positions"] = self._context_field(llm, "text_positions", KEY_NORMS)
        takes = dart_takes(p.keep, state.counts, count=p.count, **_pivot_args(p))
        index, valid = dart_select(hidden, norms, state.mask, **text, takes=takes, **positions, **_pivot_args(p))
        return ops.keep(state, index, valid)


# ------------------------------------------------------------ before the LLM (an arrcoc choice)
class DARTPreParams(_DARTParams):
    """``dart_pre``: the budget and pivots of ``dart``; no layer (before the LLM) and score order (no positions)."""


class DARTPre(Compressor):
    """DART before the LLM (an arrcoc choice, not the official method): pivots and cosines on the projected
    features, text pivots from the LLM-input embeddings of the text after the image, score order."""

    name = "dart_pre"
    Params = DARTPreParams
    stage = "projector"  # the projected features live in the LLM's embedding space, where the query rows are
    needs = frozenset({"query"})

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        kept, _ = _kept_range(cls.validate_params(params), context.tokens, "dart_pre")
        return float(kept[0]), float(kept[-1])

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """``keep`` = the budget ``M`` whose kept count (``4 + 8 floor(M / 8)``, or ``M`` with ``count: exact``)
        is nearest ``target``."""
        kept, budgets = _kept_range(cls.validate_params(params), context.tokens, "dart_pre")
        best = min(range(len(kept)), key=lambda i: (abs(kept[i] - target), i))
        return {**params, "keep": budgets[best]}

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        text = {"text_hidden": None, "text_norms": None, "text_mask": None}
        if p.text_pivots:
            query, query_mask = state.require_query("dart_pre")
            text = {"text_hidden": query, "text_norms": l1_norms(query), "text_mask": query_mask}
        takes = dart_takes(p.keep, state.counts, count=p.count, where="dart_pre", **_pivot_args(p))
        index, valid = dart_select(state.tokens, l1_norms(state.tokens), state.mask, **text, takes=takes,
                                   where="dart_pre", **_pivot_args(p))
        return ops.keep(state, index, valid)


@hookimpl
def arrcoc_register_plugins(register):
    register(DART)
    register(DARTPre)
