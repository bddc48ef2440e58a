import struct

import pytest
import torch

import arrcoc
from arrcoc import ops
from arrcoc.errors import InputError
from arrcoc.state import TokenState

pytest.importorskip("matplotlib")

from arrcoc_plugins.visual.figure import StageFigures, patch_relevance, render_figure  # noqa: E402


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def small_state():
    g = torch.Generator().manual_seed(0)
    s = TokenState.from_patches(torch.randn(2, 16, 8, generator=g), (4, 4), images=torch.rand(2, 3, 64, 64, generator=g))
    s = ops.merge(s, torch.tensor([[1, 6], [1, 6]]), torch.tensor([[0, 5], [0, 5]]))
    s = ops.keep(s, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8]] * 2))
    return s.with_per_token(relevance=torch.rand(2, 9, generator=g))


def test_render_figure_writes_png_of_expected_size(tmp_path):
    out = render_figure(small_state(), tmp_path / "sub" / "fig.png", title="hello", index=1)
    assert out.stat().st_size > 10_000
    assert png_size(out) == (1600, 440)
    assert png_size(render_figure(small_state(), tmp_path / "small.png", dpi=50)) == (800, 220)


def test_patch_relevance_spreads_through_origin_and_blanks_dropped():
    state = small_state()
    rel, source = patch_relevance(state)
    assert source == "relevance" and rel.shape == (2, 4, 4)
    flat = rel.flatten(1)
    for b in range(2):
        for p in range(16):
            o = int(state.origin[b, p])
            if o < 0:
                assert torch.isnan(flat[b, p])
            else:
                assert flat[b, p] == state.per_token["relevance"][b, o]


def test_render_figure_bad_input(tmp_path):
    with pytest.raises(InputError, match="index 2 is outside the batch of 2"):
        render_figure(small_state(), tmp_path / "x.png", index=2)
    with pytest.raises(InputError, match="expected a TokenState"):
        render_figure("state", tmp_path / "x.png")


def test_stage_figures_observer_saves_one_figure_per_stage(tmp_path):
    spec = {
        "encoder": {"use": "timm_vit", "model": "vit_tiny_patch16_224",
                    "model_kwargs": {"depth": 2, "img_size": 64}},
        "compress": [{"use": "tome", "r": 4, "metric": "tokens"}],
        "score": [{"use": "relevance", "weights": {"information": 1.0, "saliency": 1.0}}],
        "allocate": {"use": "homunculus", "tiers": [[1, 4], [2, 2]]},
    }
    observer = StageFigures(directory=str(tmp_path / "figs"), dpi=40)
    registry = arrcoc.get_registry()
    registry.register(observer, name="test-stage-figures")
    try:
        state = arrcoc.run_pipeline(spec, torch.rand(1, 3, 64, 64))
    finally:
        registry.unregister("test-stage-figures")
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["00_encoder.png", "01_compress_0.png", "02_score_0.png", "03_allocate.png"]
    assert all(png_size(p) == (640, 176) for p in observer.written)
    assert state.counts.tolist() == [8]


def test_render_figure_draws_one_row_per_image_with_row_titles(tmp_path):
    out = render_figure(small_state(), tmp_path / "rows.png", title="two", index=None, row_titles=["q1", "q2"])
    assert png_size(out) == (1600, 880)
    assert png_size(render_figure(small_state(), tmp_path / "one.png", index=[1], row_titles=["q2"])) == (1600, 440)
    with pytest.raises(InputError, match="1 row titles for 2 rows"):
        render_figure(small_state(), tmp_path / "x.png", index=None, row_titles=["q1"])
    with pytest.raises(InputError, match="no image to draw"):
        render_figure(small_state(), tmp_path / "x.png", index=[])


def test_render_figure_takes_numpy_and_tensor_indices_and_refuses_non_integers(tmp_path):
    import numpy as np

    # an index taken from numpy or torch (e.g. an argmax) draws that image, as a plain int does
    assert png_size(render_figure(small_state(), tmp_path / "np.png", index=np.int64(1))) == (1600, 440)
    assert png_size(render_figure(small_state(), tmp_path / "t.png", index=torch.tensor(0))) == (1600, 440)
    assert png_size(render_figure(small_state(), tmp_path / "l.png", index=[np.int64(0), 1])) == (1600, 880)
    with pytest.raises(InputError, match=r"render_figure: index: expected an image number .* got 0.5"):
        render_figure(small_state(), tmp_path / "x.png", index=0.5)
    with pytest.raises(InputError, match=r"render_figure: index: expected an image number .* got 1.0"):
        render_figure(small_state(), tmp_path / "x.png", index=[0, 1.0])
