"""ToyVQA scenes: deterministic per seed, and the pixels agree with the object records."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from arrcoc.errors import InputError
from arrcoc.toyvqa import COLOURS, GRID, IMAGE_SIZE, PATCH, SHAPES, ObjectSpec, make_sample, render_scene
from arrcoc.toyvqa.scenes import COLOUR_JITTER, PlacementError, object_mask

BASE = np.array(list(COLOURS.values()))


def near_object_colour(image: np.ndarray) -> np.ndarray:
    """Pixels within the colour jitter of an object base colour ([H, W] bool)."""
    diff = np.abs(image.astype(int)[:, :, None, :] - BASE[None, None])
    return (diff <= COLOUR_JITTER).all(-1).any(-1)


def blobs(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """4-connected components of ``mask``."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        component, queue = set(), deque([start])
        while queue:
            r, c = queue.popleft()
            component.add((int(r), int(c)))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        found.append(component)
    return found


def test_same_seed_same_sample_and_different_seeds_differ():
    a, b, c = make_sample(123), make_sample(123), make_sample(124)
    assert a.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.image.dtype == np.uint8
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects and a.question == b.question and a.scene.background == b.scene.background
    assert a.image.tobytes() != c.image.tobytes()


@pytest.mark.parametrize("seed", range(0, 60))
def test_pixels_agree_with_the_records(seed):
    s = make_sample(seed)
    image = s.image
    assert 3 <= len(s.objects) <= 8
    drawn = np.zeros(image.shape[:2], dtype=bool)
    for obj in s.objects:
        # the pixel at the object's centre has the object's colour
        row, col = (round(v) for v in obj.centre)
        assert tuple(image[row, col]) == obj.rgb
        assert np.abs(np.array(obj.rgb) - np.array(COLOURS[obj.colour])).max() <= COLOUR_JITTER
        # flat fill: exactly `area` pixels of that colour inside the box, none of it cut off
        r0, c0, r1, c1 = obj.bbox
        inside = (image[r0:r1, c0:c1] == np.array(obj.rgb)).all(-1)
        assert inside.sum() == obj.area
        drawn[r0:r1, c0:c1] |= inside
    # every object-coloured blob is one recorded object, and nothing else has an object colour
    # (clutter and background are muted): counting blobs gives the number of objects
    components = blobs(near_object_colour(image))
    assert len(components) == len(s.objects)
    assert sorted(len(c) for c in components) == sorted(o.area for o in s.objects)
    assert (near_object_colour(image) == drawn).all()


def test_patch_records_follow_the_pixels():
    s = make_sample(7)
    for obj in s.objects:
        assert sum(obj.patch_pixels) == obj.area
        assert list(obj.patches) == sorted(obj.patches)
        r0, c0, r1, c1 = obj.patch_bbox
        for p in obj.patches:
            assert r0 <= p // GRID < r1 and c0 <= p % GRID < c1
        # patch units as in TokenState.positions: a patch's own centre has integer coordinates
        row, col = obj.centre
        assert obj.centre_patch == pytest.approx(((row + 0.5) / PATCH - 0.5, (col + 0.5) / PATCH - 0.5))
        centre_patch = int(row) // PATCH * GRID + int(col) // PATCH
        assert centre_patch in obj.patches
        assert set(obj.main_patches()) <= set(obj.patches)
    assert s.target_patches() == s.scene.patches_of(s.question.targets)


def test_objects_sit_on_patch_corners():
    # each object's core patches lie in the 2 x 2 block around the patch corner nearest its centre
    for seed in range(20):
        for obj in make_sample(seed).objects:
            corner_row, corner_col = (round((v + 0.5) / PATCH) for v in obj.centre)
            block = {(corner_row - 1 + i) * GRID + corner_col - 1 + j for i in (0, 1) for j in (0, 1)}
            assert set(obj.main_patches()) <= block, (seed, obj)
            # and hold most of it (the 17th pixel of a 16-pixel object may spill into a third patch row)
            assert sum(n for p, n in zip(obj.patches, obj.patch_pixels) if p in block) >= 0.9 * obj.area


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_drawn_around_its_centre(shape):
    mask = object_mask(shape, 60, 70, 7)
    rows, cols = np.nonzero(mask)
    assert mask[60, 70]
    assert 40 <= mask.sum() <= 15 * 15
    assert rows.min() >= 60 - 7 and rows.max() <= 60 + 7 and cols.min() >= 70 - 7 and cols.max() <= 70 + 7


def test_shapes_differ_from_each_other():
    masks = {s: object_mask(s, 64, 64, 8) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 10, (a, b)


def test_bad_specs_say_what_was_expected():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="expected one of .*'red'.*got 'pink'"):
        render_scene([ObjectSpec("circle", "pink")], rng)
    with pytest.raises(InputError, match="expected one of .*'star'.*got 'hexagon'"):
        render_scene([ObjectSpec("hexagon", "red")], rng)
    with pytest.raises(PlacementError, match="leave no room"):
        render_scene([ObjectSpec("circle", "red", cols=(0, 3))], rng)


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_a_seed_that_is_not_a_non_negative_integer_is_an_input_error(seed):
    with pytest.raises(InputError, match=f"ToyVQA seed: expected a non-negative integer, got {seed!r}"):
        make_sample(seed)
    assert make_sample(np.int64(5)).image.tobytes() == make_sample(5).image.tobytes()
