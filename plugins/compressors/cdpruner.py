"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing
Conditional Diversity for Token Pruning in MLLMs", arXiv 2506.10967).

Faithful to Theia-4869/CDPruner @ 9541616, ``llava/model/llava_arch.py``
``encode_images`` (l.141-187), on the **projected** features (after
``mm_projector``, so ``stage = "projector"``):

* similarity ``S = X^ X^T`` of the features normalised in their own dtype
  (fp16 in LLaVA) with no eps, then ``.float()`` (l.150-152);
* relevance ``r_i = mean_m(-cos(x_i, q_m))`` over the instruction's rows
  ``q_m``, then ``r = (r - min r + 1e-6) / (max r - min r)`` (l.154-159);
* conditional DPP kernel ``L = diag(r) S diag(r)`` in float32 (l.166,
  paper Eq. 8);
* greedy MAP inference with incremental Cholesky (Chen et al., NeurIPS 2018,
  "Fast Greedy MAP Inference for DPP", Alg. 1; official l.169-180):
  ``d^2 = diag(L)``; each step takes ``j = argmax d^2`` (first index on
  ties), ``e = (L[j] - sum_{s<t} c_s[j] c_s) / sqrt(d^2_j)``, stores
  ``c_t = e``, sets ``d^2 -= e^2`` and ``d^2_j = -inf``: ``O(N k^2)`` for
  ``k`` picks after the ``O(N^2 D)`` similarity, no matrix inverted;
* the picks sorted ascending (original order, l.182-184).

The instruction, two ways:

