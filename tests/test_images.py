"""``load_images``: what users pass, turned into pixels in [0, 1] — or refused, never clipped or guessed.

Every image here is a few pixels wide: the cases are about modes, files and
types, not sizes.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arrcoc.errors import InputError
from arrcoc.images import load_images


def png_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def idat_span(data: bytes) -> tuple[int, int]:
    """Start and length of the (single) IDAT chunk's data."""
    at = data.index(b"IDAT")
    return at + 4, struct.unpack(">I", data[at - 4 : at])[0]


RAMP = (np.arange(8 * 8, dtype=np.float64).reshape(8, 8) / 63 * 65535).round().astype(np.uint16)


# ----------------------------------------------------------------- modes
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_images_are_scaled_by_their_true_range(tmp_path, mode):
    order = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (8, 8), RAMP.astype(order).tobytes())
    expected = torch.from_numpy(RAMP / 65535).float().expand(1, 3, 8, 8)
    torch.testing.assert_close(load_images(image), expected, rtol=0, atol=1e-6)
    if mode == "I;16":  # and from a 16-bit PNG file
        path = tmp_path / "ramp16.png"
        image.save(path)
        assert Image.open(path).mode == "I;16"
        pixels = load_images(path)
        torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
        assert float((pixels == 1).float().mean()) == pytest.approx(1 / 64)  # not "almost all white"


def test_16_bit_images_are_resized_without_clipping_their_range():
    image = Image.fromarray(RAMP)
    pixels = load_images(image, size=(4, 4))
    assert pixels.shape == (1, 3, 4, 4)
    assert 0.0 <= float(pixels.min()) < 0.2 and 0.8 < float(pixels.max()) <= 1.0


def test_a_float_image_in_0_1_is_taken_as_it_is():
    grey = (RAMP / 65535).astype(np.float32)
    pixels = load_images(Image.fromarray(grey))
    assert torch.equal(pixels, torch.from_numpy(grey).expand(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("values", "got"), [(RAMP.astype(np.float32), r"\[0, 6.55e\+04\]"), (np.full((8, 8), np.nan, np.float32), "NaN or inf")]
)
def test_a_float_image_outside_0_1_is_refused(values, got):
    with pytest.raises(InputError, match=(
        r"^images\[0\]: a float image \(PIL mode 'F'\) is used as it is, so its pixels must lie in \[0, 1\]; "
        rf"got {got}"
    )):
        load_images(Image.fromarray(values))


def test_a_32_bit_integer_image_is_refused():
    with pytest.raises(InputError, match=(
        r"^images\[0\]: PIL mode 'I' \(32-bit integer pixels, e\.g\. a 16-bit PGM or an integer TIFF\) has no "
        r"fixed range to scale by; pass a float tensor \[3, H, W\] in \[0, 1\]"
    )):
        load_images(Image.fromarray(RAMP.astype(np.int32)))


def test_a_mode_pil_cannot_convert_is_an_input_error():
    with pytest.raises(InputError, match=r"^images\[0\]: cannot convert a PIL image of mode 'La' to RGB \("):
        load_images(Image.new("La", (4, 4)))


def test_the_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(Image.new("RGB", (6, 4), (255, 0, 0)), exif=exif))
    assert load_images(path).shape == (1, 3, 6, 4)  # upright: 4 wide, 6 high


# ----------------------------------------------------------------- files
def test_a_png_failing_its_checksum_is_refused(tmp_path):
    image = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)))
    data = png_bytes(image)
    start, length = idat_span(data)
    # Other pixels, validly compressed, but under the original chunk's checksum: they would decode silently.
    other = zlib.compress(b"".join(b"\0" + bytes(range(255, 255 - 16, -1)) for _ in range(16)))
    corrupt = data[: start - 8] + struct.pack(">I", len(other)) + b"IDAT" + other + data[start + length :]
    path = tmp_path / "corrupt.png"
    path.write_bytes(corrupt)
    with Image.open(path) as decoded:  # what PIL alone does
        assert np.asarray(decoded).max() == 255 and np.asarray(decoded)[0, 0] == 255
    with pytest.raises(InputError, match=(
        rf"^images\[0\]: '{path}' is not a readable image \(SyntaxError: broken PNG file"
    )):
        load_images(path)


def test_every_single_bit_flip_in_a_pngs_pixel_data_is_refused():
    data = png_bytes(Image.fromarray((np.add.outer(np.arange(16), np.arange(16)) * 8 % 256).astype(np.uint8)))
    start, length = idat_span(data)
    for offset in range(start, start + length):
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        with pytest.raises(InputError, match=r"^images\[0\]: the \d+ bytes given is not a readable image"):
            load_images(bytes(flipped))


def test_an_image_above_the_decompression_bomb_limit_says_its_size_and_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (20, 10)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(InputError) as info:
        load_images(path)
    assert str(info.value) == (
        f"images[0]: '{path}' has 200 pixels, above PIL's decompression-bomb limit of 100 "
        "(2 x PIL.Image.MAX_IMAGE_PIXELS): downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
    )


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("RGB", (4, 4), (0, 255, 0)).save(tmp_path / "green.png")
    pixels = load_images("~/green.png")
    assert torch.equal(pixels[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(load_images([Path("~/green.png")]), pixels)


def test_encoded_image_bytes_are_accepted(tmp_path):
    image = Image.new("RGB", (4, 4), (0, 0, 255))
    data = png_bytes(image)
    assert torch.equal(load_images(data), load_images(image))
    assert torch.equal(load_images([bytearray(data), memoryview(data)]), load_images([image, image]))


# ----------------------------------------------------------------- types
@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (np.zeros((8, 8, 3), np.uint8), r"^images: got a numpy array of shape \[8, 8, 3\] dtype uint8; arrcoc "
                                        r"cannot tell its layout \(HWC or CHW, RGB or BGR\) from the array: pass "
                                        r"PIL\.Image\.fromarray\(array\) for an RGB uint8 \[H, W, 3\] image"),
        ([torch.rand(3, 4, 4), np.zeros((3, 4, 4), np.float32)],
         r"^images\[1\]: got a numpy array of shape \[3, 4, 4\] dtype float32; .* torch\.from_numpy\(array\)"),
        (b"not an image", r"^images\[0\]: the 12 bytes given is not a readable image \(UnidentifiedImageError: "),
        ([], r"^images: expected a path, image bytes, a PIL image, a tensor or a non-empty list of them, "
             r"got an empty sequence$"),
        ({"image": 1}, r"^images: expected .* or a non-empty list of them, got dict$"),
        ((x for x in ["a.png"]), r"^images: expected .* or a non-empty list of them, got generator$"),
        ([torch.rand(3, 4, 4), 3], r"^images\[1\]: expected a path, image bytes, a PIL image or a tensor, got int$"),
        ([np.float32(0.5)], r"^images\[0\]: expected a path, .* got numpy scalar np\.float32\(0\.5\)$"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
         r"^images: expected floating pixels in \[0, 1\], got dtype torch\.uint8 \(divide 8-bit pixels by 255\)$"),
    ],
)
def test_what_came_is_said_and_how_to_convert_it(images, expected):
    with pytest.raises(InputError, match=expected):
        load_images(images)
