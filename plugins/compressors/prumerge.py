"""LLaVA-PruMerge and PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive
Token Reduction for Efficient Large Multimodal Models").

Faithful to 42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``:

* attention (``token_prune_merge_advanced``): the q / k projections of the
  **last** CLIP layer on its input ``layer_norm1(hidden_states[-2])``, one head
  over the full width, ``softmax(q k^T * C ** -0.5)``, ``cls_attn = attn[:, 0,
  1:]``; the features are ``hidden_states[-2][:, 1:]``. In arrcoc: the
  ``timm_vit`` encoder with ``layer: -2, attention_layer: -1,
  cls_attention_heads: single`` exposes exactly this ``cls_attn`` and the
  full-width ``keys`` (the ``k_proj`` output);
* adaptive selection (``outlier_dectection``, paper Sec. 3.1 "Adaptive
  Important Token Selection via Outlier Detection"): ``ratio`` = fraction of
  ``cls_attn`` above ``Q3 + 1.5 * IQR`` (numpy's linear percentiles), then
  ``topk(cls_attn, int(N * ratio))``, sorted by decreasing attention;
* merging (paper Sec. 3.1 "Token Supplement via Similar Key Clustering"):
  each kept token ``i`` becomes ``x_i + sum_j a_j x_j`` over its 32 nearest
  tokens ``j`` by key cosine among **all other** tokens (kept and pruned),
  ``a_j`` their (unnormalised) ``cls_attn``, computed from the original
  features; one extra token ``sum_{j pruned} a_j x_j``; output = kept tokens in
  descending attention, then the extra token;
* PruMerge+ (``token_prune_merge_advanced_plus``, adaptive branch, which the
  official ``forward`` calls at the final commit; paper Sec. 3.2): ``step = int(1 / ratio)``, the spatially uniform indices
  ``arange(0, N - 1, int(step / 3))`` not already kept are appended (in
  increasing order) after the outliers, before the merge, and merge like kept
  tokens.

How it goes through :mod:`arrcoc.ops`: :func:`prumerge_values` computes the
method's output values (a pure tensor function, checked against a loop over
the official formula in the tests). Provenance moves with
:func:`arrcoc.ops.merge`: every pruned token is merged into the kept token
that absorbed it (of the kept tokens that have it among their neighbours, the
one with the most similar key), or, if no kept token took it, into the extra
token, which lives in the slot of the pruned token with the highest
attention. ``size`` is conserved and ``origin`` points every patch at the
token that carries it; ``merge``'s ``order`` key puts the tokens in the
official order. The token values are then replaced by the computed ones
(``dataclasses.replace`` of ``tokens`` only: PruMerge's update ``x_i + sum_j
a_j x_j`` is not a weighted average, so it cannot come out of ``merge``;
``merge`` moves zero-width tokens, so that no ``D``-wide average is computed
only to be replaced). Other ``per_token`` fields are the
size-weighted means ``merge`` makes.

Cost: the neighbour search is one ``torch.topk`` over integer keys that
order by (cosine, -index), unique per row, so ties need no sort (float64
keys, from float64 inputs, fall back to a stable sort); the supplement is a weighted ``embedding_bag`` over the ``neighbors`` rows of
each cluster (``O(K L D)``, not a dense ``[K, N] x [N, D]`` product).

Differences, on purpose:

* the official code pools the attention of the whole batch for the IQR and
  uses one count for all images (it is used with batch 1); here the outlier
  test and the count are per image (``adaptive``: ragged counts);
* no outlier at all (``ratio == 0``, flat attention): the official PruMerge
  keeps no token (only the extra one) and PruMerge+ divides by zero; here the
  most attended token is kept (at least one token, as
  :func:`arrcoc.ops.resolve_keep` does) and a warning is recorded, and
  PruMerge+ then samples with ``ratio = 1 / N``;
* ``int(step / 3) == 0`` (``ratio > 1/3``, possible only with a fixed ``keep``)
  makes the official ``arange`` fail; here the stride is 1 (every token is
  sampled, the limit of the rule) and a warning is recorded;
* fewer than 33 tokens: the official ``topk(k=32)`` fails; here each kept
  token takes all ``n - 1`` others (warning recorded);
* nothing pruned: the official code appends a zero extra token; here there is
  no extra token (there is nothing for it to carry);
* ``keep`` (ratio or count) replaces the adaptive count by a fixed one, like
  the official ``if_adaptive=False, reduction_ratio``; PruMerge+ then samples
  with ``ratio = k / N`` (the official non-adaptive PruMerge+ branch is a
  training variant with another sampling rule, not reproduced);
* the hard-coded ``575`` of the official ``arange`` is ``N - 1`` of each image;
* ties go to the lower token index: equal CLS attentions (selection and
  output order, :func:`arrcoc.ops.topk_per_row`) and equal key cosines
  (neighbours, :func:`arrcoc.ops.topk`); the official ``torch.topk`` leaves
  them to its kernel;
* the values are computed in float32 and cast back to the tokens' dtype.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from arrcoc import ops
from arrcoc.errors import InputError, MissingInputError, record_warning
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import BudgetContext, Compressor, Keep, Params
from arrcoc.state import TokenState


def iqr_outlier_count(cls_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, how many real tokens lie above ``Q3 + 1.5 * IQR`` of that image's
    attention (official ``outlier_dectection``, numpy linear percentiles).

    ``cls_attn`` ``[B, N]``, ``mask`` ``[B, N]`` -> ``[B]`` int64.
    """
    if cls_attn.shape[1] == 0:  # no token slot (an image with no token has NaN quantiles: no outlier)
        return torch.zeros(cls_attn.shape[0], dtype=torch.int64, device=cls_attn.device)
    x = cls_attn.double().masked_fill(~mask, float("nan"))
    q = torch.nanquantile(x, torch.tensor([0.25, 0.75], dtype=torch.float64, device=x.device), dim=1)
    upper = q[1] + 1.5 * (q[1] - q[0])
    return ((x > upper[:, None]) & mask).sum(1)


