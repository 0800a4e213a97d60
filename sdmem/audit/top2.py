"""The result of the exact 2-NN search and the one top-2 merge behind it.

:func:`merge_top2` is used at every level: the int8 engine merges each training block's top-2 into its running
top-2 (torch, on the search device), the float engines take the final top-2 of their exactly re-ranked
candidates, and a sharded search merges the processes' lists. Order: ascending (distance, training index), so
ties go to the lowest training index everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["Top2", "merge_top2"]

_I64_MAX = torch.iinfo(torch.int64).max


@dataclass
class Top2:
    """Exact two nearest distinct training images of every query.

    Attributes:
        sqdist: float64 [Q, 2] exact squared l2 distances in the input's units (0–255 pixels for
            uint8), ascending; ties broken by lower training index.
        index: int64 [Q, 2] training indices (original training order).
        num_train: training images seen.
        num_distinct: distinct training images (exact byte copies counted once).
        duplicates: int64 [num_train], for each training image the index of its first identical copy
            (itself if it is the first).
        backend: the backend that ran (``int8``, ``faiss`` or ``torch``).
        device: ``cpu`` or ``cuda``.
    """

    sqdist: np.ndarray
    index: np.ndarray
    num_train: int
    num_distinct: int
    duplicates: np.ndarray
    backend: str
    device: str


def merge_top2(parts: Sequence[tuple], duplicates: np.ndarray | None = None):
    """The exact top-2 per query over the union of candidate lists.

    Args:
        parts: (distance [Q, k], index int64 [Q, k]) per list, numpy arrays or torch tensors (on one device);
            index < 0 marks no candidate.
        duplicates: when given (int64 [N], each row's first identical copy), candidates that are not their
            own first copy are dropped.

    Returns:
        numpy input: (sqdist float64 [Q, 2], index int64 [Q, 2]); torch input: tensors of the input's dtypes.
        Ascending by (distance, index): ties go to the lowest training index; missing entries are
        (inf, -1) (the dtype's largest value for integer distances).
    """
    as_numpy = not isinstance(parts[0][0], torch.Tensor)
    if as_numpy:
        parts = [(torch.from_numpy(np.ascontiguousarray(d, dtype=np.float64)),
                  torch.from_numpy(np.ascontiguousarray(i, dtype=np.int64)))
                 for d, i in parts]
    sq = torch.cat([d for d, _ in parts], 1) if len(parts) > 1 else parts[0][0]
    idx = torch.cat([i for _, i in parts], 1) if len(parts) > 1 else parts[0][1]
    bad = idx < 0
    if duplicates is not None:
        dups = torch.as_tensor(duplicates, dtype=torch.int64, device=idx.device)
        safe = torch.where(bad, 0, idx)
        bad |= dups[safe] != safe
    worst = float("inf") if sq.is_floating_point() else torch.iinfo(sq.dtype).max
    sq = sq.masked_fill(bad, worst)
    idx = idx.masked_fill(bad, -1)
    # lexicographic (distance, index) by two stable sorts: by index, then by distance
    by_index = torch.argsort(idx.masked_fill(bad, _I64_MAX), dim=1, stable=True)
    order = by_index.gather(1, torch.argsort(sq.gather(1, by_index), dim=1, stable=True))[:, :2]
    sq, idx = sq.gather(1, order), idx.gather(1, order)
    return (sq.numpy(), idx.numpy()) if as_numpy else (sq, idx)
