"""Exact duplicates inside the training set (they would give d1 = d2 and hide a replica).

Every training row gets a fingerprint during the search's first pass over the training set, and its first
identical copy is recorded (:class:`Dedup`); with ``dedup`` the later copies are dropped from the search (the
first copy stands for them). Two fingerprints, one bookkeeping loop (:func:`_record`):

* :func:`dedup_sketch` (int8 backend): 8 exact int8 projections computed where the block is (on the GPU when
  searching there, :meth:`~sdmem.audit.engines.int8.Int8Engine.sketch`), so only 64 bytes a row reach the host;
  equal fingerprints are confirmed byte for byte;
* :func:`hash_rows` (float backends): SHA-256 of each row on the host.

Across shards, :func:`resolve_duplicates` matches the shards' first copies by 64-bit fingerprint and bytes.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..errors import InputError
from .gemm import row_blocks
from .rows import flat
from .shard import Comm


class Dedup:
    """Duplicate bookkeeping of one process's training rows [lo, hi) over the passes of a search.

    First pass: :meth:`keep` fingerprints each block and records each row's first copy in the shard. Then
    :meth:`resolve` makes the global ``duplicates`` (across shards), and later passes reuse it.
    """

    def __init__(self, rows, dtype: np.dtype, lo: int, hi: int, sharded: bool):
        self.rows, self.dtype, self.lo, self.hi = rows, dtype, lo, hi
        self.local = np.empty(hi - lo, dtype=np.int64)  # each shard row's first identical copy in the shard
        self.fingerprints = np.empty(hi - lo, dtype=np.int64) if sharded else None
        self.first_seen: dict[bytes, int] = {}
        self.duplicates: np.ndarray | None = None  # global, known after the first pass
        self.num_distinct = 0
        self._keep: np.ndarray | None = None

    def keep(self, start: int, x: np.ndarray, sketch: Callable[[], np.ndarray] | None) -> np.ndarray:
        """True for the rows of block ``x`` (at ``start``) that are the first of their bytes. In the first pass
        ``sketch()`` gives the block's device fingerprints (None: SHA-256 on the host)."""
        if self._keep is not None:
            return self._keep[start - self.lo : start - self.lo + len(x)]
        if sketch is not None:
            return dedup_sketch(sketch(), x, start, self.first_seen, self.local, self.lo, self.fingerprints,
                                self.rows, self.dtype)
        return hash_rows(x, start, self.first_seen, self.local, self.lo, self.fingerprints)

    def resolve(self, comm: Comm, n_train: int, dedup: bool, name: str) -> None:
        """After the first pass: the global duplicates (refused with fewer than 2 distinct images)."""
        if self.duplicates is not None:
            return
        self.first_seen.clear()
        self.duplicates = resolve_duplicates(comm, self.rows, self.dtype, self.lo, self.hi, self.local,
                                             self.fingerprints)
        self.num_distinct = int(np.count_nonzero(self.duplicates == np.arange(n_train)))
        if dedup and self.num_distinct < 2:
            raise InputError(name, f"needs at least 2 distinct training images, found {self.num_distinct}")
        self._keep = self.duplicates[self.lo : self.hi] == np.arange(self.lo, self.hi)


def _record(keys: list, start: int, first_seen: dict, duplicates: np.ndarray, offset: int,
            confirm: Callable[[int, int, int], int] | None = None) -> np.ndarray:
    """The loop both fingerprints share: row ``start + i`` keyed by ``keys[i]``; its first copy (the first row
    with its key; ``confirm(i, g, first)`` may correct it) goes to ``duplicates[g − offset]``. True where the
    row is the first of its key."""
    keep = np.empty(len(keys), dtype=bool)
    setdefault = first_seen.setdefault
    for i, key in enumerate(keys):
        g = start + i
        first = setdefault(key, g)
        if first != g and confirm is not None:
            first = confirm(i, g, first)
        duplicates[g - offset] = first
        keep[i] = first == g
    return keep


def dedup_sketch(sketch: np.ndarray, x: np.ndarray, start: int, first_seen: dict, duplicates: np.ndarray,
                 offset: int, fingerprints: np.ndarray | None, rows, dtype: np.dtype) -> np.ndarray:
    """:func:`hash_rows` from device fingerprints (int64 [n, 8]): a row whose fingerprint was seen is
    compared byte for byte with the fingerprint's first row (read again from the source when it lies in an
    earlier block); a mismatch (a collision) falls back to the row's SHA-256, so the result is exact."""
    n = len(x)
    folded = _fold(sketch)  # uint64 [n, 2]: a 16-byte dictionary key per row
    keys = folded.view(np.dtype((np.void, 16))).ravel().tolist()

    def confirm(i: int, g: int, first: int) -> int:
        other = x[first - start] if first >= start else flat(np.asarray(rows.read([first])), dtype)[0]
        if other.tobytes() != x[i].tobytes():  # a fingerprint collision: key this row by its bytes
            return first_seen.setdefault(b"sha256" + hashlib.sha256(x[i].tobytes()).digest(), g)
        return first

    keep = _record(keys, start, first_seen, duplicates, offset, confirm)
    if fingerprints is not None and n:  # 64 bits for the cross-shard match (which compares bytes too)
        fingerprints[start - offset : start - offset + n] = folded[:, 0].view(np.int64)
    return keep


def hash_rows(x: np.ndarray, start: int, first_seen: dict[bytes, int], duplicates: np.ndarray,
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
    keep = _record(digests, start, first_seen, duplicates, offset)
    if fingerprints is not None and n:
        fingerprints[start - offset : start - offset + n] = np.frombuffer(b"".join(dg[:8] for dg in digests), "<i8")
    return keep


def resolve_duplicates(comm: Comm, rows, dtype: np.dtype, lo: int, hi: int, local_dups: np.ndarray,
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
                got = flat(np.asarray(rows.read(np.append(cands, i))), dtype)
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


_MIX = np.random.default_rng(0x5D3F).integers(1, 2**63, (8, 2), dtype=np.uint64) | np.uint64(1)


def _fold(sketch: np.ndarray) -> np.ndarray:
    """The 8 projections of each row folded into 2 × 64 bits (odd multipliers, wrapping): uint64 [n, 2]."""
    a = np.ascontiguousarray(sketch, dtype="<i8").view(np.uint64)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(np.stack([(a * _MIX[:, j]).sum(1, dtype=np.uint64) for j in range(2)], 1))


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
