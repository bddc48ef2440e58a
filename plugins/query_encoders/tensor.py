"""``tensor``: precomputed query embeddings, looked up by query string.

``file`` is a ``torch.save``'d dict ``{query string: tensor [T, D] or [D]}``
(e.g. CLIP text features computed elsewhere).  A query that is not in the
file is an error listing the known ones.  To hand embeddings directly, pass
``query=<tensor>`` to the pipeline instead; no query encoder is needed then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from pydantic import Field, field_validator

from arrcoc.errors import InputError, did_you_mean
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, QueryEncoder


class TensorQueryParams(Params):
    file: str = Field(description="torch.save'd dict {query: embeddings [T, D] or [D]}.")

    @field_validator("file")
    @classmethod
    def _exists(cls, path: str) -> str:
        if not Path(path).expanduser().is_file():
            raise ValueError(f"embeddings file {path!r} does not exist")
        return path


class TensorQuery(QueryEncoder):
    """Precomputed query embeddings from a file, looked up by query string."""

    name = "tensor"
    Params = TensorQueryParams

    def __init__(self, params=None, /, **kwargs) -> None:
        super().__init__(params, **kwargs)
        try:
            table = torch.load(Path(self.params.file).expanduser(), map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch.save file, or one holding more than tensors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(
                f"tensor: cannot read {self.params.file!r} as a torch.save'd dict {{str: tensor}} "
                f"({type(exc).__name__}: {first})"
            ) from None
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.ndim in (1, 2) and v.is_floating_point()
            for k, v in table.items()
        ):
            raise InputError(f"tensor: {self.params.file!r} must hold a dict {{str: float tensor [T, D] or [D]}}")
        self.table = {k: (v if v.ndim == 2 else v[None]) for k, v in table.items()}

    def encode(self, queries: Sequence[str], *, dim: int, device: torch.device, dtype: torch.dtype):
        rows = []
        for i, q in enumerate(queries):
            if q not in self.table:
                raise InputError(
                    f"query[{i}]: {q!r} is not in {self.params.file!r}{did_you_mean(q, self.table)}; "
                    f"known: {', '.join(repr(k) for k in sorted(self.table)[:10])}"
                )
            rows.append(self.table[q])
        widths = {r.shape[1] for r in rows}
        if len(widths) > 1:
            raise InputError(f"tensor: embeddings of these queries differ in width: {sorted(widths)}")
        T = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), T, widths.pop())
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]], mask[b, : r.shape[0]] = r, True
        return out.to(device=device, dtype=dtype), mask.to(device)


@hookimpl
def arrcoc_register_plugins(register):
    register(TensorQuery)
