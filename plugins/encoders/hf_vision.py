"""``hf_vision``: the vision tower (and projector) of a Hugging Face VLM as the pipeline's encoder.

The same encoder runs standalone (``arrcoc run`` with ``encoder: {use:
hf_vision, model: path/to/llava}``, loaded with ``from_pretrained``) and
inside a model (``arrcoc.hf.apply`` wraps the live model's tower), so one
YAML file works in both places.  It hands on the features the model itself
uses — ``hidden_states[vision_feature_layer]`` without the class token — and
exposes the same per-token fields as ``timm_vit``:

* ``cls_attn`` (and ``cls_attn@<i>``): the CLS row of a layer's attention,
  computed from that layer's own ``layer_norm1`` / ``q_proj`` / ``k_proj`` on
  its input hidden states — one row, no eager attention anywhere
  (``cls_attention_heads: mean``: head-mean of per-head softmax; ``single``:
  one head over the full width, as PruMerge);
* ``keys``: the layer's keys (head-mean, or concatenated with ``single``);
* ``cls``: the class token of the feature layer.

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
input space, where a query encoded by ``hf_text`` lives).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from arrcoc.errors import ModelError
from arrcoc.models import resolve_model
from arrcoc.hookspecs import hookimpl
from arrcoc.images import CLIP_MEAN, CLIP_STD
from arrcoc.plugin import Encoder, Params
from arrcoc.state import TokenState

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HFVisionParams(Params):
    model: str | None = Field(
        None, description="Model directory, hub id or shipped model (arrcoc:toyvqa) loaded with from_pretrained; "
        "set by arrcoc.hf.apply inside a model.",
    )
    project: bool = Field(True, description="Apply the multimodal projector (tokens in the LLM's input space).")
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
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


def load_vlm(path: str, dtype: str) -> torch.nn.Module:
    """``from_pretrained`` once per (path, dtype): encoder and query encoder share the model.

    ``path`` is resolved first (``arrcoc:toyvqa`` is the model shipped in the package), so that the
    name and the directory it stands for share one model.
    """
    return _load_vlm(resolve_model(path), dtype)


@lru_cache(maxsize=4)
def _load_vlm(path: str, dtype: str) -> torch.nn.Module:
    try:
        from transformers import AutoModelForImageTextToText
    except ImportError as exc:  # pragma: no cover - the hf extra is missing
        raise ModelError("hf_vision: needs transformers: pip install 'arrcoc[hf]'") from exc
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as exc:
        raise ModelError(f"hf_vision: cannot load {path!r} ({type(exc).__name__}: {exc})") from None
    return model.eval()


class HFVision(Encoder):
    """A Hugging Face VLM's own vision tower (+ projector): features, CLS attention, keys."""

    name = "hf_vision"
    Params = HFVisionParams

    def __init__(self, params: HFVisionParams | None = None, /, *, live_model: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        from arrcoc.integrations.hf.adapter import adapter_for

        model = live_model
        if model is None:
            if self.params.model is None:
                raise ModelError("hf_vision: set `model:` to a model directory (or use it through arrcoc.hf.apply)")
            model = load_vlm(self.params.model, self.params.dtype)
        self.adapter = adapter_for(model)
        if self.params.model is not None and self.adapter.image_input_names:
            raise ModelError(
                f"hf_vision: a standalone {self.adapter.family} tower needs its processor's inputs "
                f"({', '.join(self.adapter.image_input_names)}); use it inside the model with arrcoc.hf.apply"
            )
        default = self.adapter.default_attention_layer
        self.attn_layer = default if self.params.attention_layer is None else self._layer(self.params.attention_layer)
        self.extra_layers = sorted({self._layer(i) for i in self.params.extra_attention_layers})
        self.provides = frozenset({"cls_attention", "keys", "cls"} if self.adapter.has_cls else set())
        self.outputs: frozenset[str] = frozenset()
        self.mean, self.std = self._normalisation()

    def _layer(self, layer: int) -> int:
        n = self.adapter.num_vision_layers
        if not -n <= layer < n:
            raise ModelError(f"hf_vision: attention layer {layer} is out of range for a tower of {n} layers")
        return layer % n

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own image mean and std; CLIP's when the directory saved no image processor."""
        mean, std = CLIP_MEAN, CLIP_STD
        if self.params.model is not None:
            folder = Path(resolve_model(self.params.model))
            # transformers < 5 wrote preprocessor_config.json; 5 writes a processor's image settings
            # inside processor_config.json, under "image_processor"
            for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
                if (folder / name).is_file():
                    data = json.loads((folder / name).read_text())
                    data = (data.get(key) or {}) if key else data
                    if "image_mean" in data or "image_std" in data:
                        mean, std = data.get("image_mean", mean), data.get("image_std", std)
                        break
        return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def for_model(cls, model: Any, **params: Any) -> "HFVision":
        """The encoder of a live model (used by ``arrcoc.hf.apply``); ``params`` as in YAML."""
        return cls(cls.validate_params(params), live_model=model)

    def how_to_provide(self, need: str) -> str:
        if need in ("cls_attention", "keys", "cls") and not self.adapter.has_cls:
            return (f"; the {self.adapter.family} vision tower has no class token, so arrcoc reads no CLS attention "
                    "or keys from it (no replacement signal is offered): use a method that needs none (tome with "
                    "metric: tokens, pool, random_keep, aim_merge, sparsevlm with w_sal: 0) or an llm: stage")
        return ""

    def configure(self, outputs: frozenset[str]) -> None:
        self.outputs = outputs & self.provides

    def to(self, device: torch.device | str) -> "HFVision":
        if self.params.model is not None:
            self.adapter.model.to(device)
        return self

    @property
    def embed_dim(self) -> int:
        cfg = self.adapter.model.config
        projected = self.params.project or self.adapter.projected
        return int(cfg.text_config.hidden_size if projected else self.adapter.feature_width)

    @property
    def input_size(self) -> tuple[int, int]:
        size = int(getattr(self.adapter.model.config.vision_config, "image_size", 224))
        return size, size

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(pixels, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def encode(self, pixels: torch.Tensor) -> TokenState:
        """``pixel_values`` (normalised, the model's size) -> the state of the model's image features."""
        return self.encode_inputs(pixels, {})

    def encode_inputs(self, pixels: torch.Tensor, image_inputs: dict[str, Any]) -> TokenState:
        """The model's own image inputs (``pixel_values`` and e.g. ``image_grid_thw``) -> a ragged state."""
        wants_attention = bool(self.outputs & {"cls_attention", "keys"})
        out = self.adapter.encode_images(pixels, image_inputs, keep_hidden=wants_attention)
        per_token: dict[str, torch.Tensor] = {}
        if wants_attention:
            layers = [self.attn_layer] + (self.extra_layers if "cls_attention" in self.outputs else [])
            for layer in dict.fromkeys(layers):
                attn, keys = self._attention(layer, out.hidden_states[layer], 1)
                if "cls_attention" in self.outputs:
                    if layer == self.attn_layer:
                        per_token["cls_attn"] = attn
                    if layer in self.extra_layers:
                        per_token[f"cls_attn@{layer}"] = attn
                if layer == self.attn_layer and "keys" in self.outputs:
                    per_token["keys"] = keys
        state = ragged_state(out.features, out.grids, out.cls, per_token).with_meta(grids=list(out.grids))
        return self.project(state) if self.params.project else state

    def project(self, state: TokenState) -> TokenState:
        """The state with tokens (and class token) through the model's projector."""
        if self.adapter.projected:
            return state
        cls_token = None if state.cls is None else self.adapter.project(state.cls[:, None])[:, 0]
        return state.replace(tokens=self.adapter.project(state.tokens), cls=cls_token)

    def _attention(self, layer: int, hidden: torch.Tensor, P: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        q, k, scale = self.adapter.vision_qk(layer, hidden)  # [B, heads, N, hd]
        if self.params.cls_attention_heads == "single":
            B, H, N, hd = q.shape
            qf, kf = q.transpose(1, 2).reshape(B, N, H * hd), k.transpose(1, 2).reshape(B, N, H * hd)
            attn = None
            if P:
                attn = ((qf[:, :1].float() @ kf.float().transpose(1, 2)) * (H * hd) ** -0.5).softmax(-1)[:, 0, P:]
            return attn, kf[:, P:]
        attn = None
        if P:
            attn = ((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale).softmax(-1)[:, :, 0, P:].mean(1)
        return attn, k.mean(1)[:, P:]


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


@hookimpl
def arrcoc_register_plugins(register):
    register(HFVision)