def spatial_samples(kept: torch.Tensor, counts: torch.Tensor, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge+'s uniform samples: ``arange(0, N - 1, int(int(1 / ratio) / 3))`` minus the kept tokens.

    Args:
        kept: ``[B, N]`` bool, tokens already kept.
        counts: ``[B]`` real tokens per image.
        ratio: ``[B]`` float64 in (0, 1], the kept ratio.

    Returns:
        ``(samples [B, N] bool, stride [B] int64)``; a stride of 0 is raised to 1.
    """
    step = torch.floor(1.0 / ratio)
    stride = torch.floor(step / 3.0).to(torch.int64)
    stride = stride.clamp(min=1)
    j = torch.arange(kept.shape[1], device=kept.device)[None, :]
    samples = (j % stride[:, None] == 0) & (j < counts[:, None] - 1) & ~kept
    return samples, stride


def prumerge_values(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    cls_attn: torch.Tensor,
    mask: torch.Tensor,
    kept_index: torch.Tensor,
    kept_valid: torch.Tensor,
    neighbors: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PruMerge's token supplement (official ``token_prune_merge_advanced``, the loop over kept tokens).

    For each kept token ``i``: its ``neighbors`` most similar tokens by key
    cosine among all other real tokens, ``x_i + sum_j a_j x_j`` with ``a``
    the CLS attention; the extra token ``sum_{j pruned} a_j x_j``.

    Args:
        tokens: ``[B, N, D]``; keys ``[B, N, C]``; cls_attn, mask ``[B, N]``.
        kept_index, kept_valid: ``[B, K]`` the kept tokens (valid ones first).
        neighbors: cluster size (official 32), at most ``n - 1`` per image.

    Returns:
        ``(kept_values [B, K, D] float32, extra [B, D] float32, absorbed_by [B, N])``
        where ``absorbed_by[b, j]`` is the position in the kept list of the
        kept token that has ``j`` among its neighbours with the highest
        cosine (the lowest position among equal cosines), or -1.
    """
    B, N, D = tokens.shape
    K = kept_index.shape[1]
    device = tokens.device
    x = tokens.float()
    a = cls_attn.float() * mask
    safe = kept_index.masked_fill(~kept_valid, 0)
    pruned = mask & ~_index_mask(kept_index, kept_valid, N)
    extra = ((a * pruned)[:, None, :] @ x)[:, 0]
    L = max(0, min(neighbors, N - 1))
    if K == 0 or L == 0:  # no kept token, or one token per image: nothing to absorb
        kept_values = x.gather(1, safe[..., None].expand(B, K, D)).masked_fill_(~kept_valid[..., None], 0.0)
        return kept_values, extra, torch.full((B, N), -1, dtype=torch.int64, device=device)
    # Official ``cos_sim_matrix`` of the normalised keys, as a ranking key (equal cosines equal in any batch).
    sim = ops.similarity_key(ops.gather_rows(keys, safe, kept_valid), keys)  # [B, K, N]
    # Official ``torch.topk(cos_sim_matrix, k=32)`` over the other real tokens; equal cosines go to the lower
    # token index (the official order of ties is torch's kernel's, which differs between a padded row and the
    # same row alone).
    if sim.element_size() <= 4:  # one integer key per entry, unique in its row: a plain torch.topk is exact
        key = _unique_desc_key(sim, torch.arange(N, device=device))
        key.masked_fill_(~mask[:, None, :], _LOWEST)  # padding
        key.scatter_(2, safe[..., None], _LOWEST)  # the token itself
        nbr = torch.topk(key, L, dim=-1).indices  # [B, K, L], by decreasing cosine, then increasing index
    else:  # float64 keys (float64 inputs) do not fit beside an index in 64 bits: a stable sort
        ranked = sim.masked_fill(~mask[:, None, :], float("-inf")).scatter_(2, safe[..., None], float("-inf"))
        nbr = ops.topk(ranked, L, dim=-1).indices
    per_row = torch.minimum(mask.sum(1) - 1, torch.tensor(neighbors, device=device)).clamp(min=0)
    nbr_valid = (torch.arange(L, device=device) < per_row[:, None, None]) & kept_valid[..., None]
    # ``x_i + sum_j a_j x_j`` over the cluster: a weighted bag of L rows per kept token (the official
    # gather-and-sum), O(K L D) rather than a dense [K, N] x [N, D] product.
    flat_nbr = (nbr + (torch.arange(B, device=device) * N)[:, None, None]).reshape(B * K, L)
    weights = (a.gather(1, nbr.reshape(B, K * L)).reshape(B, K, L) * nbr_valid).reshape(B * K, L)
    supplement = F.embedding_bag(flat_nbr, x.reshape(B * N, D), per_sample_weights=weights, mode="sum")
    flat_kept = (safe + (torch.arange(B, device=device) * N)[:, None]).reshape(-1)
    kept_values = x.reshape(B * N, D).index_select(0, flat_kept).view(B, K, D).add_(supplement.view(B, K, D))
    kept_values.masked_fill_(~kept_valid[..., None], 0.0)
    # Of the kept tokens that have ``j`` among their neighbours, the one with the most similar key, the lowest
    # kept position among equal cosines: the largest cosine over the clusters, then the first position with it.
    flat = nbr.reshape(B, K * L)
    cos = sim.gather(2, nbr).masked_fill_(~nbr_valid, float("-inf"))
    best = torch.full((B, N), float("-inf"), dtype=sim.dtype, device=device)
    best.scatter_reduce_(1, flat, cos.reshape(B, K * L), reduce="amax")
    is_best = nbr_valid & (cos == best.gather(1, flat).view(B, K, L))
    position = torch.where(is_best, torch.arange(K, device=device)[None, :, None], K).reshape(B, K * L)
    owner = torch.full((B, N), K, dtype=torch.int64, device=device).scatter_reduce_(1, flat, position, reduce="amin")
    absorbed_by = torch.where(owner < K, owner, -1)
    return kept_values, extra, absorbed_by


#: Below every key :func:`_unique_desc_key` makes (excluded entries).
_LOWEST = torch.iinfo(torch.int64).min


def _index_bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _unique_desc_key(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like ``(values, -index)``: larger value first, then lower index; unique per ``index``.

    ``values``: floats of at most 32 bits (float32 cosines from :func:`arrcoc.ops.similarity_key`; a
    narrower dtype converts to float32 exactly). The float32 bits are sign and magnitude,
    so ``magnitude`` for a positive float and ``-magnitude`` for a negative one are integers in the floats'
    order, equal for equal floats (``-0.0`` and ``0.0`` both 0); shifted left, the reversed index fills the
    low bits. A ``torch.topk`` over these keys has no ties to leave to its kernel. In-place steps: each
    fresh ``[B, K, N]`` buffer costs page faults on the CPU.
    """
    bits = _index_bits(index.shape[-1])
    raw = values.float().view(torch.int32)
    sign = raw >> 31  # 0 or -1 (all ones)
    key = raw & 0x7FFFFFFF
    key ^= sign  # two's complement negation where sign is -1: (m ^ -1) - (-1) = -m
    key -= sign
    key = key.to(torch.int64)
    key <<= bits
    key |= (1 << bits) - 1 - index
    return key


def _index_mask(index: torch.Tensor, valid: torch.Tensor, N: int) -> torch.Tensor:
    """``[B, N]`` bool: which tokens the valid entries of ``index`` ``[B, K]`` name."""
    hits = torch.zeros(index.shape[0], N, dtype=torch.int64, device=index.device)
    return hits.scatter_add_(1, index.masked_fill(~valid, 0), valid.to(torch.int64)) > 0


class PruMergeParams(Params):
    keep: Keep | None = Field(
        None,
        description="null = adaptive count by IQR outliers (official); a ratio or count fixes the number of "
        "selected tokens (official if_adaptive=False).",
    )
    neighbors: PositiveInt = Field(32, description="Tokens merged into each kept token (official 32).")
    score: str = Field(
        "cls_attn",
        description="per_token CLS attention (official: last layer on hidden_states[-2], one head over the full "
        "width: timm_vit `layer: -2, attention_layer: -1, cls_attention_heads: single`).",
    )


class PruMerge(Compressor):
    """LLaVA-PruMerge: IQR-outlier CLS-attention selection + key-similarity token supplement (Shang et al. 2024)."""

    name = "prumerge"
    Params = PruMergeParams
    needs = frozenset({"cls_attention", "keys"})
    plus = False

    @property
    def adaptive(self) -> bool:  # type: ignore[override]
        """The official adaptive count (IQR outliers) depends on the image; a fixed ``keep`` (the official
        ``if_adaptive=False``) hands on ``keep + 1``, known in advance. PruMerge+'s uniform samples skip the
        outliers, so its count depends on the image whatever ``keep`` is."""
        return self.plus or self.params.keep is None

    @classmethod
    def expected_tokens(cls, n: int, k: int) -> float:
        """Tokens out for ``k`` selected of ``n``: ``k``, plus the one extra token when anything was pruned."""
        return float(k + (k < n))

    @classmethod
    def budget_bounds(cls, params: dict, context: BudgetContext) -> tuple[float, float]:
        n = context.tokens
        return min(cls.expected_tokens(n, k) for k in range(1, n + 1)), float(n)

    @classmethod
    def budget_params(cls, params: dict, target: float, context: BudgetContext) -> dict:
        """A fixed ``keep`` (the official ``if_adaptive=False``) whose expected output is nearest the target:
        PruMerge hands on ``keep + 1`` (the extra token); PruMerge+ adds its uniform samples (see
        :meth:`PruMergePlus.expected_tokens`), whose stride moves in jumps, so some targets are missed."""
        n = context.tokens
        # Ties to the larger keep: more tokens chosen by attention for the same count (at 100 %: nothing pruned).
        k = min(range(1, n + 1), key=lambda k: (abs(cls.expected_tokens(n, k) - target), -k))
        return {**params, "keep": k}

    def _inputs(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        attn = state.per_token.get(self.params.score)
        if attn is None:
            raise MissingInputError(
                f"{self.name}: needs per_token[{self.params.score!r}], the CLS attention: the timm_vit encoder "
                f"provides 'cls_attn' (PruMerge's: `layer: -2, attention_layer: -1, cls_attention_heads: single`); "
                f"the state has {sorted(state.per_token) or 'none'}"
            )
        keys = state.per_token.get("keys")
        if keys is None:
            raise MissingInputError(
                f"{self.name}: needs per_token['keys'] for the key similarity: the timm_vit encoder provides them "
                f"(with `cls_attention_heads: single`, the full-width k_proj output PruMerge uses)"
            )
        if attn.ndim != 2 or keys.ndim != 3:
            raise InputError(
                f"{self.name}: expected cls_attn [B, N] and keys [B, N, C], got {list(attn.shape)} and {list(keys.shape)}"
            )
        return attn, keys

    def select(self, state: TokenState, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens ``(index [B, K], valid [B, K])``: outliers by decreasing attention, then samples."""
        counts = state.counts
        if self.params.keep is None:
            ratio = iqr_outlier_count(attn, state.mask).double() / counts.double().clamp(min=1)
            k = torch.floor(counts.double() * ratio).to(torch.int64)  # official int(N * ratio)
        else:
            k = ops.resolve_keep(self.params.keep, counts, where=f"{self.name}.keep")
            ratio = k.double() / counts.double()
        # No outlier: keep the most attended token (branch-free: the warning is recorded below, with the others).
        none = (k == 0) & (counts > 0)
        k = torch.where(none, torch.ones_like(k), k)
        ratio = torch.where(none, 1.0 / counts.double().clamp(min=1), ratio)
        index, valid = ops.topk_per_row(attn, k, state.mask, order="score")
        small = counts - 1 < self.params.neighbors
        if not self.plus:
            any_none, any_small = torch.stack([none.any(), small.any()]).tolist()  # the one device sync
            self._warn(none, any_none, False, any_small and state.N > 0)
            return index, valid
        kept = _index_mask(index, valid, state.N)
        ratio = torch.where(counts > 0, ratio, torch.ones_like(ratio))
        samples, stride = spatial_samples(kept, counts, ratio)
        wide = torch.floor(torch.floor(1.0 / ratio) / 3.0) < 1
        # Outliers keep their (score) order, the samples follow in increasing index order.
        N = state.N
        rank = torch.full((state.B, N), 3 * N, dtype=torch.int64, device=state.device)
        rank.scatter_(1, index, torch.where(valid, torch.arange(index.shape[1], device=state.device).expand_as(index), 3 * N))
        rank = torch.where(samples, N + torch.arange(N, device=state.device), rank)
        total = valid.sum(1) + samples.sum(1)
        # What the host needs, read in one device sync: the output width and the warnings' flags.
        Kmax, any_none, any_wide, any_small = torch.stack(
            [total.max() if state.B else total.new_zeros(()), none.any(), wide.any(), small.any()]
        ).tolist()
        self._warn(none, bool(any_none), bool(any_wide), bool(any_small) and N > 0)
        index = torch.sort(rank, dim=1, stable=True).indices[:, :Kmax]
        valid = torch.arange(Kmax, device=state.device)[None, :] < total[:, None]
        return index, valid

    def _warn(self, none: torch.Tensor, any_none: bool, any_wide: bool, any_small: bool) -> None:
        """The warnings of :meth:`select`, in the order of the steps they concern."""
        if any_none:
            record_warning(
                f"{self.name}: no attention outlier in image(s) {none.nonzero().flatten().tolist()}; "
                f"kept the most attended token (the official code keeps none)"
            )
        if any_wide:
            record_warning(
                f"{self.name}: kept ratio above 1/3 makes int(int(1 / ratio) / 3) = 0; sampled every token "
                f"(stride 1) where the official arange fails"
            )
        if any_small:
            record_warning(
                f"{self.name}: image(s) with fewer than {self.params.neighbors + 1} tokens: each kept token "
                f"merges all the others (the official topk(k={self.params.neighbors}) fails)"
            )

    def __call__(self, state: TokenState) -> TokenState:
        attn, keys = self._inputs(state)
        index, valid = self.select(state, attn)  # records the warnings
        if state.N == 0:  # no token slot at all (an in-LLM stage may leave none): nothing to merge
            return state
        kept_values, extra, absorbed_by = prumerge_values(
            state.tokens, keys, attn, state.mask, index, valid, self.params.neighbors
        )
        return merge_into_kept(state, attn, index, valid, absorbed_by, kept_values, extra)


def merge_into_kept(
    state: TokenState,
    attn: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    absorbed_by: torch.Tensor,
    kept_values: torch.Tensor,
    extra: torch.Tensor,
) -> TokenState:
    """Provenance and order through :func:`arrcoc.ops.merge` (its ``order`` key), then the values.

    Pruned tokens go to the kept token that absorbed them, or to the extra
    token (hosted by the most attended pruned token); output = kept tokens in
    ``index`` order, then the extra token where anything was pruned.
    """
    B, N = state.mask.shape
    device = state.device
    safe = index.masked_fill(~valid, 0)
    kept = _index_mask(index, valid, N)
    pruned = state.mask & ~kept
    has_extra = pruned.any(1)
    # The host: the most attended pruned token, the lowest index among equals (0 where nothing was pruned).
    most = torch.where(pruned, attn, float("-inf")).amax(1, keepdim=True)
    host = (pruned & (attn == most)).to(torch.uint8).argmax(1, keepdim=True)  # argmax: the first maximum
    is_host = torch.zeros_like(pruned).scatter_(1, host, has_extra[:, None])
    # Sources: every pruned token but the host; destination: its absorbing kept token, else the host.
    src_mask = pruned & ~is_host
    dst_all = torch.where(absorbed_by >= 0, safe.gather(1, absorbed_by.clamp(min=0)), host.expand(B, N))
    src, src_valid = ops.pack(src_mask)
    # Survivors in the official order: the kept tokens in ``index`` order, then the host of the extra token
    # (merge's ``order`` sort key; the sources' keys are never read). Invalid entries go to a dummy column N.
    K = index.shape[1]
    rank = torch.full((B, N + 1), N + 1, dtype=torch.int64, device=device)
    rank.scatter_(1, torch.where(valid, safe, N), torch.arange(K, device=device).expand(B, K).contiguous())
    rank = torch.where(is_host, K, rank[:, :N])
    # The tokens' values are replaced below (PruMerge's update is not an average): move zero-width tokens, so
    # that merge does not average and gather D-wide rows only to throw them away.
    bare = dataclasses.replace(state, tokens=state.tokens[..., :0], cls=None if state.cls is None else state.cls[:, :0])
    out = ops.merge(bare, src, dst_all.gather(1, src), src_valid, order=rank)
    # The values in the layout merge made: an image's kept tokens (a prefix of ``valid``; the rows past it
    # are zero), then its extra token in the next row.
    values = torch.cat([kept_values, torch.zeros_like(kept_values[:, :1])], 1)
    extra_row = torch.arange(B, device=device) * (K + 1) + valid.sum(1)
    values.view(B * (K + 1), -1).index_copy_(0, extra_row, torch.where(has_extra[:, None], extra, 0.0))
    values = values[:, : out.N]
    return dataclasses.replace(out, tokens=values.to(state.dtype), cls=state.cls)


class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus spatially uniform token samples before the merge (Shang et al. 2024, Sec. 3.2)."""

    name = "prumerge_plus"
    plus = True

    @classmethod
    def expected_tokens(cls, n: int, k: int) -> float:
        """``k`` outliers, the samples ``arange(0, n - 1, stride)`` not among them (outliers fall on sample
        positions with probability ``k / n``: attention does not know the stride), and the extra token."""
        stride = max(math.floor(math.floor(1.0 / (k / n)) / 3.0), 1)
        samples = -(-(n - 1) // stride)
        out = k + samples * (1 - k / n)
        return min(out + (out < n), float(n))


@hookimpl
def arrcoc_register_plugins(register):
    register(PruMerge)
    register(PruMergePlus)
