"""Exact two-nearest-neighbour search of generated images in a streamed training set.

The replica rule needs, for every generated image, the exact squared l2 distance to its nearest and
second-nearest *distinct* training image. The training set streams in blocks (bounded memory); only a
running top-2 (int8 backend) or top-k candidates (float backends) per query is kept.

:func:`search_top2` drives the pieces, each in its own module:

* :mod:`.rows`: the training and generated sets as flat row blocks, the block iterators;
* :mod:`.backends`: backend and device choice, block sizes, the checked :class:`~.backends.Plan`;
* :mod:`.engines`: ``int8`` (exact integer arithmetic on uint8 pixels by ``torch._int_mm``; measured on 2
  AVX-512 cores: ~0.87 of the int8 GEMM rate end to end), ``torch`` and ``faiss`` (fp32 candidates, each
  re-ranked by its exact distance, so fp32 rounding cannot flip an order or a borderline replica flag);
* :mod:`.dedup`: each training row's fingerprint (device projections for int8, SHA-256 otherwise) and first
  identical copy: with ``dedup`` later copies are dropped from the search, so a copy cannot give d1 = d2;
* :mod:`.prefetch`: training blocks read one ahead by a background thread (pinned memory and a side-stream
  copy on a GPU), so reading, the host-to-device copy and the search overlap;
* :mod:`.top2`: the result and the one top-2 merge (in the engines, and across the processes of a sharded
  search, :mod:`.shard`).
"""

from __future__ import annotations

import numpy as np
import torch

from .backends import BACKENDS, Plan, plan_search
from .dedup import Dedup
from .prefetch import Staged
from .rows import checked_blocks, ends_digest, shard_blocks
from .shard import SOLO, Comm, shard_range
from .top2 import Top2, merge_top2

# Re-exported for code and tests that import them from here (read them here; patch them where they live).
from .engines import TUNING  # noqa: F401 (tests set its block sizes)
from .engines.int8 import Int8Engine as _Int8Engine  # noqa: F401
from .engines.int8 import _I32_MAX, _INT32_MAX_DIM, _MAX_K_CHUNK, _sketch_matrix, _tiled_top2  # noqa: F401
from .rows import query_blocks as _query_blocks  # noqa: F401

__all__ = ["Top2", "search_top2"]


def search_top2(queries, train, *, backend: str = "auto", device: str = "auto", dedup: bool = True,
                block_size: int | None = None, progress: bool = False, query_chunk: int | None = None,
                comm: Comm | None = None) -> Top2:
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
    err = plan = None
    try:  # every process checks its arguments; a refusal on one is raised on all (no process left waiting)
        plan = plan_search(queries, train, backend, device, block_size, query_chunk)
    except Exception as exc:  # noqa: BLE001 (re-raised on this process by comm.check)
        err = exc
    comm.check(err)
    if comm.world > 1:
        comm.agree({"training images": plan.n_train, "values per image": plan.dim, "generated images":
                    len(plan.qrows), "backend": plan.backend, "dedup": dedup,
                    "first and last images": ends_digest(plan.rows, plan.qrows, plan.dtype)})
    lo, hi = shard_range(plan.n_train, comm.rank, comm.world)
    dups = Dedup(plan.rows, plan.dtype, lo, hi, sharded=comm.world > 1)
    sq = np.empty((len(plan.qrows), 2), dtype=np.float64)
    idx = np.empty((len(plan.qrows), 2), dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(plan.chunks) * -(-(hi - lo) // plan.block_size), unit="block",
                   desc=f"nearest neighbours ({plan.backend}/{plan.device.type})")
    try:
        for qa, qb in plan.chunks:
            err = part = None
            try:
                part = _search_chunk(plan, qa, qb, lo, hi, dups, dedup, bar)
            except Exception as exc:  # noqa: BLE001 (re-raised on this process by comm.check)
                err = exc
            comm.check(err)
            dups.resolve(comm, plan.n_train, dedup, plan.name)  # after the first pass
            if comm.world == 1:
                sq[qa:qb], idx[qa:qb] = part
            else:
                gathered = zip(comm.all_gather(part[0]), comm.all_gather(part[1]))
                sq[qa:qb], idx[qa:qb] = merge_top2(list(gathered), dups.duplicates if dedup else None)
    finally:
        if bar is not None:
            bar.close()
    return Top2(sqdist=sq, index=idx, num_train=plan.n_train, num_distinct=dups.num_distinct,
                duplicates=dups.duplicates, backend=plan.backend, device=plan.device.type)


def _search_chunk(plan: Plan, qa: int, qb: int, lo: int, hi: int, dups: Dedup, dedup: bool, bar):
    """One pass of generated images [qa, qb) over this process's training rows [lo, hi): their exact top-2
    (inf, -1 where there is no candidate)."""
    engine = plan.engine(qa, qb)
    staged = Staged(shard_blocks(plan.rows, lo, hi, plan.block_size), plan.dtype,
                    plan.device if plan.backend == "int8" else None)
    try:
        for start, x, xd in checked_blocks(staged, lo, hi, plan.dim, plan.name):
            keep = dups.keep(start, x, None if xd is None else lambda: engine.sketch(xd))
            gidx = np.arange(start, start + len(x), dtype=np.int64)
            if dedup and not keep.all():
                gidx = gidx[keep]
                if xd is not None:
                    xd = xd[torch.from_numpy(np.flatnonzero(keep)).to(xd.device)]
                else:
                    x = np.ascontiguousarray(x[keep])
            engine.add(x if xd is None else xd, gidx)
            if bar is not None:
                bar.update(1)
    finally:
        staged.close()
    part = engine.result()
    part[0][part[1] < 0] = np.inf  # padding / empty shards: no candidate
    return part
