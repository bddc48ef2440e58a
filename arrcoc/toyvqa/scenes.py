"""Procedural ToyVQA scenes: small coloured shapes on textured, cluttered backgrounds.

A scene is a 128 x 128 RGB image plus the *records* of the objects drawn in
it.  Questions are answered from the records, never from the pixels, so the
records are the ground truth; the pixels follow from them (tests check that
they agree).

Coordinates are ``(row, col)`` everywhere, like ``TokenState.positions``:
pixel ``(r, c)`` is row ``r`` from the top and column ``c`` from the left.
The patch grid is ``PATCH`` = 8 pixels, 16 x 16 patches, and patch ``(i, j)``
has the flat index ``i * 16 + j`` (the raster order of a ViT's patch tokens).
A point in patch units is ``(pixel + 0.5) / 8 - 0.5``, so that a patch's own
centre has integer coordinates, as in ``TokenState.positions``.

Objects are flat-filled shapes 8-17 pixels across (radius 5-8 pixels from the
centre pixel, both ends drawn: a radius-8 circle is 17 pixels wide; squares
and triangles are smaller), never overlapping each other, centred on a corner
of the patch grid: the 2 x 2 patches around that corner each hold a quadrant
of the object (the widest spill one pixel row or column into the next patch).
The background is a muted gradient with one texture (noise, stripes, checks
or blotches) and *clutter*: thin lines and dots in desaturated versions of
the object colours, so that colour alone does not find an object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError

IMAGE_SIZE = 128
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 16 patches a side, 256 patch tokens

# Saturated, well separated base colours; each object gets a jittered shade.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (140, 50, 190),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "star": "stars", "cross": "crosses", "diamond": "diamonds",
}
COLOUR_JITTER = 14      # +- per channel: shades, not new colours
RADIUS_RANGE = (5, 8)   # pixels from the centre pixel to the farthest drawn one: 11-17 px circles
MIN_GAP = 3             # pixels between the bounding circles of two objects
# Object centres sit on patch corners (the pixel just after or before one), so that each of the
# four patches around the corner holds a whole quadrant of the object, edges included: a patch
# token can tell a shape from its own pixels.  With centres anywhere, most patches hold an
# anonymous sliver, and a ViT trained from scratch on a CPU budget never learnt shapes (per-patch
# shape accuracy stayed at chance over 400 steps).
CORNER_CENTRES: tuple[int, ...] = tuple(sorted(PATCH * k + j for k in range(1, GRID) for j in (-1, 0)))
BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "checks", "blotches")


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: what it is, where its pixels are, which patches hold it."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]                # the exact fill colour drawn
    radius: int                              # pixels from the centre to the farthest point of the shape
    centre: tuple[float, float]              # (row, col) centroid of its pixels
    bbox: tuple[int, int, int, int]          # (row0, col0, row1, col1) pixels, end exclusive
    area: int                                # pixels
    centre_patch: tuple[float, float]        # centre in patch units (TokenState.positions convention)
    patch_bbox: tuple[int, int, int, int]    # (row0, col0, row1, col1) patches, end exclusive
    patches: tuple[int, ...]                 # flat indices of the patches holding any of its pixels, ascending
    patch_pixels: tuple[int, ...]            # its pixels in each of those patches

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def main_patches(self, min_fraction: float = 0.25) -> tuple[int, ...]:
        """Patches at least ``min_fraction`` covered by the object (its 'core' tokens)."""
        need = min_fraction * PATCH * PATCH
        return tuple(p for p, n in zip(self.patches, self.patch_pixels) if n >= need)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray                        # [128, 128, 3] uint8
    objects: tuple[SceneObject, ...]
    background: str

    def patches_of(self, indices: Sequence[int]) -> tuple[int, ...]:
        """Union of the patches of the objects at ``indices``, ascending."""
        return tuple(sorted({p for i in indices for p in self.objects[i].patches}))


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw, and optionally where its centre may go (pixel ranges, inclusive)."""

    shape: str
    colour: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


class PlacementError(InputError):
    """The requested objects do not fit in the image with their constraints."""


