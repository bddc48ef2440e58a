"""arrcoc-example-plugin: a compressor and a pipeline, shipped the way any third party ships them.

* ``every_other`` (a compressor): keeps every other real token of each image,
  through :func:`arrcoc.ops.keep`, so ``size``, ``positions``, ``origin`` and
  every ``per_token`` field follow;
* ``every_other_demo`` (a pipeline): ``arrcoc run every_other_demo --image x.png``
  finds it through the ``arrcoc_pipeline_paths`` hook below.

The package declares ``[project.entry-points.arrcoc] example = "arrcoc_example_plugin"``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

import arrcoc
from arrcoc import ops
from arrcoc.plugin import Compressor, Params
from arrcoc.state import TokenState


def every_other_index(mask: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B, K]`` (and their validity) of the real tokens ``start, start + 2, ...`` of each row.

    Real tokens are counted in order, so ragged rows work; no loop over tokens.
    """
    rank = mask.long().cumsum(1) - 1
    chosen = mask & (rank % 2 == start)
    order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices  # chosen first, in order
    K = int(chosen.sum(1).max()) if chosen.numel() else 0
    index = order[:, :K]
    return index, chosen.gather(1, index)


class EveryOtherParams(Params):
    start: int = Field(0, ge=0, le=1, description="0 keeps tokens 0, 2, 4, ...; 1 keeps tokens 1, 3, 5, ...")


class EveryOther(Compressor):
    """Keep every other token (a minimal third-party compressor)."""

    name = "every_other"
    Params = EveryOtherParams
    stage = "vision"  # runs on the vision tokens (the default)
    needs = frozenset()  # nothing from the encoder beyond the tokens
    adaptive = False  # tokens out depend only on tokens in

    def __call__(self, state: TokenState) -> TokenState:
        index, valid = every_other_index(state.mask, self.params.start)
        return ops.keep(state, index, valid)


@arrcoc.hookimpl
def arrcoc_register_plugins(register):
    register(EveryOther)


@arrcoc.hookimpl
def arrcoc_pipeline_paths():
    return [str(Path(__file__).parent)]  # holds every_other_demo.yaml
