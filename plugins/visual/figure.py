"""Figures of a :class:`~arrcoc.state.TokenState`: what was kept, what is relevant, where the detail went.

``render_figure(state, path, title=None, index=0, dpi=100)`` writes one PNG
(1600 x 440 pixels at the default ``dpi``) with four panels for image
``index`` of the batch:

1. the image (``state.images``);
2. the relevance heatmap over it, per patch: the allocator's
   ``allocation.patch_relevance`` if there is one, else
   ``per_token["relevance"]`` (or the first ``scores:*`` field) spread to
   the patches through ``origin``; dropped patches are transparent;
3. the tokens: every patch coloured by the token it lives in (``origin``),
   so merged tokens show as patches of one colour, dropped patches greyed,
   each token's position a dot;
4. the level-of-detail allocation: regions coloured by tier (``allocation
   .tier_map``; grey = no tier) with the sample positions on top.

``StageFigures`` (kind ``visualizer``, name ``stage_figures``) is an
observer: registered as a plugin object, its ``arrcoc_stage_finished`` hook
saves one figure per stage into ``directory``::

    import arrcoc
    from arrcoc_plugins.visual.figure import StageFigures

    observer = StageFigures(directory="figures")
    arrcoc.get_registry().register(observer, name="stage-figures")
    arrcoc.run_pipeline("arr_coc", ["examples/toyvqa_scene.png"], query="what colour is the triangle?")
    arrcoc.get_registry().unregister("stage-figures")   # figures/00_encoder.png, 01_compress_0.png, ...

Needs matplotlib (``pip install 'arrcoc[viz]'``); it is imported only when
a figure is drawn.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import Field

from arrcoc import ops
from arrcoc.errors import InputError, PluginLoadError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, Visualizer
from arrcoc.state import StageRecord, TokenState

FIGSIZE = (16.0, 4.4)


def _matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PluginLoadError(
            f"figures need matplotlib, which is not installed ({exc}); install the viz extra: pip install 'arrcoc[viz]'"
        ) from None
    return Figure, FigureCanvasAgg


def patch_relevance(state: TokenState) -> tuple[torch.Tensor | None, str]:
    """Relevance per patch ``[B, H0, W0]`` (NaN where dropped) and where it came from."""
    H0, W0 = state.grid
    alloc = state.allocation
    if alloc is not None and getattr(alloc, "patch_relevance", None) is not None:
        rel = alloc.patch_relevance.float()
        return rel.masked_fill(torch.isinf(rel), float("nan")), "relevance"
    names = ["relevance"] + sorted(k for k in state.per_token if k.startswith("scores:"))
    for name in names:
        value = state.per_token.get(name)
        if value is not None and value.ndim == 2:
            per_patch, present = ops.unmerge(state, value.float())
            per_patch = per_patch.masked_fill(~present | torch.isinf(per_patch), float("nan"))
            return per_patch.view(state.B, H0, W0), name
    return None, ""


def token_colours(n: int) -> torch.Tensor:
    """``[n, 3]`` distinct, deterministic colours (golden-ratio hues)."""
    import colorsys

    return torch.tensor(
        [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.55 + 0.35 * (i % 3) / 2, 0.95) for i in range(n)]
    )


def token_borders(origin: torch.Tensor, sx: float, sy: float) -> list:
    """Line segments (pixels) between neighbouring patches of different tokens: merged tokens show as outlined blobs."""
    H0, W0 = origin.shape
    segments = []
    rows, cols = torch.nonzero(origin[:, 1:] != origin[:, :-1], as_tuple=True)  # vertical borders
    for r, c in zip(rows.tolist(), cols.tolist()):
        segments.append([((c + 1) * sx, r * sy), ((c + 1) * sx, (r + 1) * sy)])
    rows, cols = torch.nonzero(origin[1:, :] != origin[:-1, :], as_tuple=True)  # horizontal borders
    for r, c in zip(rows.tolist(), cols.tolist()):
        segments.append([(c * sx, (r + 1) * sy), ((c + 1) * sx, (r + 1) * sy)])
    return segments


def render_figure(state: TokenState, path: str | Path, title: str | None = None, *,
                  index: int | Sequence[int] | None = 0, row_titles: Sequence[str] | None = None,
                  dpi: int = 100) -> Path:
    """Write the four-panel PNG of image ``index`` of ``state`` to ``path``; returns the path.

    ``index`` may be a list of images (or ``None``: the whole batch), drawn as one
    row each, titled by ``row_titles`` (e.g. the query each row answered).
    """
    if not isinstance(state, TokenState):
        raise InputError(f"render_figure: expected a TokenState, got {type(state).__name__}")
    rows = list(range(state.B)) if index is None else _image_numbers(index)
    if not rows:
        raise InputError("render_figure: no image to draw (index is an empty list)")
    for i in rows:
        if not 0 <= i < state.B:
            raise InputError(f"render_figure: index {i} is outside the batch of {state.B} images")
    if row_titles is not None and len(row_titles) != len(rows):
        raise InputError(f"render_figure: {len(row_titles)} row titles for {len(rows)} rows")
    Figure, FigureCanvasAgg = _matplotlib()
    path = Path(path)
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * len(rows)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 4, squeeze=False)
    H0, W0 = state.grid
    if title is None and len(rows) == 1:
        i = rows[0]
        title = (f"{state.token_counts()[i]} tokens ({state.counts[i].item()} visual"
                 f"{' + cls' if state.cls is not None else ''}) on a {H0}x{W0} patch grid")
    if title:
        fig.suptitle(title, fontsize=12)
    for r, i in enumerate(rows):
        _draw_row(fig, axes[r], state, i, row_titles[r] if row_titles is not None else None)
    top = 1 - 0.16 / len(rows) if title else 1 - 0.08 / len(rows)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02 / len(rows), top=top, wspace=0.08,
                        hspace=0.25 if len(rows) > 1 else 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _image_numbers(index: Any) -> list[int]:
    """``index`` (an integer of any kind: int, numpy, a 0-d tensor; or a sequence of them) as a list of ints."""
    def number(value: Any) -> int:
        # operator.index takes exactly the integers (numpy's and torch's too), never a float or a str
        try:
            return operator.index(value)
        except TypeError:
            raise InputError(f"render_figure: index: expected an image number (an integer, a list of them, or "
                             f"None for the whole batch), got {value!r}") from None

    if isinstance(index, (str, bytes)) or not hasattr(index, "__iter__") or getattr(index, "ndim", 1) == 0:
        return [number(index)]
    return [number(value) for value in index]


def _draw_row(fig: Any, axes: Any, state: TokenState, index: int, row_title: str | None) -> None:
    """Image, relevance per patch, tokens by patch, LOD allocation of image ``index`` on four axes."""
    H0, W0 = state.grid
    if state.images is not None:
        image = state.images[index].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    else:
        image = torch.full((H0 * 16, W0 * 16, 3), 0.85).numpy()
    H, W = image.shape[:2]
    extent = (0, W, H, 0)
    sy, sx = H / H0, W / W0  # pixels per patch
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)

    axes[0].imshow(image, extent=extent)
    axes[0].set_title(row_title or "image", fontsize=10 if row_title else None)

    rel, source = patch_relevance(state)
    axes[1].imshow(image, extent=extent, alpha=0.45)
    if rel is not None:
        heat = axes[1].imshow(rel[index].cpu().numpy(), extent=extent, cmap="inferno", alpha=0.75, interpolation="nearest")
        fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
        # Dropped patches have no relevance (NaN): grey them out, or the image shows through and reads as
        # middling relevance.
        dropped = torch.isnan(rel[index]).cpu()
        if dropped.any():
            veil = torch.zeros(*dropped.shape, 4)
            veil[dropped] = torch.tensor([0.55, 0.55, 0.55, 0.85])
            axes[1].imshow(veil.numpy(), extent=extent, interpolation="nearest")
        axes[1].set_title(f"{source} per patch" + (" (grey: dropped)" if dropped.any() else ""))
    else:
        axes[1].set_title("no relevance scores")

    origin = state.origin[index].cpu()
    n = int(state.counts[index])
    colours = token_colours(max(n, 1))
    tiles = torch.full((H0 * W0, 3), 0.55)
    kept = origin >= 0
    tiles[kept] = colours[origin[kept]]
    axes[2].imshow(image, extent=extent)
    axes[2].imshow(tiles.view(H0, W0, 3).numpy(), extent=extent, alpha=0.6, interpolation="nearest")
    grid_origin = origin.view(H0, W0)
    segments = token_borders(grid_origin, sx, sy)
    if segments:
        from matplotlib.collections import LineCollection

        axes[2].add_collection(LineCollection(segments, colors="black", linewidths=0.8))
    pos = state.positions[index, :n].cpu()
    axes[2].scatter((pos[:, 1] + 0.5) * sx, (pos[:, 0] + 0.5) * sy, s=6, c="black", linewidths=0)
    dropped = int((~kept).sum())
    axes[2].set_title(f"{n} tokens: patches by token, {dropped} dropped (grey)")

    alloc = state.allocation
    tier_map = getattr(alloc, "tier_map", None)
    if tier_map is not None:
        import matplotlib

        tiers = getattr(alloc, "tiers", ())
        T = max(len(tiers), 1)
        cmap = matplotlib.colormaps["viridis_r"].resampled(T)
        tm = tier_map[index].cpu().float()
        rgba = torch.tensor(cmap(((tm.clamp(min=0) + 0.5) / T).numpy()), dtype=torch.float32)
        rgba[tm < 0] = torch.tensor([0.6, 0.6, 0.6, 1.0])
        axes[3].imshow(image, extent=extent)
        axes[3].imshow(rgba.numpy(), extent=extent, alpha=0.6, interpolation="nearest")
        Hr, Wr = tier_map.shape[-2:]
        for r in range(1, Hr):  # region borders (a loop over grid lines, for drawing only)
            axes[3].axhline(r * H / Hr, color="white", lw=0.4)
        for c in range(1, Wr):
            axes[3].axvline(c * W / Wr, color="white", lw=0.4)
        axes[3].scatter((pos[:, 1] + 0.5) * sx, (pos[:, 0] + 0.5) * sy, s=4, c="red", linewidths=0)
        from matplotlib.patches import Patch

        handles = [Patch(color=cmap((t + 0.5) / T), label=f"tier {t}: k={k}") for t, (_, k) in enumerate(tiers)]
        handles.append(Patch(color=(0.6, 0.6, 0.6), label="none"))
        axes[3].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
        axes[3].set_title(f"LOD allocation: {len(tiers)} tiers, {n} samples")
    else:
        axes[3].imshow(image, extent=extent, alpha=0.3)
        axes[3].set_title("no allocation")


class StageFiguresParams(Params):
    directory: str = Field("figures", description="Where one PNG per stage is written (created if missing).")
    index: int = Field(0, ge=0, description="Which image of the batch to draw.")
    dpi: int = Field(100, ge=10, description="Resolution; the figure is 16 x 4.4 inches.")


class StageFigures(Visualizer):
    """Observer: one figure per pipeline stage (register the instance with the registry)."""

    name = "stage_figures"
    Params = StageFiguresParams

    def __init__(self, params: StageFiguresParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.count = 0
        self.written: list[Path] = []

    @hookimpl
    def arrcoc_stage_finished(self, stage: str, plugin: object, state: TokenState, record: StageRecord) -> None:
        label = re.sub(r"[^A-Za-z0-9]+", "_", stage).strip("_")
        path = Path(self.params.directory) / f"{self.count:02d}_{label}.png"
        name = getattr(plugin, "name", type(plugin).__name__)
        tokens = record.tokens_out[self.params.index] if self.params.index < len(record.tokens_out) else "?"
        self.written.append(
            render_figure(state, path, f"{stage}: {name} -> {tokens} tokens", index=self.params.index, dpi=self.params.dpi)
        )
        self.count += 1


@hookimpl
def arrcoc_register_plugins(register):
    register(StageFigures)