* ``clip: <CLIP model>`` (the official relevance, ``clip_encoder.py`` ``load_text_tower`` l.39-48 and
  ``forward`` l.61-98): the question's text (``state.meta["query_text"]``, one string per row) without the
  LLaVA answer-format suffix (``model_vqa_loader.py`` l.110), tokenised by CLIP's tokenizer with no
  truncation, zero-padded to a multiple of the text tower's 77 positions and cut into ``M`` rows of 77, whose
  ``CLIPTextModelWithProjection.text_embeds`` are the rows ``q_m``; the patches' embeddings are
  ``visual_projection(post_layernorm(features).float())`` of the tower's own features before any projector
  (``per_token["tower_features"]``: LLaVA-1.5's ``hidden_states[-2][:, 1:]``), float32 as officially.  The
  DPP similarity stays on the tokens (the projected features inside a VLM);
* ``clip: null``: the cosine of the tokens themselves to ``state.query``: inside a VLM (``arrcoc.hf``) the
  LLM input embeddings of the prompt's text after the image, standalone whatever the ``query_encoder``
  gives.  This is the non-official option of METHODS.md for models without a CLIP text tower (an arrcoc
  choice).  Each query token is one row ``q_m``; padding query tokens take no part.

Quirks of the official code (docs/methods/cdpruner.md):

1. the relevance is **negated** (``(-relevance).mean``, also in
   ``scripts/visualize_relevance.py``): patches *least* similar to the
   question get the highest weight.  It produced the published numbers, so it
   is the default; ``negate: false`` uses the relevance as the paper's text
   describes it;
2. no stop criterion: past the rank of ``L`` (at most the feature width)
   ``d^2`` is float32 rounding noise, which picks the next tokens, until it
   reaches 0, ``sqrt`` gives NaN or inf and the official loop repeats an
   index.  Guard: a row whose best ``d^2`` is not above ``eps`` (default
   ``1e-5``) times its largest ``diag(L)`` stops the DPP and fills the rest of
   its budget with its unpicked tokens of largest kernel diagonal
   ``r_i^2 S_ii`` (the quality term), ties by index; ``eps: 0`` acts only
   where the official result is NaN.  LLaVA (4096-d features, at most 576
   picks of 576) stays far above the threshold: the published picks are
   unchanged.  A zero token (official: NaN from the division by its norm) is
   a zero row of ``S``;
3. ``+1e-6`` sits in the numerator only: equal relevance everywhere divides by
   zero.  Guard: such an image gets ``r = 1`` everywhere (pure diversity; the
   scale of ``L`` does not change the picks);
4. min / max are taken over the whole batch (the eval batch is one image):
   here per image, shared by that image's views when ``meta["views"]`` gives
   a LLaVA-NeXT layout (each view still keeps its own budget, as the
   official NeXT code does).

The paper's ``theta`` (``r = exp(theta / (2 (1 - theta)) r)``) is commented
out in the official code; ``theta`` offers it (default off).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from arrcoc import ops
from arrcoc.errors import InputError, MissingInputError, ModelError
from arrcoc.models import resolve_model
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Keep, Params
from arrcoc.state import TokenState


def cdpruner_similarity(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``S`` ``[B, N, N]`` float32: cosine of the tokens, normalised in their own dtype (official l.150-152).

    Padding and zero tokens get zero rows and columns (the official division by a zero norm gives NaN).
    Both operands are zero-padded to whole tiles of :data:`arrcoc.ops.SIMILARITY_TILE` rows, so that an
    entry's value depends on its two tokens only (a ragged batch equals the images alone; duplicate tokens
    tie exactly and are picked by index).
    """
    B, N, _ = tokens.shape
    norm = tokens.norm(dim=-1, keepdim=True)
    usable = mask[..., None] & (norm > 0)
    unit = torch.where(usable, tokens / torch.where(usable, norm, torch.ones_like(norm)), torch.zeros_like(tokens))
    unit = unit.float()
    if N % ops.SIMILARITY_TILE:
        unit = F.pad(unit, (0, 0, 0, -N % ops.SIMILARITY_TILE))
    return (unit @ unit.transpose(1, 2))[:, :N, :N]


def cdpruner_relevance(
    tokens: torch.Tensor,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    negate: bool = True,
    theta: float | None = None,
) -> torch.Tensor:
    """Relevance ``r`` ``[B, N]`` float32 in ``(0, 1]`` (official l.154-159; 0 on padding).

    ``r_i = mean over real query tokens of -cos(token_i, q_m)`` (``negate=False``: ``+cos``), min-max
    normalised ``(r - min + 1e-6) / (max - min)`` over each group of rows (``groups`` ``[B]`` int64, one id
    per image, its views sharing it; ``None``: every row alone); a group with ``max == min`` gets ``r = 1``.
    ``theta`` (the paper's, commented out officially): ``r = exp(theta / (2 (1 - theta)) r)``.
    """
    B = tokens.shape[0]
    # float32 as officially (CLIP's projections and text tower load in float32), and no float64 product.
    cos = ops.query_similarity(tokens.float(), query.float(), query_mask, reduce="mean")
    r = -cos if negate else cos
    if groups is None:
        groups = torch.arange(B, device=tokens.device)
    G = B  # group ids are < B
    inf = torch.full((G,), float("inf"), device=tokens.device)
    index = groups[:, None].expand_as(r)
    low = inf.scatter_reduce(0, index.reshape(-1), r.masked_fill(~mask, float("inf")).reshape(-1), "amin")
    high = (-inf).scatter_reduce(0, index.reshape(-1), r.masked_fill(~mask, float("-inf")).reshape(-1), "amax")
    low, high = low[groups][:, None], high[groups][:, None]
    span = high - low
    flat = ~(span > 0)  # equal relevance (official: division by zero), or a row with no real token
    r = torch.where(flat, torch.ones_like(r), (r - low + 1e-6) / torch.where(flat, torch.ones_like(span), span))
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r.masked_fill(~mask, 0.0)


def cdpruner_select(
    similarity: torch.Tensor,
    relevance: torch.Tensor,
    mask: torch.Tensor,
    k: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of the conditional DPP ``L = diag(r) S diag(r)``, incremental Cholesky (official l.166-184).

    Args:
        similarity: ``[B, N, N]`` float32 ``S``; relevance ``[B, N]`` ``r`` (0 on padding); mask ``[B, N]``.
        k: ``[B]`` int64 picks per row (``<=`` its real tokens).
        eps: a row whose best ``d^2`` is not above ``eps`` times its largest ``diag(L)`` (NaN included) stops the
            DPP and picks its unpicked tokens by largest ``diag(L)`` (official: no stop; past the rank of ``L`` its
            picks follow rounding noise, then NaN).  0: only where the official ``sqrt`` gives NaN or inf.
            Default: the plugin's.

    Returns:
        ``(index [B, K], valid [B, K])``, each row's picks ascending (``K = max k``).
    """
    B, N, _ = similarity.shape
    device = similarity.device
    r = relevance.float()
    kernel = r[:, :, None] * similarity * r[:, None, :]  # official operand order (l.166)
    quality = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~mask, float("-inf"))
    gain = quality.clone()  # d^2 (official di2s)
    # Numerical rank: a gain within float32 rounding of the row's largest diag(L) is noise, not diversity.
    floor = eps * quality.amax(dim=-1).clamp_min(0.0) if N else quality.new_zeros(B)
    steps = int(k.max()) if k.numel() else 0  # the one host sync
    chol = torch.zeros(B, N, steps, device=device)  # c_t as columns: each row's sum over t is one reduction
    picks = torch.zeros(B, steps, dtype=torch.int64, device=device)
    rows = torch.arange(B, device=device)
    for t in range(steps):
        best, j = gain.max(dim=-1)  # first index on ties (official argmax)
        exhausted = ~(best > floor)
        fallback = quality.masked_fill(torch.isneginf(gain), float("-inf")).argmax(dim=-1)
        j = torch.where(exhausted, fallback, j)
        picks[:, t] = j
        kernel_row = kernel[rows, j]  # [B, N]
        chol_j = chol[rows, j, :t]  # [B, t]
        scale = torch.where(exhausted, torch.ones_like(best), best).sqrt()  # no sqrt of d^2 <= 0 (quirk 2)
        e = (kernel_row - (chol[:, :, :t] * chol_j[:, None, :]).sum(-1)) / scale[:, None]
        e = e.masked_fill(exhausted[:, None], 0.0)
        chol[:, :, t] = e
        gain = gain - e.square()
        gain[rows, j] = float("-inf")
    valid = torch.arange(steps, device=device)[None, :] < k[:, None]
    # Ascending within the valid prefix (official sort of the picks), invalid entries last.
    picks = torch.sort(picks.masked_fill(~valid, N), dim=1).values
    return picks.masked_fill(~valid, 0), valid


#: The LLaVA answer-format suffix the official loader removes from the question (``model_vqa_loader.py`` l.110).
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True, eq=False)
class ClipRelevance:
    """What the official relevance reads from a CLIP checkpoint (``load_text_tower``), float32 as officially: the
    tokenizer, ``CLIPTextModelWithProjection``, and the vision side's ``post_layernorm`` and
    ``visual_projection`` (the vision encoder itself is not kept: the features come from the model's tower)."""

    source: str
    tokenizer: Any
    text_tower: torch.nn.Module
    post_layernorm: torch.nn.LayerNorm
    visual_projection: torch.nn.Linear

    @property
    def context(self) -> int:
        """The text tower's positions (77): the official chunk length (``max_position_embeddings``)."""
        return int(self.text_tower.config.max_position_embeddings)

    @property
    def vision_width(self) -> int:
        """The width of the tower features ``post_layernorm`` takes."""
        return int(self.post_layernorm.normalized_shape[0])

    def to(self, device: torch.device | str) -> "ClipRelevance":
        return ClipRelevance(self.source, self.tokenizer, self.text_tower.to(device), self.post_layernorm.to(device),
                             self.visual_projection.to(device))


