"""The int8 engine: an exact running top-2 by integer arithmetic on uint8 pixels.

Pixels shifted to int8 (a − 128, distances unchanged), dot products by ``torch._int_mm`` (oneDNN VNNI on CPU,
int8 tensor cores on CUDA) into a reused int32 buffer. The glue works on the key ``||x||² − 2 q·x`` (``||q||²``
is constant per row and added once at the end): one in-place pass makes the key, one vectorised ``amin`` over
64-column tiles finds the two tiles holding each row's top-2, the exact (value, column) top-2 is taken among
those 128 candidates, and :func:`~sdmem.audit.top2.merge_top2` merges it with the running top-2 (ties go to the
lower index). Everything is integer arithmetic: no rounding anywhere. int32 holds the key for D ≤ 33025; for
larger D (e.g. 256×256×3) the feature dimension is split into chunks whose int8 products cannot overflow int32
and the key is accumulated in int64.

The same GEMM gives each training row's fingerprint (:meth:`Int8Engine.sketch`) where the block already is.
"""

from __future__ import annotations

import numpy as np
import torch

from ..gemm import row_blocks
from ..rows import as_tensor, query_blocks
from ..top2 import merge_top2

# int8 products are at most (−128)² = 2¹⁴, so an int32 accumulator is safe for K·2¹⁴ < 2³¹:
# K ≤ 131071; keep chunks a multiple of 8 (cuBLASLt int8 constraint).
_MAX_K_CHUNK = 131064
# int32 glue: key = ||x||² − 2 q·x = ||x − q||² − ||q||² lies in [−D·128², D·255²] and the intermediate
# 2 q·x in [−D·2¹⁵, D·2¹⁵]; both fit int32 (strictly below the INT32_MAX sentinel) for D ≤ 33025.
_INT32_MAX_DIM = 33025
_I32_MAX = 2**31 - 1
_I64_MAX = 2**63 - 1
_I64_SENTINEL = 2**62  # padded rows' ||x||² in the int64 glue: above any real key, no overflow
TILE = 64  # columns per tile in the block top-2 (blocks are padded to whole tiles)
_Q_BLOCK_CPU = 2048  # query rows per int8 GEMM on CPU (see eval/bench_audit.py)
_Q_BLOCK_CUDA = 16384


class Int8Engine:
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
            x = as_tensor(read(a, b)).to(device)
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
        self.qblocks = query_blocks(self.qp, query_block)
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
        bytes (:func:`sdmem.audit.dedup.dedup_sketch`). Only 64 bytes per row cross to the host instead of hashing every
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
        npad = max(2 * TILE, n + (-n % TILE))  # whole tiles, at least two
        xd = x_u8 if isinstance(x_u8, torch.Tensor) else as_tensor(x_u8)
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
            v1, c1, v2, c2 = _tiled_top2(key, TILE)
            block = (torch.stack([v1, v2], 1), torch.stack([g[c1], g[c2]], 1))
            self.best_key[s:e], self.best_idx[s:e] = merge_top2([(self.best_key[s:e], self.best_idx[s:e]), block])

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