# ------------------------------------------------------------------ drawing
def _shape_outline(shape: str, row: float, col: float, radius: float) -> list[tuple[float, float]] | None:
    """Polygon of ``shape`` as PIL (x, y) points, or None for shapes drawn otherwise."""
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
    elif shape == "diamond":
        angles = np.deg2rad([-90.0, 0.0, 90.0, 180.0])
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        return [(col + r * np.cos(a), row + r * np.sin(a)) for r, a in zip(radii, angles)]
    else:
        return None
    return [(col + radius * np.cos(a), row + radius * np.sin(a)) for a in angles]


def object_mask(shape: str, row: int, col: int, radius: int) -> np.ndarray:
    """Boolean [128, 128] mask of a shape centred on pixel ``(row, col)``."""
    if shape not in SHAPES:
        raise InputError(f"shape: expected one of {list(SHAPES)}, got {shape!r}")
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([col - radius, row - radius, col + radius, row + radius], fill=1)
    elif shape == "square":
        half = round(radius * 0.8)
        draw.rectangle([col - half, row - half, col + half, row + half], fill=1)
    elif shape == "cross":
        arm = max(1, round(radius * 0.3))
        draw.rectangle([col - radius, row - arm, col + radius, row + arm], fill=1)
        draw.rectangle([col - arm, row - radius, col + arm, row + radius], fill=1)
    else:
        draw.polygon(_shape_outline(shape, row, col, radius), fill=1)
    return np.asarray(canvas, dtype=bool)


