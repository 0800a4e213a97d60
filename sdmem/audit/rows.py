"""Row sources of the 2-NN search: the training and generated sets as flat row blocks, and the block iterators.

A training set is an :class:`~sdmem.data.base.ImageSource` or an array (:class:`ArrayRows`); the generated
set an array or a source (:class:`QueryRows`). Both are read as contiguous [n, D] rows of one dtype (uint8
pixels, or float32 features).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Iterator

import numpy as np
import torch

from ..data.base import ImageSource
from ..errors import InputError
from .gemm import row_blocks


class ArrayRows:
    """An array [N, ...] (uint8 or float, possibly memory-mapped) streamed as flat row blocks."""

    def __init__(self, name: str, arr: np.ndarray):
        self.name = name
        self._arr = arr
        self.dim = int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim >= 2 else 0
        self.dtype = np.dtype(np.uint8) if arr.dtype == np.uint8 else np.dtype(np.float32)

    def __len__(self) -> int:
        return int(self._arr.shape[0])

    def iter_blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start, stop in row_blocks(len(self), block_size):
            yield start, np.asarray(self._arr[start:stop])

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._arr[start:stop])

    def read(self, indices) -> np.ndarray:
        return np.asarray(self._arr[np.asarray(indices, dtype=np.int64)])


class QueryRows:
    """The generated side: an array [Q, ...] (uint8 or float) or an :class:`ImageSource`, read as flat row
    chunks so that the whole set never has to be in memory at once."""

    def __init__(self, queries):
        if isinstance(queries, ImageSource):
            if len(queries) == 0:
                raise InputError(queries.name, "holds no images")
            self._src, self._arr = queries, None
            self.dim, self.dtype, self.shape = queries.dim, np.dtype(np.uint8), tuple(queries.shape)
            return
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        if not isinstance(queries, np.ndarray):
            raise InputError("generated", f"expected an array of generated images, got {type(queries).__name__}")
        check_array(queries, "generated")
        self._src, self._arr = None, queries
        self.dim = math.prod(queries.shape[1:])
        self.dtype = np.dtype(np.uint8) if queries.dtype == np.uint8 else np.dtype(np.float32)
        self.shape = tuple(queries.shape[1:]) if queries.ndim == 4 else None

    def __len__(self) -> int:
        return len(self._src) if self._src is not None else int(self._arr.shape[0])

    def read(self, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """Flat contiguous rows [stop − start, D] (a view of an in-memory array when possible: read only)."""
        block = self._src.read_range(start, stop) if self._src is not None else self._arr[start:stop]
        return flat(np.asarray(block), dtype)


def as_rows(train, name: str = "train"):
    """(rows, dtype, D, name) of a training set: an ImageSource as it is, an array or tensor as ArrayRows."""
    if isinstance(train, ImageSource):
        return train, np.dtype(np.uint8), train.dim, train.name
    if isinstance(train, torch.Tensor):
        train = train.detach().cpu().numpy()
    if not isinstance(train, np.ndarray):
        raise InputError(name, f"expected an ImageSource or an array, got {type(train).__name__}")
    check_array(train, name)
    rows = ArrayRows(name, train)
    return rows, rows.dtype, rows.dim, name


def check_array(arr: np.ndarray, name: str) -> None:
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise InputError(name, f"expected uint8 pixels or float32 features, got dtype {arr.dtype}")
    if arr.ndim < 2 or arr.shape[0] == 0 or math.prod(arr.shape[1:]) == 0:
        raise InputError(name, f"expected a non-empty array [N, H, W, 3] or [N, D], got shape {arr.shape}")


def flat(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    block = block.reshape(len(block), -1)
    if block.dtype != dtype:
        block = block.astype(dtype)
    return np.ascontiguousarray(block)


def describe(dim: int, shape) -> str:
    return f"{shape[1]}x{shape[0]}x{shape[2]} (D={dim})" if shape is not None and len(shape) == 3 else f"D={dim}"


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing the array's memory (read-only arrays too: nothing here writes into it)."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def query_blocks(q: int, block: int) -> list[tuple[int, int]]:
    """Balanced query blocks of at most ``block`` rows (so none is tiny: CUDA int8 needs > 16 rows)."""
    n = max(1, -(-q // block))
    edges = [round(i * q / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def shard_blocks(rows, lo: int, hi: int, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) blocks of training rows [lo, hi): the source's own iterator when it is the whole set."""
    if (lo, hi) == (0, len(rows)):
        return rows.iter_blocks(block_size)
    return ((lo + a, rows.read_range(lo + a, lo + b)) for a, b in row_blocks(hi - lo, block_size))


def checked_blocks(blocks, lo: int, hi: int, dim: int, name: str):
    """The staged blocks (start, host rows, device rows), refused (InputError) where they do not continue the
    stream from ``lo`` with D = ``dim``, or do not end at ``hi``."""
    seen = lo
    for start, x, xd in blocks:
        n = len(x)
        if start != seen or n == 0 or x.shape[1] != dim:
            raise InputError(name, f"block at {start} ({n} rows of D={x.shape[1]}) does not "
                                   f"continue the stream at {seen} with D={dim}")
        yield start, x, xd
        seen += n
    if seen != hi:
        raise InputError(name, f"streamed {seen - lo} images but the source says it holds {hi - lo}"
                               + (f" from {lo}" if lo else ""))


def ends_digest(rows, qrows: QueryRows, dtype: np.dtype) -> str:
    """A short digest of the first and last training and generated images: processes of a sharded audit that
    read different files (a stale copy on one node) disagree on it."""
    h = hashlib.sha256()
    for i in sorted({0, len(rows) - 1}):
        h.update(flat(np.asarray(rows.read([i])), dtype).tobytes())
    for i in sorted({0, len(qrows) - 1}):
        h.update(qrows.read(i, i + 1, dtype).tobytes())
    return h.hexdigest()[:16]
