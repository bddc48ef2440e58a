"""Turning what users pass (paths, PIL images, tensors) into a pixel batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError


def _from_pil(image: Any, size: tuple[int, int] | None, where: str) -> torch.Tensor:
    from PIL import Image

    image = image.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _open(path: Path, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise InputError(f"{where}: image file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"{where}: {str(path)!r} is not a file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{where}: {str(path)!r} is not a readable image ({exc})") from None


def check_pixels(pixels: torch.Tensor, where: str = "images") -> torch.Tensor:
    """Validate a pixel tensor: float ``[B, 3, H, W]`` in [0, 1], finite."""
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InputError(
            f"{where}: expected a float tensor [B, 3, H, W] (or [3, H, W]) of pixels in [0, 1], "
            f"got shape {list(pixels.shape)}"
        )
    if not pixels.is_floating_point():
        raise InputError(f"{where}: expected floating pixels in [0, 1], got dtype {pixels.dtype}")
    if pixels.shape[0] == 0 or pixels.shape[2] == 0 or pixels.shape[3] == 0:
        raise InputError(f"{where}: empty image batch {list(pixels.shape)}")
    if not bool(torch.isfinite(pixels).all()):
        raise InputError(f"{where}: pixels contain NaN or inf")
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(
            f"{where}: pixels must lie in [0, 1] (arrcoc normalises them for the model), got [{lo:.3g}, {hi:.3g}]"
        )
    return pixels


def load_images(images: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Paths, PIL images or tensors -> ``[B, 3, H, W]`` float32 pixels in [0, 1].

    Files and PIL images are resized (bicubic) to ``size`` ``(H, W)`` when it
    is given; a batch tensor keeps its size (the encoder resizes it) and is
    converted to float32 like the rest (the model's dtype is the encoder's
    business: CPU resizing has no float16 / bfloat16 kernels).
    """
    from PIL import Image

    if isinstance(images, torch.Tensor):
        return check_pixels(images).float()
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise InputError(f"images: expected a path, a PIL image, a tensor or a non-empty list of them, got {images!r}")
    batch = []
    for i, item in enumerate(images):
        where = f"images[{i}]"
        if isinstance(item, (str, Path)):
            item = _open(Path(item), where)
        if isinstance(item, Image.Image):
            batch.append(_from_pil(item, size, where))
        elif isinstance(item, torch.Tensor):
            t = check_pixels(item, where)
            if t.shape[0] != 1:
                raise InputError(f"{where}: a list entry must be one image [3, H, W], got {list(item.shape)}")
            t = t[0]
            if size is not None and tuple(t.shape[-2:]) != tuple(size):
                t = F.interpolate(t[None].float(), size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
            batch.append(t.float())
        else:
            raise InputError(f"{where}: expected a path, PIL image or tensor, got {type(item).__name__}")
    shapes = {tuple(t.shape) for t in batch}
    if len(shapes) > 1:
        raise InputError(f"images: sizes differ {sorted(shapes)}; pass an encoder with a fixed input size")
    return check_pixels(torch.stack(batch))