def _record(shape: str, colour: str, rgb: tuple[int, int, int], radius: int, mask: np.ndarray) -> SceneObject:
    rows, cols = np.nonzero(mask)
    centre = (float(rows.mean()), float(cols.mean()))
    patch_index = (rows // PATCH) * GRID + cols // PATCH
    patches, counts = np.unique(patch_index, return_counts=True)
    r0, c0, r1, c1 = int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1
    return SceneObject(
        shape=shape, colour=colour, rgb=rgb, radius=radius, centre=centre,
        bbox=(r0, c0, r1, c1), area=int(mask.sum()),
        centre_patch=((centre[0] + 0.5) / PATCH - 0.5, (centre[1] + 0.5) / PATCH - 0.5),
        patch_bbox=(r0 // PATCH, c0 // PATCH, (r1 - 1) // PATCH + 1, (c1 - 1) // PATCH + 1),
        patches=tuple(int(p) for p in patches), patch_pixels=tuple(int(n) for n in counts),
    )


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour: grey with a slight tint."""
    return rng.uniform(85, 175) + rng.uniform(-18, 18, size=3)


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Float [128, 128, 3] muted gradient plus one texture, and the texture's name."""
    coords = (np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5) / IMAGE_SIZE
    rr, cc = np.meshgrid(coords, coords, indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (cc - 0.5) + np.sin(angle) * (rr - 0.5)), 0, 1)[..., None]
    image = (1 - t) * _muted(rng) + t * _muted(rng)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if kind == "noise":
        image = image + rng.normal(0, rng.uniform(5, 12), size=image.shape)
    elif kind == "stripes":
        theta = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * rng.uniform(4, 14) * (np.cos(theta) * cc + np.sin(theta) * rr) + rng.uniform(0, 6.3))
        image = image + rng.uniform(8, 16) * wave[..., None]
    elif kind == "checks":
        cell = int(rng.integers(4, 17))
        checks = ((np.arange(IMAGE_SIZE)[:, None] // cell + np.arange(IMAGE_SIZE)[None, :] // cell) % 2) * 2.0 - 1
        image = image + rng.uniform(6, 14) * checks[..., None]
    else:  # blotches: a coarse random field, upsampled; bounded, so that no blotch turns an object colour
        coarse = np.clip(rng.normal(0, 1, size=(8, 8, 3)), -1.5, 1.5)
        blotches = np.kron(coarse, np.ones((16, 16, 1)))
        image = image + rng.uniform(8, 15) * blotches
    return image, kind


def _draw_clutter(canvas: Image.Image, rng: np.random.Generator) -> None:
    """Thin lines and dots in desaturated object colours: same hues, nothing shaped like an object."""
    draw = ImageDraw.Draw(canvas)
    base = list(COLOURS.values())
    for _ in range(int(rng.integers(4, 15))):
        grey = rng.uniform(100, 160)
        mix = rng.uniform(0.35, 0.5)
        colour = tuple(int(round(mix * v + (1 - mix) * grey)) for v in base[rng.integers(len(base))])
        if rng.random() < 0.6:
            r0, c0 = rng.uniform(0, IMAGE_SIZE, size=2)
            length, angle = rng.uniform(6, 30), rng.uniform(0, 2 * np.pi)
            draw.line([(c0, r0), (c0 + length * np.cos(angle), r0 + length * np.sin(angle))], fill=colour, width=1)
        else:
            r0, c0 = rng.uniform(0, IMAGE_SIZE, size=2)
            size = rng.uniform(1, 2.2)
            draw.ellipse([c0 - size, r0 - size, c0 + size, r0 + size], fill=colour)


def _place(specs: Sequence[ObjectSpec], radii: Sequence[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Centres for the objects, none overlapping; constrained objects are placed first."""
    order = sorted(range(len(specs)), key=lambda i: (specs[i].rows is None and specs[i].cols is None, i))
    for _attempt in range(50):
        centres: dict[int, tuple[int, int]] = {}
        for i in order:
            spec, radius = specs[i], radii[i]
            lo, hi = radius, IMAGE_SIZE - 1 - radius
            rows = (max(lo, spec.rows[0]), min(hi, spec.rows[1])) if spec.rows else (lo, hi)
            cols = (max(lo, spec.cols[0]), min(hi, spec.cols[1])) if spec.cols else (lo, hi)
            row_choices = [c for c in CORNER_CENTRES if rows[0] <= c <= rows[1]]
            col_choices = [c for c in CORNER_CENTRES if cols[0] <= c <= cols[1]]
            if not row_choices or not col_choices:
                raise PlacementError(
                    f"object {i} ({spec.colour} {spec.shape}): its allowed centre rows {spec.rows} / cols "
                    f"{spec.cols} leave no room for radius {radius} in a {IMAGE_SIZE}-pixel image"
                )
            for _try in range(200):
                row = row_choices[int(rng.integers(len(row_choices)))]
                col = col_choices[int(rng.integers(len(col_choices)))]
                if all((row - r) ** 2 + (col - c) ** 2 >= (radius + radii[j] + MIN_GAP) ** 2
                       for j, (r, c) in centres.items()):
                    centres[i] = (row, col)
                    break
            else:
                break  # start again with fresh positions for everyone
        if len(centres) == len(specs):
            return [centres[i] for i in range(len(specs))]
    raise PlacementError(f"could not place {len(specs)} objects without overlap after 50 attempts")


def render_scene(specs: Sequence[ObjectSpec], rng: np.random.Generator) -> Scene:
    """Draw ``specs`` (in that order; records keep it) on a fresh background."""
    for spec in specs:
        if spec.shape not in SHAPES:
            raise InputError(f"ObjectSpec.shape: expected one of {list(SHAPES)}, got {spec.shape!r}")
        if spec.colour not in COLOURS:
            raise InputError(f"ObjectSpec.colour: expected one of {list(COLOURS)}, got {spec.colour!r}")
    background, kind = _background(rng)
    canvas = Image.fromarray(np.clip(np.rint(background), 0, 255).astype(np.uint8))
    _draw_clutter(canvas, rng)
    image = np.array(canvas)
    radii = [int(rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1)) for _ in specs]
    centres = _place(specs, radii, rng)
    objects = []
    for spec, radius, (row, col) in zip(specs, radii, centres):
        base = np.array(COLOURS[spec.colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
        mask = object_mask(spec.shape, row, col, radius)
        image[mask] = rgb
        objects.append(_record(spec.shape, spec.colour, rgb, radius, mask))
    return Scene(image=image, objects=tuple(objects), background=kind)
