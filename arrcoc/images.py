"""Turning what users pass (paths, encoded bytes, PIL images, tensors) into a pixel batch.

Nothing is clipped or guessed: 16-bit images are scaled by their true range
(65535), a float image (PIL mode ``F``) is taken as it is when its values lie
in [0, 1], and an image whose range cannot be known (mode ``I``, 32-bit
integers) is refused; so are files that fail their own checksums, images
above PIL's decompression-bomb limit, and numpy arrays (whose layout, HWC or
CHW, RGB or BGR, cannot be told from the array).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

#: CLIP's per-channel normalisation (OpenAI CLIP, LLaVA-1.5): the ToyVQA processor's, and ``hf_vision``'s for a model
#: directory that saved no image processor.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: PIL modes of 16-bit grey pixels: scaled by 65535 (``convert("RGB")`` would clip them at 255).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _from_pil(image: Any, size: tuple[int, int] | None, where: str) -> torch.Tensor:
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        grey = np.array(image, dtype=np.float32)  # a writable copy (torch warns about read-only arrays)
        if image.mode == "F":
            finite = bool(np.isfinite(grey).all())
            lo, hi = (float(grey.min()), float(grey.max())) if finite and grey.size else (0.0, 0.0)
            if not finite or lo < 0.0 or hi > 1.0:
                got = f"[{lo:.3g}, {hi:.3g}]" if finite else "NaN or inf"
                raise InputError(
                    f"{where}: a float image (PIL mode 'F') is used as it is, so its pixels must lie in [0, 1]; "
                    f"got {got}: scale it to [0, 1] (e.g. a float tensor [3, H, W])"
                )
        else:
            grey = grey / 65535.0
        if size is not None and grey.shape != tuple(size):
            resized = Image.fromarray(grey).resize((size[1], size[0]), Image.BICUBIC)
            grey = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)  # bicubic overshoot only
        return torch.from_numpy(np.ascontiguousarray(grey)).expand(3, *grey.shape).contiguous()
    if image.mode == "I":
        raise InputError(
            f"{where}: PIL mode 'I' (32-bit integer pixels, e.g. a 16-bit PGM or an integer TIFF) has no fixed "
            "range to scale by; pass a float tensor [3, H, W] in [0, 1] (divide by the data's maximum, "
            "e.g. 65535 for 16-bit data)"
        )
    try:
        image = image.convert("RGB")  # alpha is ignored, as timm's and Hugging Face's loaders do
    except ValueError as exc:
        raise InputError(f"{where}: cannot convert a PIL image of mode {image.mode!r} to RGB ({exc})") from None
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def open_image(source: Path | bytes, where: str) -> Any:
    """Decode an image file (or its bytes) fully, checking what the format can check."""
    from PIL import Image, ImageOps

    if isinstance(source, Path):
        name = repr(str(source))
        if not source.exists():
            raise InputError(f"{where}: image file {name} does not exist")
        if not source.is_file():
            raise InputError(f"{where}: {name} is not a file")
    else:
        name = f"the {len(source)} bytes given"

    def stream() -> Any:
        return source if isinstance(source, Path) else io.BytesIO(source)

    try:
        # verify() checks what decoding skips (a PNG's chunk checksums): a corrupted file can otherwise decode
        # to garbage without an error. It leaves the image unusable, so the file is opened again to decode.
        with Image.open(stream()) as im:
            im.verify()
        with Image.open(stream()) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # a copy, turned upright as the camera's EXIF tag says
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        raise InputError(
            f"{where}: {name} has {size}, above PIL's decompression-bomb limit of {limit:,} "
            f"(2 x PIL.Image.MAX_IMAGE_PIXELS): downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, struct.error, ...) on bad files
        raise InputError(f"{where}: {name} is not a readable image ({type(exc).__name__}: {exc})") from None


def _describe(value: Any) -> str:
    """What came, briefly (never the repr of a whole array)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__module__.split('.')[0]} array of shape {list(value.shape)} dtype {value.dtype}"
    if isinstance(value, np.generic):
        return f"numpy scalar {value!r}"
    return type(value).__name__


def _refuse_numpy(value: np.ndarray, where: str) -> InputError:
    return InputError(
        f"{where}: got a {_describe(value)}; arrcoc cannot tell its layout (HWC or CHW, RGB or BGR) from the "
        "array: pass PIL.Image.fromarray(array) for an RGB uint8 [H, W, 3] image (cv2 arrays are BGR: "
        "array[..., ::-1] first), or torch.from_numpy(array) as float pixels [3, H, W] in [0, 1]"
    )


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
        hint = " (divide 8-bit pixels by 255)" if pixels.dtype == torch.uint8 else ""
        raise InputError(f"{where}: expected floating pixels in [0, 1], got dtype {pixels.dtype}{hint}")
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
    """Paths, encoded image bytes, PIL images or tensors -> ``[B, 3, H, W]`` float32 pixels in [0, 1].

    Paths may start with ``~``. Files and PIL images are resized (bicubic) to
    ``size`` ``(H, W)`` when it is given; a batch tensor keeps its size (the
    encoder resizes it) and is converted to float32 like the rest (the
    model's dtype is the encoder's business: CPU resizing has no float16 /
    bfloat16 kernels).
    """
    from PIL import Image

    if isinstance(images, torch.Tensor):
        return check_pixels(images).float()
    if isinstance(images, np.ndarray):
        raise _refuse_numpy(images, "images")
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)):
        images = [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        got = "an empty sequence" if isinstance(images, Sequence) else _describe(images)
        raise InputError(
            f"images: expected a path, image bytes, a PIL image, a tensor or a non-empty list of them, got {got}"
        )
    batch = []
    for i, item in enumerate(images):
        where = f"images[{i}]"
        if isinstance(item, (str, Path)):
            item = open_image(Path(item).expanduser(), where)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            item = open_image(bytes(item), where)
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
        elif isinstance(item, np.ndarray):
            raise _refuse_numpy(item, where)
        else:
            raise InputError(f"{where}: expected a path, image bytes, a PIL image or a tensor, got {_describe(item)}")
    shapes = {tuple(t.shape) for t in batch}
    if len(shapes) > 1:
        raise InputError(f"images: sizes differ {sorted(shapes)}; pass an encoder with a fixed input size")
    return check_pixels(torch.stack(batch))