_CLIP_LOADED: dict[tuple[str, str], ClipRelevance] = {}
_CLIP_LOCK = threading.Lock()


def load_clip(source: str, device: torch.device | str = "cpu") -> ClipRelevance:
    """The CLIP parts of ``source`` (a directory, hub id or ``arrcoc:<name>``) on ``device``, loaded once per
    process and device (every cdpruner stage naming the same model shares them).

    Keyed by what ``source`` names: a local folder by its absolute path (the same relative name in another
    working directory is another model), a hub id as it is.
    """
    path = resolve_model(source)
    local = Path(path)
    key = (str(local.resolve()) if local.is_dir() else path, str(torch.device(device)))
    with _CLIP_LOCK:
        if key not in _CLIP_LOADED:
            loaded = _load_clip(source)
            _CLIP_LOADED[key] = loaded if key[1] == "cpu" else loaded.to(device)
        return _CLIP_LOADED[key]


def _load_clip(source: str) -> ClipRelevance:
    from transformers import AutoConfig, CLIPTextModelWithProjection, CLIPTokenizerFast, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    path = resolve_model(source)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelError(
            f"cdpruner.clip: expected a CLIP model directory or hub id (e.g. openai/clip-vit-large-patch14-336), "
            f"cannot read a model config from {source!r} ({type(exc).__name__}: {exc})"
        ) from None
    if getattr(config, "model_type", None) != "clip":
        raise ModelError(
            f"cdpruner.clip: expected a CLIP model (config model_type 'clip': a text tower and both projections, e.g. "
            f"openai/clip-vit-large-patch14-336), got model_type {getattr(config, 'model_type', None)!r} at {source!r}"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # each half of the checkpoint reports the other half's weights as unused
    try:
        tokenizer = CLIPTokenizerFast.from_pretrained(path)
        text_tower = CLIPTextModelWithProjection.from_pretrained(path, dtype=torch.float32).eval()
        vision = CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as exc:
        raise ModelError(
            f"cdpruner.clip: cannot load the CLIP tokenizer, text tower and visual projection of {source!r} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    text_width, image_width = text_tower.text_projection.out_features, vision.visual_projection.out_features
    if text_width != image_width:
        raise ModelError(
            f"cdpruner.clip: {source!r} projects the text to {text_width} channels but the images to {image_width}; "
            "the relevance is their cosine, so both must land in one joint space (text_config and vision_config "
            "projection_dim of a CLIP checkpoint)"
        )
    text_tower.requires_grad_(False)
    vision.requires_grad_(False)
    return ClipRelevance(str(source), tokenizer, text_tower, vision.vision_model.post_layernorm,
                         vision.visual_projection)


def clip_text_rows(tokenizer: Any, texts: Sequence[str], context: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The official text rows (``clip_encoder.py`` l.82-89) of each text: tokenised with no truncation,
    zero-padded (id 0, mask 0) to a multiple of ``context`` and cut into rows of ``context``.

    Returns ``(input_ids [R, context], attention_mask [R, context], rows per text)``.
    """
    encoded = tokenizer(list(texts), truncation=False)
    ids, masks, rows = [], [], []
    for row_ids, row_mask in zip(encoded["input_ids"], encoded["attention_mask"]):
        segments = (len(row_ids) - 1) // context + 1
        padding = context * segments - len(row_ids)
        ids.append(torch.tensor(row_ids + [0] * padding).view(segments, context))
        masks.append(torch.tensor(row_mask + [0] * padding).view(segments, context))
        rows.append(segments)
    return torch.cat(ids), torch.cat(masks), rows


def clip_text_embeds(clip: ClipRelevance, texts: Sequence[str], device: torch.device | str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_embeds [B, M, C] float32, mask [B, M])``: each text's official rows through
    ``CLIPTextModelWithProjection`` (``text_embeds``), ``M`` the most rows of a text.

    Every row of every distinct text goes through the tower in one batch (the rows are independent and all
    ``context`` long, padding included, as officially); texts repeated across rows (LLaVA-NeXT views) once.
    """
    unique = list(dict.fromkeys(texts))
    ids, attention, rows = clip_text_rows(clip.tokenizer, unique, clip.context)
    with torch.no_grad():
        embeds = clip.text_tower(input_ids=ids.to(device), attention_mask=attention.to(device)).text_embeds.float()
    M = max(rows)
    out = embeds.new_zeros(len(unique), M, embeds.shape[-1])
    for u, chunk in enumerate(embeds.split(rows)):  # one copy per distinct text, sizes known on the host
        out[u, : chunk.shape[0]] = chunk
    mask = torch.arange(M)[None, :] < torch.tensor(rows)[:, None]
    which = torch.tensor([unique.index(t) for t in texts], device=out.device)
    return out[which], mask.to(out.device)[which]


def clip_image_embeds(clip: ClipRelevance, features: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` float32: ``visual_projection(post_layernorm(features).float())`` (official l.93-94).

    The layer norm runs in the features' dtype, as the official tower's own (fp16 in LLaVA; float64 features
    in float32, no float64 product); the projection in float32, as officially loaded.
    """
    dtype = features.dtype if features.dtype in (torch.float16, torch.bfloat16) else torch.float32
    norm = clip.post_layernorm
    normed = F.layer_norm(features.to(dtype), norm.normalized_shape, norm.weight.to(dtype), norm.bias.to(dtype),
                          norm.eps)
    with torch.no_grad():
        return clip.visual_projection(normed.float())


class CDPrunerParams(Params):
    keep: Keep = Field(
        64,
        description="Tokens each image keeps (official --visual_token_num 64 / 128 / 192 of 576: an exact count), "
        "or a ratio of its tokens.",
    )
    negate: bool = Field(
        True,
        description="Official: relevance = mean of -cos(token, instruction), which favours the patches least like "
        "the question (it gave the published numbers); false: +cos, as the paper's text reads.",
    )
    theta: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="The paper's relevance weight r = exp(theta / (2 (1 - theta)) r) (commented out in the "
        "official code, 0.5 there); null: off, as officially.",
    )
    eps: float = Field(
        1e-5, ge=0.0, lt=1.0,
        description="Guard of the official loop (no stop criterion): a row whose best DPP gain d^2 is not above eps "
        "x its largest kernel diagonal (the numerical rank of L is reached) fills the rest of its budget with its "
        "unpicked tokens of largest relevance r^2 S_ii; 0: only where the official code gives NaN.",
    )
    clip: str | None = Field(
        None,
        description="A CLIP model (directory or hub id; LLaVA-1.5: openai/clip-vit-large-patch14-336) for the "
        "official relevance: CLIP text embeddings of the question (state.meta['query_text'], 77-token rows) against "
        "visual_projection(post_layernorm(tower features)) of the patches. null: the cosine of the tokens to "
        "state.query (inside a VLM the LLM input embeddings of the prompt's text: an arrcoc choice).",
    )
    remove_text: list[str] = Field(
        [ANSWER_SUFFIX],
        description="With clip: strings removed from the question (str.replace) before CLIP tokenises it; official: "
        "LLaVA's answer-format suffix.",
    )


class CDPruner(Compressor):
    """CDPruner: conditional-DPP token selection, relevance to the instruction x similarity (Zhang et al. 2025)."""

    name = "cdpruner"
    stage = "projector"  # official: on the projected features, where the instruction embeddings live in a VLM
    Params = CDPrunerParams
    needs = frozenset({"query"})

    def _groups(self, state: TokenState) -> torch.Tensor | None:
        """One id per image for the relevance's min / max: an image's LLaVA-NeXT views share theirs."""
        layout = state.meta.get("views")
        if layout is None:
            return None
        views = [1 + rows * cols for rows, cols in layout]
        if sum(views) != state.B:
            raise InputError(f"cdpruner: meta['views'] describes {sum(views)} views, the batch holds {state.B}")
        return torch.repeat_interleave(torch.arange(len(views)), torch.tensor(views)).to(state.device)

    def requirements(self) -> frozenset[str]:
        # clip: the question as text and the tower's features before any projector, instead of the embeddings.
        return frozenset({"query_text", "tower_features"}) if self.params.clip is not None else self.needs

    def _clip_inputs(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image embeds [B, N, C], text embeds [B, M, C], their mask [B, M])`` of the official relevance."""
        p = self.params
        texts = state.meta.get("query_text")
        if texts is None:
            raise MissingInputError(
                "cdpruner.clip: needs the question as text (state.meta['query_text']): pass query='...' strings "
                "(arrcoc run --query), or inside a VLM arrcoc.hf.apply(model, spec, tokenizer=processor.tokenizer) "
                "with the prompt given as input_ids"
            )
        if isinstance(texts, str) or len(texts) != state.B or not all(isinstance(t, str) for t in texts):
            raise InputError(
                f"cdpruner.clip: state.meta['query_text'] must hold one string per row ({state.B}), got "
                f"{type(texts).__name__} {texts!r:.80}"
            )
        features = state.per_token.get("tower_features")
        if features is None:
            raise MissingInputError(
                "cdpruner.clip: needs the tower's features before any projector (per_token['tower_features'], "
                "provided by the encoder when a stage needs 'tower_features')"
            )
        clip = load_clip(p.clip, state.device)
        if features.shape[-1] != clip.vision_width:
            raise InputError(
                f"cdpruner.clip: the tower's features are {features.shape[-1]} wide, but the post_layernorm of "
                f"{p.clip!r} takes {clip.vision_width}; give the CLIP model whose vision tower produced the features "
                "(LLaVA-1.5: openai/clip-vit-large-patch14-336)"
            )
        questions = []
        for text in texts:
            for remove in p.remove_text:  # official: question.replace(suffix, "")
                text = text.replace(remove, "")
            questions.append(text)
        text_embeds, text_mask = clip_text_embeds(clip, questions, state.device)
        return clip_image_embeds(clip, features), text_embeds, text_mask

    def __call__(self, state: TokenState) -> TokenState:
        p = self.params
        if p.clip is None:
            embeds = state.tokens
            query, query_mask = state.require_query("cdpruner")
        else:
            embeds, query, query_mask = self._clip_inputs(state)
        k = ops.resolve_keep(p.keep, state.counts, where="cdpruner.keep")
        similarity = cdpruner_similarity(state.tokens, state.mask)
        relevance = cdpruner_relevance(
            embeds, query, query_mask, state.mask, self._groups(state), negate=p.negate, theta=p.theta
        )
        index, valid = cdpruner_select(similarity, relevance, state.mask, k, p.eps)
        return ops.keep(state, index, valid)


@hookimpl
def arrcoc_register_plugins(register):
    register(CDPruner)
