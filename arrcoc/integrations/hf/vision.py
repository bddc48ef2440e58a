"""The vision tower (and projector) of a live Hugging Face VLM as a pipeline's encoder.

:class:`VisionTower` wraps the tower of a model that is already loaded
(``arrcoc.hf.apply``, ``arrcoc.vllm``, and the standalone ``hf_vision``
plugin, which only loads the model and prepares pixels around it).  It hands
on the features the model itself uses — ``hidden_states[vision_feature_layer]``
without the class token — and the same per-token fields as ``timm_vit``:

* ``cls_attn`` (and ``cls_attn@<i>``): the CLS row of a layer's attention,
  computed from that layer's own ``layer_norm1`` / ``q_proj`` / ``k_proj`` on
  its input hidden states — one row, no eager attention anywhere
  (``cls_attention_heads: mean``: head-mean of per-head softmax; ``single``:
  one head over the full width, as PruMerge);
* ``keys``: the layer's keys (head-mean, or concatenated with ``single``);
* ``cls``: the class token of the feature layer;
* for a tower whose LLM tokens fold several patches each (InternVL's pixel
  shuffle), ``cls_attn`` and ``keys`` are per token: the adapter's
  :meth:`~.adapter.Adapter.signal_per_token` of the per-patch values (the mean
  over a token's patches);
* ``attn_received`` (need ``attention_received``), for towers without a class
  token whose adapter gives it (Qwen2-VL / 2.5-VL,
  :attr:`~.adapter.Adapter.attention_received_layer`): the attention each
  token receives in the tower's last full-attention block, averaged over the
  image's queries and the heads (VisPruner's official rule for towers without
  a class token; a merged token: the mean of its patches).

Layer indices follow ``timm_vit``: attention "of layer i" is the attention
computed inside encoder layer ``i`` (whose input is ``hidden_states[i]``);
the default is the layer whose output is the feature layer (LLaVA-1.5: 22).

A ``vision_feature_layer`` list (several layers concatenated, as
transformers' LLaVA and LLaVA-NeXT support) gives features of width
``len(list) * hidden`` before the projector, and a ``cls`` that is the
concatenation of the listed layers' class tokens (projected like any row).
The signals (``cls_attn``, ``keys``) still come from ONE layer: the official
methods read the attention of the layer producing LLaVA-1.5's single feature
layer ``-2`` (HiRED, VisionZip, VisPruner, SCOPE: layer 22 of 24; PruMerge
sets ``attention_layer: -1``, the last), so with a list the default is the
layer producing the deepest listed one (for ``[-24, -20, -12, -1]`` the last
layer, as PruMerge's).  ``attention_layer`` overrides it.
``project: true`` applies the multimodal projector (tokens in the LLM's
input space, where a query encoded by ``hf_text`` lives); a model
integration keeps it off and calls :meth:`VisionTower.project` between the
stages before the projector and those after it.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any, Literal

import torch
from pydantic import Field

from arrcoc.errors import ModelError
from arrcoc.models import resolve_model
from arrcoc.plugin import Encoder, Params
from arrcoc.state import TokenState

from .adapter import adapter_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TowerOptions(Params):
    """The settings of a live tower: what a pipeline file's encoder section says about the model's own tower."""

    project: bool = Field(False, description="Apply the multimodal projector (tokens in the LLM's input space).")
    attention_layer: int | None = Field(
        None, description="Vision layer whose CLS attention ('cls_attn') and keys ('keys') are exposed; "
        "default: the layer producing the feature layer (LLaVA-1.5: 22).",
    )
    extra_attention_layers: list[int] = Field(
        default_factory=list, description="More layers whose CLS attention is exposed as 'cls_attn@<layer>'."
    )
    cls_attention_heads: Literal["mean", "single"] = Field(
        "mean", description="'mean': head-mean of per-head softmax; 'single': one head over the full width (PruMerge)."
    )


def tower_options(encoder_params: dict[str, Any]) -> dict[str, Any]:
    """The settings of a pipeline file's encoder section that carry over to a model's own tower.

    Where to project is the integration's choice (``project`` is left out), and the rest of the section
    (``model``, ``dtype``, a ``timm_vit`` encoder's own settings) describes the standalone encoder.
    """
    return {k: v for k, v in encoder_params.items() if k in TowerOptions.model_fields and k != "project"}


#: Held while a model is looked up or loaded (see load_vlm).
_LOAD_LOCK = threading.Lock()


def load_vlm(path: str, dtype: str) -> torch.nn.Module:
    """``from_pretrained`` once per (path, dtype): encoder and query encoder share the model.

    ``path`` is resolved first (``arrcoc:toyvqa`` is the model shipped in the package), so that the
    name and the directory it stands for share one model.  Loads are serialised: ``lru_cache`` alone lets two
    threads asking at once both run ``from_pretrained`` (two copies of the weights; each caller keeps its own).
    """
    path = resolve_model(path)
    with _LOAD_LOCK:
        return _load_vlm(path, dtype)


@lru_cache(maxsize=4)
def _load_vlm(path: str, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as exc:
        raise ModelError(f"hf_vision: cannot load {path!r} ({type(exc).__name__}: {exc})") from None
    return model.eval()


class VisionTower(Encoder):
    """A live VLM's own vision tower (+ projector): features, CLS attention, keys (see the module docstring).

    An :class:`~arrcoc.plugin.Encoder` so that a :class:`~arrcoc.pipeline.Pipeline` checks its stages' needs
    against it (``provides``, ``configure``); a model integration calls :meth:`encode_inputs` with the model's
    own image inputs and :meth:`project` where the projector runs.  It never moves the model (``to``).
    """

    # The encoder a pipeline file names for a model's own tower: messages about the pipeline name it so.
    name = "hf_vision"
    Params = TowerOptions

    def __init__(self, model: torch.nn.Module, params: TowerOptions | None = None, /, **options: Any) -> None:
        super().__init__(params, **options)
        self.adapter = adapter_for(model)
        default = self.adapter.default_attention_layer
        self.attn_layer = default if self.params.attention_layer is None else self._layer(self.params.attention_layer)
        self.extra_layers = sorted({self._layer(i) for i in self.params.extra_attention_layers})
        self.provides = frozenset({"cls_attention", "keys", "cls"} if self.adapter.has_cls else set()) | (
            {"attention_received"} if self.adapter.attention_received_layer is not None else set()) | {
            "tower_features"}
        self.outputs: frozenset[str] = frozenset()

    @classmethod
    def for_model(cls, model: torch.nn.Module, /, project: bool = False, **options: Any) -> "VisionTower":
        """The tower of ``model``; ``options`` as in a pipeline file's encoder section (see :func:`tower_options`)."""
        return cls(model, project=project, **options)

    def _layer(self, layer: int) -> int:
        n = self.adapter.num_vision_layers
        if not -n <= layer < n:
            raise ModelError(f"hf_vision: attention layer {layer} is out of range for a tower of {n} layers")
        return layer % n

    def how_to_provide(self, need: str) -> str:
        family = self.adapter.family
        received = self.adapter.attention_received_layer is not None
        if need in ("cls_attention", "keys", "cls") and not self.adapter.has_cls:
            if received:
                return (f"; the {family} vision tower has no class token, so arrcoc reads no CLS attention or keys "
                        "from it; it gives the attention each token receives instead (need 'attention_received', "
                        "per_token 'attn_received': the official rule for towers without a class token), which "
                        "vispruner reads with `signal: received, attention_map: null` and scope with "
                        "`score: attn_received`; or use a method that needs no attention signal (tome with metric: "
                        "tokens, pool, random_keep, aim_merge, divprune, sparsevlm with w_sal: 0) or an llm: stage")
            return (f"; the {family} vision tower has no class token, so arrcoc reads no CLS attention "
                    "or keys from it (no replacement signal is offered): use a method that needs none (tome with "
                    "metric: tokens, pool, random_keep, aim_merge, sparsevlm with w_sal: 0) or an llm: stage")
        if need == "attention_maps":
            instead = (f" The {family} tower gives the attention each token receives in its last full-attention "
                       "block directly (per_token 'attn_received'): vispruner reads it with `attention_map: null`."
                       if received else "")
            return f"; inside a model arrcoc exposes no per-block attention maps of the tower.{instead}"
        if need == "attention_received":
            return (f"; the {family} vision tower gives no 'attention received' signal (arrcoc computes it for the "
                    "Qwen2-VL / 2.5-VL towers, which have no class token; a tower with one gives its CLS attention)")
        return ""

    def configure(self, outputs: frozenset[str]) -> None:
        self.outputs = outputs & self.provides

    @property
    def embed_dim(self) -> int:
        cfg = self.adapter.model.config
        projected = self.params.project or self.adapter.projected
        return int(cfg.text_config.hidden_size if projected else self.adapter.feature_width)

    def encode(self, pixels: torch.Tensor) -> TokenState:
        """``pixel_values`` (normalised, the model's size) -> the state of the model's image features."""
        return self.encode_inputs(pixels, {})

    def encode_inputs(self, pixels: torch.Tensor, image_inputs: dict[str, Any]) -> TokenState:
        """The model's own image inputs (``pixel_values`` and e.g. ``image_grid_thw``) -> a ragged state."""
        wants_attention = bool(self.outputs & {"cls_attention", "keys"})
        wants_received = "attention_received" in self.outputs
        asked = {"received": True} if wants_received else {}  # only adapters that give the signal are asked
        out = self.adapter.encode_images(pixels, image_inputs, keep_hidden=wants_attention, **asked)
        per_token: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"grids": list(out.grids)}
        if wants_received:
            # Zero past each image's tokens (padding of the ragged state); a head mean, as cls_attn.
            per_token["attn_received"] = torch.nn.utils.rnn.pad_sequence(list(out.received), batch_first=True)
            meta["num_heads"] = self.adapter.num_vision_heads
        if wants_attention:
            layers = [self.attn_layer] + (self.extra_layers if "cls_attention" in self.outputs else [])
            for layer in dict.fromkeys(layers):
                attn, keys, heads = self._attention(layer, out.hidden_states[layer], 1)
                # One value per token where a token folds several patches (InternVL's pixel shuffle).
                attn, keys = self.adapter.signal_per_token(attn), self.adapter.signal_per_token(keys)
                if self.params.cls_attention_heads == "mean":
                    meta["num_heads"] = heads  # cls_attn is a mean over this many heads (as timm_vit says)
                if "cls_attention" in self.outputs:
                    if layer == self.attn_layer:
                        per_token["cls_attn"] = attn
                    if layer in self.extra_layers:
                        per_token[f"cls_attn@{layer}"] = attn
                if layer == self.attn_layer and "keys" in self.outputs:
                    per_token["keys"] = keys
        for name, rows in (out.per_token or {}).items():  # what the LLM takes with each token (zero past it)
            per_token[name] = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True)
        state = ragged_state(out.features, out.grids, out.cls, per_token).with_meta(**meta)
        if "tower_features" in self.outputs:  # the features before the projector, kept through it (project)
            state = state.replace(per_token={**state.per_token, "tower_features": state.tokens})
        return self.project(state) if self.params.project else state

    def project(self, state: TokenState) -> TokenState:
        """The state with tokens (and class token) through the model's projector."""
        if self.adapter.projected:
            return state
        cls_token = None if state.cls is None else self.adapter.project(state.cls[:, None])[:, 0]
        return state.replace(tokens=self.adapter.project(state.tokens), cls=cls_token)

    def _attention(self, layer: int, hidden: torch.Tensor, P: int) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        """``(CLS attention [B, N] or None without a class token, keys [B, N, ...], the layer's heads)``."""
        q, k, scale = self.adapter.vision_qk(layer, hidden)  # [B, heads, N, hd]
        if self.params.cls_attention_heads == "single":
            B, H, N, hd = q.shape
            qf, kf = q.transpose(1, 2).reshape(B, N, H * hd), k.transpose(1, 2).reshape(B, N, H * hd)
            attn = None
            if P:
                attn = ((qf[:, :1].float() @ kf.float().transpose(1, 2)) * (H * hd) ** -0.5).softmax(-1)[:, 0, P:]
            return attn, kf[:, P:], H
        attn = None
        if P:
            attn = ((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale).softmax(-1)[:, :, 0, P:].mean(1)
        return attn, k.mean(1)[:, P:], q.shape[1]


def ragged_state(features: list[torch.Tensor], grids: list[tuple[int, int]], cls: torch.Tensor | None,
                 per_token: dict[str, torch.Tensor]) -> TokenState:
    """The state of images whose feature grids may differ (e.g. Qwen2-VL at native resolution).

    One grid ``(max rows, max cols)`` holds every image; patches outside an
    image's own grid have ``origin = -1``; ``positions`` are each token's
    (row, col) on its own grid.  Equal grids give ``TokenState.from_patches``.
    """
    if len(set(grids)) == 1:
        return TokenState.from_patches(torch.stack(features), grids[0], cls_token=cls, per_token=per_token)
    B = len(features)
    counts = [f.shape[0] for f in features]
    N, D = max(counts), features[0].shape[-1]
    device = features[0].device
    H0, W0 = max(g[0] for g in grids), max(g[1] for g in grids)
    tokens = features[0].new_zeros(B, N, D)
    positions = torch.zeros(B, N, 2, dtype=torch.float32, device=device)
    origin = torch.full((B, H0 * W0), -1, dtype=torch.int64, device=device)
    for b, (f, (rows, cols)) in enumerate(zip(features, grids)):  # one loop per image, not per token
        n = f.shape[0]
        tokens[b, :n] = f
        index = torch.arange(n, device=device)
        r, c = torch.div(index, cols, rounding_mode="floor"), index % cols
        positions[b, :n] = torch.stack([r, c], -1).float()
        origin[b, r * W0 + c] = index
    mask = torch.arange(N, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    return TokenState(tokens=tokens, mask=mask, size=mask.float(), positions=positions, origin=origin,
                      grid=(H0, W0), cls=cls, per_token=per_token)
