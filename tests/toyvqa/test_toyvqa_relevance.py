"""The demo pipeline (arr_coc on the shipped model) puts the queried object where the detail goes.

Issue 10's acceptance test: with the ToyVQA model's tower and LLM embeddings
as encoder and query encoder, query-aware relevance gives the queried
object's patches the top LOD tier.  The same pipeline with the hashing
``toy_text`` query encoder (what the demo used before) is the control: it
must fail the same check, or the check proves nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import arrcoc
import arrcoc.toyvqa as toyvqa

pytest.importorskip("transformers")

# Questions about one object (colour, shape, position), from the first test samples.
SCENES = 12


def _single_object_samples():
    found = [s for s in toyvqa.samples("test", 40) if s.question.qtype in ("colour", "shape", "position")]
    assert len(found) >= SCENES
    return found[:SCENES]


def _top_tier_cover(spec, samples) -> list[float]:
    """Per sample: the fraction of the queried object's main patches that lie in tier-0 regions."""
    state = arrcoc.run_pipeline(spec, [Image.fromarray(s.image) for s in samples],
                                query=[s.question.text for s in samples])
    tiers = state.allocation.tier_map                                     # [B, 8, 8] regions of 2 x 2 patches
    per_patch = tiers.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)   # [B, 256]
    cover = []
    for row, s in enumerate(samples):
        (target,) = s.question.targets
        main = torch.tensor(sorted(s.objects[target].main_patches()))
        cover.append(float((per_patch[row, main] == 0).float().mean()))
    return cover


def test_the_queried_object_gets_the_top_tier():
    torch.set_num_threads(1)
    samples = _single_object_samples()
    cover = _top_tier_cover("arr_coc", samples)
    # the top tier is 6 of the 64 regions (~10% of the image); the object covers 1-4 regions
    assert np.mean(cover) >= 0.85, cover
    assert sum(c == 1.0 for c in cover) >= SCENES - 3, cover


def test_the_hashing_query_encoder_fails_the_same_check():
    torch.set_num_threads(1)
    spec = arrcoc.resolve_spec("arr_coc").model_dump()
    spec["query_encoder"] = {"use": "toy_text"}
    cover = _top_tier_cover(spec, _single_object_samples())
    assert np.mean(cover) < 0.6, cover
