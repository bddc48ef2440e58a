"""``hf_vision``: the vision tower (and projector) of a Hugging Face VLM as the pipeline's encoder.

Standalone (``arrcoc run`` with ``encoder: {use: hf_vision, model:
path/to/llava}``) this plugin loads the model with ``from_pretrained`` and
prepares pixels as the model's processor does (its size, its mean and std);
the tower itself — the model's own features, CLS attention and keys, the
projector — is :class:`arrcoc.integrations.hf.vision.VisionTower`, the same
one ``arrcoc.hf.apply`` and ``arrcoc.vllm`` wrap around a live model, so one
YAML file works in both places.  Its settings (``attention_layer``,
``extra_attention_layers``, ``cls_attention_heads``, ``project``) are
described there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from arrcoc.errors import ModelError
from arrcoc.hookspecs import hookimpl
from arrcoc.images import CLIP_MEAN, CLIP_STD
from arrcoc.models import resolve_model
from arrcoc.plugin import Encoder, Params
from arrcoc.state import TokenState


class HFVisionParams(Params):
    model: str | None = Field(
        None, description="Model directory, hub id or shipped model (arrcoc:toyvqa) loaded with from_pretrained; "
        "inside a model (arrcoc.hf.apply, arrcoc.vllm) the model's own tower is used and this is not read.",
    )
    # The tower's settings, as arrcoc.integrations.hf.vision.TowerOptions has them (test_hf_vision_tower.py
    # checks that they agree): written out again because this module must import without transformers.
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


class HFVision(Encoder):
    """A Hugging Face VLM loaded from ``model``: its own tower (+ projector) on pixels in [0, 1]."""

    name = "hf_vision"
    Params = HFVisionParams

    def __init__(self, params: HFVisionParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if self.params.model is None:
            raise ModelError("hf_vision: set `model:` to a model directory (or use it through arrcoc.hf.apply)")
        from arrcoc.integrations.hf.adapter import adapter_for
        from arrcoc.integrations.hf.vision import TowerOptions, VisionTower, load_vlm

        model = load_vlm(self.params.model, self.params.dtype)
        # Refused before the tower reads its settings: for such a tower they are moot (e.g. an attention layer).
        adapter = adapter_for(model)
        if adapter.image_input_names:
            raise ModelError(
                f"hf_vision: a standalone {adapter.family} tower needs its processor's inputs "
                f"({', '.join(adapter.image_input_names)}); use it inside the model with arrcoc.hf.apply"
            )
        self.tower = VisionTower(model, **self.params.model_dump(include=set(TowerOptions.model_fields)))
        self.provides = self.tower.provides
        self.mean, self.std = self._normalisation()

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own image mean and std; CLIP's when the directory saved no image processor."""
        mean, std = CLIP_MEAN, CLIP_STD
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

    def how_to_provide(self, need: str) -> str:
        return self.tower.how_to_provide(need)

    def configure(self, outputs: frozenset[str]) -> None:
        self.tower.configure(outputs)

    @property
    def outputs(self) -> frozenset[str]:
        """What the tower computes for later stages (set by :meth:`configure`)."""
        return self.tower.outputs

    def to(self, device: torch.device | str) -> "HFVision":
        self.tower.adapter.model.to(device)  # the plugin loaded the model, so it may move it
        return self

    @property
    def embed_dim(self) -> int:
        return self.tower.embed_dim

    @property
    def input_size(self) -> tuple[int, int]:
        size = int(getattr(self.tower.adapter.model.config.vision_config, "image_size", 224))
        return size, size

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(pixels, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def encode(self, pixels: torch.Tensor) -> TokenState:
        """``pixel_values`` (after :meth:`preprocess`) -> the state of the model's image features."""
        return self.tower.encode(pixels)


@hookimpl
def arrcoc_register_plugins(register):
    register(HFVision)
