"""Exact two-nearest-neighbour search of generated images in a streamed training set.

The replica rule needs, for every generated image, the exact squared l2 distance to its nearest and
second-nearest *distinct* training image. The training set streams in blocks (bounded memory); only a
running top-2 (int8 backend) or top-k candidates (float backends) per query is kept.

Backends (same results, exact):

* ``int8`` (uint8 pixels only): pixels shifted to int8 (a − 128, distances unchanged), dot products by
  ``torch._int_mm`` (oneDNN VNNI on CPU, int8 tensor cores on CUDA) into a reused int32 buffer. The
  glue works on the key ``||x||² − 2 q·x`` (``||q||²`` is constant per row and added once at the end):
  one in-place pass makes the key, one vectorised ``amin`` over 64-column tiles finds the two tiles
  holding each row's top-2, the exact (value, column) top-2 is taken among those 128 candidates, and a
  stable sort merges it with the running top-2 (ties go to the lower index). Everything is integer
  arithmetic: no rounding anywhere. int32 holds the key for D ≤ 33025; for larger D (e.g. 256×256×3)
  the feature dimension is split into chunks whose int8 products cannot overflow int32 and the key is
  accumulated in int64. Measured on 2 AVX-512 cores: ~0.87 of the int8 GEMM rate end to end.
* ``faiss``: ``faiss.knn`` on float32 per block (``GpuIndexFlatL2`` add/search/reset with faiss-gpu),
  k candidates per query;
* ``torch``: fp32 ``gemm.sqdist`` + ``topk`` per block on CPU or CUDA.

The float backends keep k > 2 candidates per query; each candidate's distance is recomputed exactly
(int64 for uint8 data, float64 otherwise) while its training block is in memory, and the final top-2 is
taken on the exact distances, so fp32 rounding cannot flip an order or a borderline replica flag.

Exact duplicates inside the training set would give d1 = d2 and hide a replica: every training row gets a
fingerprint during the same pass, and with ``dedup`` the later copies are dropped from the search (the first
copy stands for them). The int8 backend computes the fingerprint where the block already is (8 exact int8
projections by the same GEMM, on the GPU when searching there; equal fingerprints are confirmed byte for
byte), so only 64 bytes a row reach the host; the float backends hash rows with SHA-256 on the host.

Training blocks are read one ahead by a background thread (:class:`_Staged`); on a GPU it also puts them in
pinned memory and copies them on a side stream, so reading, the host-to-device copy and the search overlap.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..data.base import ImageSource
from ..errors import InputError, SdmemError
from ..utils import resolve_device
from .gemm import row_blocks, sqdist, sqnorms
from .shard import SOLO, Comm, merge_top2, shard_range

__all__ = ["Top2", "search_top2"]

# int8 products are at most (−128)² = 2¹⁴, so an int32 accumulator is safe for K·2¹⁴ < 2³¹:
# K ≤ 131071; keep chunks a multiple of 8 (cuBLASLt int8 constraint).
_MAX_K_CHUNK = 131064
# int32 glue: key = ||x||² − 2 q·x = ||x − q||² − ||q||² lies in [−D·128², D·255²] and the intermediate
# 2 q·x in [−D·2¹⁵, D·2¹⁵]; both fit int32 (strictly below the INT32_MAX sentinel) for D ≤ 33025.
_INT32_MAX_DIM = 33025
_I32_MAX = 2**31 - 1
_I64_MAX = 2**63 - 1
_I64_SENTINEL = 2**62  # padded rows' ||x||² in the int64 glue: above any real key, no overflow
_TILE = 64  # columns per tile in the block top-2 (blocks are padded to whole tiles)
_Q_BLOCK_CPU = 2048  # query rows per int8 GEMM on CPU (see eval/bench_audit.py)
_Q_BLOCK_CUDA = 16384

_CANDIDATES = 8  # float backends: candidates per query kept for the exact re-rank

BACKENDS = ("auto", "int8", "faiss", "torch")


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


# --------------------------------------------------------------------------------------------------
# inputs


class _ArrayRows:
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


class _QueryRows:
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
        _check_array(queries, "generated")
        self._src, self._arr = None, queries
        self.dim = math.prod(queries.shape[1:])
        self.dtype = np.dtype(np.uint8) if queries.dtype == np.uint8 else np.dtype(np.float32)
        self.shape = tuple(queries.shape[1:]) if queries.ndim == 4 else None

    def __len__(self) -> int:
        return len(self._src) if self._src is not None else int(self._arr.shape[0])

    def read(self, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """Flat contiguous rows [stop − start, D] (a view of an in-memory array when possible: read only)."""
        block = self._src.read_range(start, stop) if self._src is not None else self._arr[start:stop]
        return _flat(np.asarray(block), dtype)


def _as_rows(train, name: str = "train"):
    if isinstance(train, ImageSource):
        return train, np.dtype(np.uint8), train.dim, train.name
    if isinstance(train, torch.Tensor):
        train = train.detach().cpu().numpy()
    if not isinstance(train, np.ndarray):
        raise InputError(name, f"expected an ImageSource or an array, got {type(train).__name__}")
    _check_array(train, name)
    rows = _ArrayRows(name, train)
    return rows, rows.dtype, rows.dim, name


def _check_array(arr: np.ndarray, name: str) -> None:
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise InputError(name, f"expected uint8 pixels or float32 features, got dtype {arr.dtype}")
    if arr.ndim < 2 or arr.shape[0] == 0 or math.prod(arr.shape[1:]) == 0:
        raise InputError(name, f"expected a non-empty array [N, H, W, 3] or [N, D], got shape {arr.shape}")


def _flat(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    block = block.reshape(len(block), -1)
    if block.dtype != dtype:
        block = block.astype(dtype)
    return np.ascontiguousarray(block)


def _describe(dim: int, shape) -> str:
    return f"{shape[1]}x{shape[0]}x{shape[2]} (D={dim})" if shape is not None and len(shape) == 3 else f"D={dim}"


# --------------------------------------------------------------------------------------------------
# device and backend choice


def _resolve_device(device: str) -> torch.device:
    return torch.device(resolve_device(device))


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError:
        raise SdmemError("backend faiss needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def _faiss_available() -> bool:
    try:
        _import_faiss()
        return True
    except SdmemError:
        return False


def _resolve_backend(backend: str, all_uint8: bool) -> str:
    if backend not in BACKENDS:
        raise SdmemError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if all_uint8:
            return "int8"
        return "faiss" if _faiss_available() else "torch"
    if backend == "int8" and not all_uint8:
        raise SdmemError("backend int8 needs uint8 pixels for both generated and training images; "
                         "use backend faiss or torch for float data")
    if backend == "faiss":
        _import_faiss()
    return backend


def _default_block(backend: str, dim: int, device: torch.device) -> int:
    """Training rows per streamed block: ~48 MiB of uint8 rows (half for float backends) on CPU, at
    most 8192 rows, in whole 64-row tiles (CIFAR: 8192 rows; 256×256×3: 256 rows); more on a GPU."""
    budget = (48 << 20) if device.type == "cpu" else (1 << 27)
    if backend != "int8":
        budget = budget // 2  # float32 copies are 4x larger
    cap = 8192 if device.type == "cpu" else 32768
    rows = max(2 * _TILE, min(cap, budget // max(dim, 1)))
    return rows - rows % _TILE  # whole tiles: no padded rows in the int8 GEMM


def _query_blocks(q: int, block: int) -> list[tuple[int, int]]:
    """Balanced query blocks of at most ``block`` rows (so none is tiny: CUDA int8 needs > 16 rows)."""
    n = max(1, -(-q // block))
    edges = [round(i * q / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


# --------------------------------------------------------------------------------------------------
# int8 engine


class _Int8Engine:
    """Exact running top-2 by integer arithmetic; see the module docstring.

    Per (query block, training block): one ``_int_mm`` into a reused int32 buffer (a fresh 32–64 MB
    output per call costs ~15% in page faults on CPU), ``key = ||x||² − 2 q·x`` in place, then the
    block's top-2 by :func:`_tiled_top2` (one vectorised ``amin`` pass over the key) and a merge with
    the running top-2.
    """

    def __init__(self, nq: int, d: int, read, device: torch.device, query_block: int | None,
                 k_chunk: int | None = None):
        """``read(a, b)`` gives the queries' uint8 rows [b − a, D]; they are read in sub-blocks of ~64 MiB
        straight into the resident int8 copy (no second full-size copy)."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.nq, self.d = nq, d
        self.dp = d + (-d % 8) if self.cuda else d  # CUDA int8 GEMM: K multiple of 8
        k_chunk = _MAX_K_CHUNK if k_chunk is None else k_chunk
        if self.cuda:
            k_chunk = max(8, k_chunk - k_chunk % 8)
        self.int32 = d <= _INT32_MAX_DIM
        self.kchunks = list(row_blocks(self.dp, k_chunk))
        self.qp = max(nq, 24) if self.cuda else nq  # CUDA int8 GEMM: more than 16 rows
        # q stays resident, shifted and pre-split into contiguous K chunks (one unless D is huge)
        padded = self.qp != nq or self.dp != d
        alloc = torch.zeros if padded else torch.empty
        self.q_chunks = [alloc((self.qp, b - a), dtype=torch.int8, device=device) for a, b in self.kchunks]
        qnorm = torch.zeros(nq, dtype=torch.int64, device=device)
        for a, b in row_blocks(nq, max(1, (64 << 20) // max(d, 1))):
            x = _as_tensor(read(a, b)).to(device)
            for (ka, kb), c in zip(self.kchunks, self.q_chunks):
                width = min(kb, d) - ka
                if width > 0:
                    dst = c[a:b, :width]
                    torch.bitwise_xor(x[:, ka : ka + width].view(torch.int8), -128, out=dst)
                    qnorm[a:b] += _int8_sqnorms(dst)
            del x
        self.qnorm = qnorm.cpu()  # int64 [Q]
        if query_block is None:
            query_block = _Q_BLOCK_CUDA if self.cuda else _Q_BLOCK_CPU
            if not self.int32:
                query_block = max(64, query_block // 2)
        self.qblocks = _query_blocks(self.qp, query_block)
        self.best_key = torch.full((self.qp, 2), _I64_MAX, dtype=torch.int64, device=device)
        self.best_idx = torch.full((self.qp, 2), -1, dtype=torch.int64, device=device)
        self._buf = torch.empty(0, dtype=torch.int32, device=device)  # reused GEMM output
        self._acc = torch.empty(0, dtype=torch.int64, device=device)  # reused int64 key (huge D)

    def sketch(self, xd: torch.Tensor) -> np.ndarray:
        """Each row's exact integer fingerprint, computed where the block is (int64 [n, 8] on the host).

        The int8 rows times a fixed seeded int8 matrix [D, 8] by the same int8 GEMM as the search (no
        overflow: |a − 128|, |w| ≤ 128 and K ≤ _MAX_K_CHUNK per chunk): identical rows give identical
        fingerprints on any device; different rows collide only when all 8 random projections of their
        difference vanish (about 2⁻⁶⁴ for a one-pixel difference), and a collision is caught by comparing
        bytes (:func:`_dedup_sketch`). Only 64 bytes per row cross to the host instead of hashing every
        pixel there."""
        n = len(xd)
        rows = max(24, n) if self.cuda else n  # CUDA int8 GEMM: more than 16 rows
        out = None
        for (a, b), c in zip(self.kchunks, self._int8_chunks(xd, rows)):
            w = _sketch_matrix(self.dp, self.device)[:, a:b]  # [8, k]: its transpose is column-major
            part = torch._int_mm(c, w.T)[:n].long()
            out = part if out is None else out.add_(part)
        return _sketch(out)

    def add(self, x_u8, gidx: np.ndarray) -> None:
        """Search one training block: x_u8 uint8 [n, D] (duplicates already dropped; an array or a tensor
        on the device), gidx int64 [n]."""
        n = len(x_u8)
        if n == 0:
            return
        npad = max(2 * _TILE, n + (-n % _TILE))  # whole tiles, at least two
        xd = x_u8 if isinstance(x_u8, torch.Tensor) else _as_tensor(x_u8)
        chunks = self._int8_chunks(xd.to(self.device), npad)
        xnorm = torch.full((npad,), _I32_MAX if self.int32 else _I64_SENTINEL, dtype=torch.int64,
                           device=self.device)
        xnorm[:n] = sum(_int8_sqnorms(c[:n]) for c in chunks)
        xnorm = xnorm.to(torch.int32) if self.int32 else xnorm
        g = torch.full((npad,), -1, dtype=torch.int64)
        g[:n] = torch.from_numpy(gidx)
        g = g.to(self.device)
        x_chunks = [c.T for c in chunks]  # [K, npad] column-major views, as the int8 GEMM wants
        del chunks
        for s, e in self.qblocks:
            key = self._key(s, e, x_chunks, xnorm)  # [qb, npad]: ||x||² − 2 q·x
            v1, c1, v2, c2 = _tiled_top2(key, _TILE)
            keys = torch.cat([self.best_key[s:e], v1.unsqueeze(1), v2.unsqueeze(1)], 1)
            idx = torch.cat([self.best_idx[s:e], g[c1].unsqueeze(1), g[c2].unsqueeze(1)], 1)
            # running entries come from earlier blocks (lower indices), so a stable sort keeps ties ordered
            order = torch.argsort(keys, dim=1, stable=True)[:, :2]
            self.best_key[s:e] = keys.gather(1, order)
            self.best_idx[s:e] = idx.gather(1, order)

    def _int8_chunks(self, x_u8: torch.Tensor, rows: int) -> list[torch.Tensor]:
        """uint8 [n, D] -> contiguous int8 (a − 128) blocks [rows, k] per K chunk, zero-padded to
        ``rows`` rows and ``dp`` columns; the shift and the split are one pass."""
        n = len(x_u8)
        out = []
        for a, b in self.kchunks:
            width = min(b, self.d) - a
            if rows == n and width == b - a:
                out.append(_shift_int8(x_u8[:, a:b]))
            else:
                c = torch.zeros((rows, b - a), dtype=torch.int8, device=self.device)
                if width > 0:
                    torch.bitwise_xor(x_u8[:, a : a + width].view(torch.int8), -128, out=c[:n, :width])
                out.append(c)
        return out

    def _out(self, attr: str, rows: int, cols: int) -> torch.Tensor:
        buf = getattr(self, attr)
        if buf.numel() < rows * cols:
            buf = torch.empty(rows * cols, dtype=buf.dtype, device=self.device)
            setattr(self, attr, buf)
        return buf[: rows * cols].view(rows, cols)

    def _key(self, s: int, e: int, x_chunks: list[torch.Tensor], xnorm: torch.Tensor) -> torch.Tensor:
        rows, cols = e - s, x_chunks[0].shape[1]
        if self.int32:
            dots = self._out("_buf", rows, cols)
            torch._int_mm(self.q_chunks[0][s:e], x_chunks[0], out=dots)
            for qc, xc in zip(self.q_chunks[1:], x_chunks[1:]):
                dots.add_(torch._int_mm(qc[s:e], xc))  # |q·x| ≤ D·2¹⁴ < 2³¹ in total
            return torch.add(xnorm, dots, alpha=-2, out=dots)  # one pass, in place
        acc = self._out("_acc", rows, cols)
        part = self._out("_buf", rows, cols)
        for i, (qc, xc) in enumerate(zip(self.q_chunks, x_chunks)):
            torch._int_mm(qc[s:e], xc, out=part)  # each chunk fits int32; the sum needs int64
            if i == 0:
                acc.copy_(part)
            else:
                acc.add_(part)
        return torch.add(xnorm, acc, alpha=-2, out=acc)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        key = self.best_key[: self.nq].cpu()
        idx = self.best_idx[: self.nq].cpu()
        sq = key + self.qnorm.unsqueeze(1)  # exact int64 squared distances
        return sq.numpy().astype(np.float64), idx.numpy()


_SKETCH: dict = {}


def _sketch_matrix(d: int, device: torch.device) -> torch.Tensor:
    """The fixed seeded int8 fingerprint matrix [8, d] (the same on every process and device)."""
    key = (d, str(device))
    if key not in _SKETCH:
        w = np.random.default_rng(0x5D3E).integers(-128, 128, (8, d), dtype=np.int8)
        _SKETCH[key] = torch.from_numpy(w).to(device)
    return _SKETCH[key]


def _sketch(projections: torch.Tensor) -> np.ndarray:
    """int64 [n, 8] fingerprints on the host (a seam for tests that force collisions)."""
    return projections.cpu().numpy()


def _tiled_top2(key: torch.Tensor, tile: int):
    """Two smallest entries of each row of an integer [m, T·tile] matrix, ties to the lower column.

    Returns (v1, c1, v2, c2), int64 values and columns. One vectorised ``amin`` over tiles of ``tile``
    columns finds the two tiles holding the answer (the tile of the smallest (value, column), and the
    next tile by (tile minimum, tile index)); the exact (value, column) top-2 is taken on those 2·tile
    candidates. ``min(dim)`` with indices over the whole row is ~3x slower than ``amin`` on CPU.
    """
    m, npad = key.shape
    kt = key.view(m, npad // tile, tile)
    tmin = kt.amin(2).long()
    a = tmin.argmin(1)  # first occurrence: the lowest tile among equal minima
    tmin.scatter_(1, a.unsqueeze(1), _I64_MAX)
    b = tmin.argmin(1)  # != a, as there are at least two tiles
    sel = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 1)  # column order for the tie rule
    cand = kt.gather(1, sel.unsqueeze(2).expand(m, 2, tile)).reshape(m, 2 * tile).long()
    v1, j1 = cand.min(1)
    cand.scatter_(1, j1.unsqueeze(1), _I64_MAX)
    v2, j2 = cand.min(1)
    c1 = sel.gather(1, (j1 // tile).unsqueeze(1)).squeeze(1) * tile + j1 % tile
    c2 = sel.gather(1, (j2 // tile).unsqueeze(1)).squeeze(1) * tile + j2 % tile
    return v1, c1, v2, c2


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing the array's memory (read-only arrays too: nothing here writes into it)."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _shift_int8(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 a -> int8 a − 128 (the same bits with the top one flipped); a new contiguous tensor."""
    return x_u8.view(torch.int8).bitwise_xor(-128)


def _int8_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """Exact int64 squared norms of int8 rows [n, D].

    int16 squares (128² < 2¹⁵) summed in int32 over feature chunks of ≤ 65536 (< 2³¹), chunks of
    ~1M elements at a time so that the temporaries stay small (large fresh buffers cost page faults).
    """
    n, d = x.shape
    out = torch.zeros(n, dtype=torch.int64, device=x.device)
    feat = 65536
    rows = max(1, (1 << 20) // min(d, feat))
    for f0, f1 in row_blocks(d, feat):
        for a, b in row_blocks(n, rows):
            xs = x[a:b, f0:f1].to(torch.int16)
            out[a:b] += xs.mul_(xs).sum(1, dtype=torch.int32)
    return out


# --------------------------------------------------------------------------------------------------
# float engines: k candidates per block by fp32, exact re-rank


class _FloatEngine:
    """Running top-k by fp32 distance with the exact distance of every kept candidate."""

    def __init__(self, queries: np.ndarray, uint8: bool, device: torch.device, k: int = _CANDIDATES,
                 query_block: int | None = None):
        self.uint8 = uint8
        self.device = device
        self.k = k
        nq = len(queries)
        self.nq = nq
        self.q_np = np.ascontiguousarray(queries)  # uint8 or float32, for the exact re-rank
        self.q_t = _as_tensor(self.q_np).to(device)
        self.qf = self._to_float(self.q_t)
        self.query_block = query_block or (2048 if device.type == "cpu" else 16384)
        self.best_f = torch.full((nq, k), math.inf, dtype=torch.float32, device=device)
        self.best_idx = torch.full((nq, k), -1, dtype=torch.int64, device=device)
        exact_dtype = torch.int64 if uint8 else torch.float64
        fill = torch.iinfo(torch.int64).max if uint8 else math.inf
        self.best_exact = torch.full((nq, k), fill, dtype=exact_dtype, device=device)

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        # centring uint8 pixels at 128 shrinks the norms and with them fp32's cancellation error
        return x.float().sub_(128.0) if self.uint8 else x.float()

    def candidates(self, xf: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def add(self, x: np.ndarray, gidx: np.ndarray) -> None:
        n = len(x)
        if n == 0:
            return
        x_t = _as_tensor(x).to(self.device)
        kk = min(self.k, n)
        fd, local = self.candidates(self._to_float(x_t), kk)  # [Q, kk] fp32, int64 block-local
        k = self.k
        allf = torch.cat([self.best_f, fd.to(self.device, torch.float32)], 1)
        order = torch.argsort(allf, dim=1, stable=True)[:, :k]
        rows, slot = torch.nonzero(order >= k, as_tuple=True)  # block candidates that made the top-k
        cols = local.to(self.device)[rows, order[rows, slot] - k]
        pos_old = order.clamp(max=k - 1)
        best_exact = self.best_exact.gather(1, pos_old)
        best_idx = self.best_idx.gather(1, pos_old)
        if self.device.type == "cpu":
            rows_np, cols_np = rows.numpy(), cols.numpy()
            best_exact[rows, slot] = torch.from_numpy(_exact_sqdist(self.q_np, rows_np, x, cols_np))
            best_idx[rows, slot] = torch.from_numpy(gidx[cols_np])
        else:
            best_exact[rows, slot] = self._exact_torch(rows, x_t, cols)
            best_idx[rows, slot] = torch.from_numpy(gidx).to(self.device)[cols]
        self.best_f = allf.gather(1, order)
        self.best_exact, self.best_idx = best_exact, best_idx

    def _exact_torch(self, rows: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Exact squared distances between query rows[i] and block row cols[i] on the GPU."""
        out = torch.empty(len(rows), dtype=self.best_exact.dtype, device=self.device)
        for a, b in row_blocks(len(rows), max(1, (1 << 24) // max(x.shape[1], 1))):
            if self.uint8:
                diff = self.q_t[rows[a:b]].to(torch.int32) - x[cols[a:b]].to(torch.int32)
                out[a:b] = (diff * diff).sum(1, dtype=torch.int64)
            else:
                diff = self.q_t[rows[a:b]].double() - x[cols[a:b]].double()
                out[a:b] = (diff * diff).sum(1)
        return out

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        ex = self.best_exact.cpu().numpy()
        idx = self.best_idx.cpu().numpy()
        ex = np.where(idx < 0, np.inf, ex.astype(np.float64)) if self.uint8 else np.where(idx < 0, np.inf, ex)
        big = np.iinfo(np.int64).max
        order = np.lexsort((np.where(idx < 0, big, idx), ex), axis=1)[:, :2]
        return np.take_along_axis(ex, order, 1).astype(np.float64), np.take_along_axis(idx, order, 1)


def _exact_sqdist(q: np.ndarray, rows: np.ndarray, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact squared distances ||q[rows[i]] − x[cols[i]]||²: int64 for uint8 rows, float64 otherwise.

    numpy, in chunks of ~2M elements (16 pairs at least): uint8 differences squared and summed in int32
    (D·255² < 2³¹ for D ≤ 33025; larger D is summed in feature chunks of that size, then in int64).
    """
    d = q.shape[1]
    uint8 = q.dtype == np.uint8 and x.dtype == np.uint8
    out = np.empty(len(rows), np.int64 if uint8 else np.float64)
    feat = list(row_blocks(d, _INT32_MAX_DIM)) if uint8 else [(0, d)]
    for a, b in row_blocks(len(rows), max(16, (1 << 21) // d)):
        total = 0
        for f0, f1 in feat:
            diff = q[rows[a:b], f0:f1].astype(np.int32 if uint8 else np.float64)
            diff -= x[cols[a:b], f0:f1]
            part = np.einsum("pd,pd->p", diff, diff)
            total = total + (part.astype(np.int64) if uint8 else part)
        out[a:b] = total
    return out


class _TorchEngine(_FloatEngine):
    """fp32 distances by ``gemm.sqdist`` (one reused output buffer) and ``topk`` per query block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.qnorm = sqnorms(self.qf)
        self._buf = torch.empty(0, dtype=torch.float32, device=self.device)

    def candidates(self, xf, kk):
        xn = sqnorms(xf)
        vals, locs = [], []
        for s, e in row_blocks(self.nq, self.query_block):
            size = (e - s) * len(xf)
            if self._buf.numel() < size:
                self._buf = torch.empty(size, dtype=torch.float32, device=self.device)
            d = sqdist(self.qf[s:e], xf, self.qnorm[s:e], xn, out=self._buf[:size].view(e - s, len(xf)))
            v, i = torch.topk(d, kk, dim=1, largest=False, sorted=False)
            vals.append(v)
            locs.append(i)
        return torch.cat(vals), torch.cat(locs)


class _FaissEngine(_FloatEngine):
    """fp32 k-NN by faiss per block: ``faiss.knn`` (no index copy) on CPU, ``GpuIndexFlatL2`` on a GPU."""

    def __init__(self, queries, uint8, device, gpu: bool, **kwargs):
        super().__init__(queries, uint8, torch.device("cpu"), **kwargs)
        self.faiss = _import_faiss()
        self.qf_np = self.qf.numpy()
        self.index = None
        if gpu:
            self.res = self.faiss.StandardGpuResources()
            self.index = self.faiss.GpuIndexFlatL2(self.res, self.qf_np.shape[1])

    def candidates(self, xf, kk):
        xb = np.ascontiguousarray(xf.numpy())
        if self.index is None:
            dist, loc = self.faiss.knn(self.qf_np, xb, kk)
        else:
            self.index.add(xb)
            dist, loc = self.index.search(self.qf_np, kk)
            self.index.reset()
        return torch.from_numpy(dist), torch.from_numpy(loc)


# --------------------------------------------------------------------------------------------------
# the search


def search_top2(queries, train, *, backend: str = "auto", device: str = "auto", dedup: bool = True,
                block_size: int | None = None, progress: bool = False, query_chunk: int | None = None,
                comm: Comm | None = None, _query_block: int | None = None, _k_chunk: int | None = None) -> Top2:
    """Exact two nearest distinct training images of each query.

    Args:
        queries: uint8 [Q, H, W, 3] or [Q, D] pixels, float32 [Q, D] features, or an :class:`ImageSource`
            (read in chunks of ``query_chunk`` images).
        train: an :class:`ImageSource`, or an array [N, ...] (uint8 or float32) with the same D.
        backend: ``auto`` (int8 for uint8 data, else faiss if importable, else torch), ``int8``,
            ``faiss`` or ``torch``; all give the same exact result.
        device: ``auto`` (cuda when available), ``cpu`` or ``cuda``.
        dedup: drop exact copies of earlier training rows from the search (their first copy stands
            for them), so a duplicated image cannot give d1 = d2.
        block_size: training rows per streamed block (default: ~48 MiB of rows on CPU).
        progress: show a tqdm bar over training blocks.
        query_chunk: generated images searched per pass over the training set (default: as many as fit
            in ~1 GiB of search memory on CPU, 4 GiB on a GPU: one pass for CIFAR-sized images). The
            training set is streamed once per chunk and hashed in the first pass only.
        comm: a :class:`~sdmem.audit.shard.Comm` of a sharded search: this process streams only its share
            of the training rows; candidates and duplicates are merged across processes, and every process
            returns the same result as a single process would. Default: one process.

    Raises:
        InputError: shapes differ, no queries, fewer than 2 distinct training images (with dedup) or
            fewer than 2 training images.
        SdmemError: unknown backend/device, cuda unavailable, faiss missing, int8 with float data.
    """
    comm = SOLO if comm is None else comm
    err = None
    try:  # every process checks its arguments; a refusal on one is raised on all (no process left waiting)
        qrows = _QueryRows(queries)
        rows, tdtype, tdim, tname = _as_rows(train)
        if qrows.dim != tdim:
            tshape = getattr(train, "shape", None) if isinstance(train, ImageSource) else \
                (train.shape[1:] if train.ndim == 4 else None)
            raise InputError(tname, f"training images are {_describe(tdim, tshape)} but generated images are "
                                    f"{_describe(qrows.dim, qrows.shape)}; pass --resolution R to compare both "
                                    "at R x R")
        n_train = len(rows)
        if n_train < 2:
            raise InputError(tname, f"needs at least 2 distinct training images, found {n_train}")
        all_uint8 = qrows.dtype == np.uint8 and tdtype == np.uint8
        dtype = np.dtype(np.uint8) if all_uint8 else np.dtype(np.float32)
        backend = _resolve_backend(backend, all_uint8)
        dev = _resolve_device(device)
        faiss_gpu = False
        if backend == "faiss":
            faiss = _import_faiss()
            faiss_gpu = dev.type == "cuda" and faiss.get_num_gpus() > 0 and hasattr(faiss, "GpuIndexFlatL2")
            dev = torch.device("cuda" if faiss_gpu else "cpu")

        bs = block_size or _default_block(backend, tdim, dev)
        if bs <= 0:
            raise InputError("block_size", f"expected a positive number of rows, got {bs}")
        nq = len(qrows)
        qc = query_chunk or _default_query_chunk(backend, tdim, dev, qrows.dtype)
        if qc <= 0:
            raise InputError("query_chunk", f"expected a positive number of images, got {qc}")
        chunks = _query_blocks(nq, qc)
    except Exception as exc:  # noqa: BLE001 (re-raised on this process by comm.check)
        err = exc
    comm.check(err)
    if comm.world > 1:
        comm.agree({"training images": n_train, "values per image": tdim, "generated images": nq,
                    "backend": backend, "dedup": dedup, "first and last images": _ends_digest(rows, qrows, dtype)})

    def engine_for(qa: int, qb: int):
        if backend == "int8":
            return _Int8Engine(qb - qa, tdim, lambda a, b: qrows.read(qa + a, qa + b, dtype), dev, _query_block,
                               _k_chunk)
        q = qrows.read(qa, qb, dtype)
        if backend == "torch":
            return _TorchEngine(q, all_uint8, dev, query_block=_query_block)
        return _FaissEngine(q, all_uint8, dev, faiss_gpu, query_block=_query_block)

    lo, hi = shard_range(n_train, comm.rank, comm.world)
    whole = (lo, hi) == (0, n_train)
    local_dups = np.empty(hi - lo, dtype=np.int64)  # each shard row's first identical copy in the shard
    fingerprints = np.empty(hi - lo, dtype=np.int64) if comm.world > 1 else None
    first_seen: dict[bytes, int] = {}
    duplicates = keep = None  # global, known after the first pass
    num_distinct = 0
    sq = np.empty((nq, 2), dtype=np.float64)
    idx = np.empty((nq, 2), dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(chunks) * -(-(hi - lo) // bs), desc=f"nearest neighbours ({backend}/{dev.type})",
                   unit="block")
    try:
        for qa, qb in chunks:
            err = part = None
            try:
                engine = engine_for(qa, qb)
                seen = lo
                blocks = rows.iter_blocks(bs) if whole else \
                    ((lo + a, rows.read_range(lo + a, lo + b)) for a, b in row_blocks(hi - lo, bs))
                staged = _Staged(blocks, dtype, dev if backend == "int8" else None)
                try:
                    for start, x, xd in staged:
                        n = len(x)
                        if start != seen or n == 0 or x.shape[1] != tdim:
                            raise InputError(tname, f"block at {start} ({n} rows of D={x.shape[1]}) does not "
                                                    f"continue the stream at {seen} with D={tdim}")
                        gidx = np.arange(start, start + n, dtype=np.int64)
                        if keep is None and xd is not None:  # first pass: fingerprints on the device
                            k = _dedup_sketch(engine.sketch(xd), x, start, first_seen, local_dups, lo,
                                              fingerprints, rows, dtype)
                        elif keep is None:  # first pass, float backends: SHA-256 on the host
                            k = _hash_rows(x, start, first_seen, local_dups, lo, fingerprints)
                        else:
                            k = keep[start - lo : start - lo + n]
                        if dedup and not k.all():
                            gidx = gidx[k]
                            if xd is not None:
                                xd = xd[torch.from_numpy(np.flatnonzero(k)).to(xd.device)]
                            else:
                                x = np.ascontiguousarray(x[k])
                        engine.add(x if xd is None else xd, gidx)
                        seen += n
                        if bar is not None:
                            bar.update(1)
                finally:
                    staged.close()
                if seen != hi:
                    raise InputError(tname, f"streamed {seen - lo} images but the source says it holds {hi - lo}"
                                            + (f" from {lo}" if lo else ""))
                part = engine.result()
                del engine
                part[0][part[1] < 0] = np.inf  # padding / empty shards: no candidate
            except Exception as exc:  # noqa: BLE001 (re-raised on this process by comm.check)
                err = exc
            comm.check(err)
            if duplicates is None:
                first_seen.clear()
                duplicates = _resolve_duplicates(comm, rows, dtype, lo, hi, local_dups, fingerprints)
                num_distinct = int(np.count_nonzero(duplicates == np.arange(n_train)))
                if dedup and num_distinct < 2:
                    raise InputError(tname, f"needs at least 2 distinct training images, found {num_distinct}")
                keep = duplicates[lo:hi] == np.arange(lo, hi)
            if comm.world == 1:
                sq[qa:qb], idx[qa:qb] = part
            else:
                gathered = zip(comm.all_gather(part[0]), comm.all_gather(part[1]))
                sq[qa:qb], idx[qa:qb] = merge_top2(list(gathered), duplicates if dedup else None)
    finally:
        if bar is not None:
            bar.close()
    return Top2(sqdist=sq, index=idx, num_train=n_train, num_distinct=num_distinct, duplicates=duplicates,
                backend=backend, device=dev.type)


def _ends_digest(rows, qrows: _QueryRows, dtype: np.dtype) -> str:
    """A short digest of the first and last training and generated images: processes of a sharded audit that
    read different files (a stale copy on one node) disagree on it."""
    import hashlib

    h = hashlib.sha256()
    for i in sorted({0, len(rows) - 1}):
        h.update(_flat(np.asarray(rows.read([i])), dtype).tobytes())
    for i in sorted({0, len(qrows) - 1}):
        h.update(qrows.read(i, i + 1, dtype).tobytes())
    return h.hexdigest()[:16]


def _default_query_chunk(backend: str, dim: int, device: torch.device, qdtype: np.dtype) -> int:
    """Generated images per pass: ~1 GiB of resident queries on CPU (4 GiB on a GPU). int8 keeps one byte per
    feature; the float engines keep the input rows and an fp32 copy."""
    budget = (1 << 30) if device.type == "cpu" else (4 << 30)
    per_feature = 1 if backend == "int8" else 4 + (1 if qdtype == np.uint8 else 0)
    return max(1, budget // max(dim * per_feature, 1))


def _resolve_duplicates(comm: Comm, rows, dtype: np.dtype, lo: int, hi: int, local_dups: np.ndarray,
                        fingerprints: np.ndarray | None) -> np.ndarray:
    """Global ``duplicates`` [N] (each row's lowest-index identical copy) from each shard's own.

    One process: the shard's. Several: the 64-bit fingerprints of each shard's first copies are gathered;
    a first copy whose fingerprint also occurs in a lower shard is compared byte for byte with those rows
    (lowest index first; read again from the source); the first identical one stands for it and for its
    copies in this shard. The per-shard results are gathered into the global array.
    """
    if comm.world == 1:
        return local_dups
    own = np.arange(lo, hi, dtype=np.int64)
    reps = own[local_dups == own]
    rep_fp = fingerprints[reps - lo]
    all_idx = np.concatenate(comm.all_gather(reps))
    all_fp = np.concatenate(comm.all_gather(rep_fp))
    err = None
    dups = local_dups
    try:
        lower = all_idx < lo
        lower_fp, lower_idx = all_fp[lower], all_idx[lower]
        hit = np.isin(rep_fp, lower_fp)
        if hit.any():
            order = np.argsort(lower_fp, kind="stable")  # gathered in index order: stable keeps it per value
            sfp, sidx = lower_fp[order], lower_idx[order]
            rep_of: dict[int, int] = {}
            for i, f in zip(reps[hit].tolist(), rep_fp[hit].tolist()):
                cands = sidx[np.searchsorted(sfp, f, "left") : np.searchsorted(sfp, f, "right")]
                got = _flat(np.asarray(rows.read(np.append(cands, i))), dtype)
                mine = got[-1].tobytes()
                same = next((int(j) for j, row in zip(cands, got[:-1]) if row.tobytes() == mine), None)
                if same is not None:
                    rep_of[i] = same
            if rep_of:
                src = np.fromiter(rep_of.keys(), np.int64, len(rep_of))
                dst = np.fromiter(rep_of.values(), np.int64, len(rep_of))
                pos = np.searchsorted(src, local_dups)  # rep_of's keys are ascending (reps are)
                pos = np.minimum(pos, len(src) - 1)
                dups = np.where(src[pos] == local_dups, dst[pos], local_dups)
    except Exception as exc:  # noqa: BLE001 (re-raised on this process by comm.check)
        err = exc
    comm.check(err)
    return np.concatenate(comm.all_gather(dups))


class _Staged:
    """The training blocks, read one block ahead by a background thread (disk reads and decoding overlap the
    search), flattened to [n, D] rows of ``dtype``; with a CUDA ``device`` each block also goes into pinned
    memory and is copied to the GPU on a side stream in that thread, so the copy overlaps the search of the
    previous block. Yields (start, host rows, device rows or None); with ``device`` None nothing is uploaded.
    ``close()`` stops the reader (always call it)."""

    def __init__(self, blocks, dtype: np.dtype, device: torch.device | None, depth: int = 1):
        import queue
        import threading

        self._cuda = device is not None and device.type == "cuda"
        if self._cuda and device.index is None:  # the reader thread must use this thread's GPU (set per thread)
            device = torch.device("cuda", torch.cuda.current_device())
        self._blocks, self._dtype, self._device = blocks, dtype, device
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="sdmem-prefetch", daemon=True)
        self._thread.start()

    def _stage(self, start: int, block) -> tuple:
        x = _flat(np.asarray(block), self._dtype)
        if self._device is None:
            return start, x, None
        if not self._cuda:
            return start, x, _as_tensor(x)
        pinned = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)  # torch caches pinned blocks
        pinned.numpy()[...] = x
        with torch.cuda.stream(self._stream):
            xd = pinned.to(self._device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return start, x, (xd, done)

    def _read(self) -> None:
        try:
            if self._cuda:
                torch.cuda.set_device(self._device)
            for start, block in self._blocks:
                item = ("ok", self._stage(start, block))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except Exception:  # noqa: BLE001 (queue.Full: look at the stop flag again)
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            self._queue.put(("error", exc))

    def __iter__(self):
        while True:
            kind, item = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            start, x, xd = item
            if self._cuda:
                xd, done = xd
                current = torch.cuda.current_stream(self._device)
                current.wait_event(done)
                xd.record_stream(current)  # allocated on the side stream, used on this one
            yield start, x, xd

    def close(self) -> None:
        import queue

        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)


def _dedup_sketch(sketch: np.ndarray, x: np.ndarray, start: int, first_seen: dict, duplicates: np.ndarray,
                  offset: int, fingerprints: np.ndarray | None, rows, dtype: np.dtype) -> np.ndarray:
    """:func:`_hash_rows` from device fingerprints (int64 [n, 8]): a row whose fingerprint was seen is
    compared byte for byte with the fingerprint's first row (read again from the source when it lies in an
    earlier block); a mismatch (a collision) falls back to the row's SHA-256, so the result is exact."""
    n = len(x)
    folded = _fold(sketch)  # uint64 [n, 2]: a 16-byte dictionary key per row
    keys = folded.view(np.dtype((np.void, 16))).ravel().tolist()
    keep = np.empty(n, dtype=bool)
    setdefault = first_seen.setdefault
    for i, key in enumerate(keys):
        g = start + i
        first = setdefault(key, g)
        if first != g:
            other = x[first - start] if first >= start else _flat(np.asarray(rows.read([first])), dtype)[0]
            if other.tobytes() != x[i].tobytes():  # a fingerprint collision: key this row by its bytes
                first = setdefault(b"sha256" + hashlib.sha256(x[i].tobytes()).digest(), g)
        duplicates[g - offset] = first
        keep[i] = first == g
    if fingerprints is not None and n:  # 64 bits for the cross-shard match (which compares bytes too)
        fingerprints[start - offset : start - offset + n] = folded[:, 0].view(np.int64)
    return keep


_MIX = np.random.default_rng(0x5D3F).integers(1, 2**63, (8, 2), dtype=np.uint64) | np.uint64(1)


def _fold(sketch: np.ndarray) -> np.ndarray:
    """The 8 projections of each row folded into 2 × 64 bits (odd multipliers, wrapping): uint64 [n, 2]."""
    a = np.ascontiguousarray(sketch, dtype="<i8").view(np.uint64)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(np.stack([(a * _MIX[:, j]).sum(1, dtype=np.uint64) for j in range(2)], 1))


def _hash_rows(x: np.ndarray, start: int, first_seen: dict[bytes, int], duplicates: np.ndarray,
               offset: int = 0, fingerprints: np.ndarray | None = None) -> np.ndarray:
    """Record each row's first identical copy (``duplicates[g − offset]`` for row g); True where the row is
    the first of its bytes. ``fingerprints`` (when given) receives each row's 64-bit fingerprint (the first
    8 bytes of its digest), for finding copies across shards.

    SHA-256 of each row's bytes (a 2⁻²⁵⁶ collision chance: no byte comparison needed). hashlib drops
    the GIL while hashing rows over 2 KiB, so large blocks are hashed by a few threads.
    """
    n, width = x.shape[0], x.shape[1] * x.itemsize
    buf = memoryview(x).cast("B")
    workers = _hash_workers()
    if workers > 1 and width >= 2048 and n * width >= (1 << 22):
        parts = _hash_pool().map(lambda ab: _digests(buf, width, *ab), row_blocks(n, -(-n // workers)))
        digests = [dg for part in parts for dg in part]
    else:
        digests = _digests(buf, width, 0, n)
    keep = np.empty(n, dtype=bool)
    setdefault = first_seen.setdefault
    for i, dg in enumerate(digests):
        g = start + i
        first = setdefault(dg, g)
        duplicates[g - offset] = first
        keep[i] = first == g
    if fingerprints is not None and n:
        fingerprints[start - offset : start - offset + n] = np.frombuffer(b"".join(dg[:8] for dg in digests), "<i8")
    return keep


def _digests(buf: memoryview, width: int, a: int, b: int) -> list[bytes]:
    sha = hashlib.sha256
    return [sha(buf[i * width : (i + 1) * width]).digest() for i in range(a, b)]


_POOL: ThreadPoolExecutor | None = None


def _hash_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _hash_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_hash_workers(), thread_name_prefix="sdmem-hash")
    return _POOL
