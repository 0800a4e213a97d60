"""Backend and device choice of the 2-NN search, its block sizes, and the checked plan of one search.

Backends (same results, exact): ``int8`` for uint8 pixels (:mod:`.engines.int8`), ``faiss`` (``faiss.knn`` on
CPU, ``GpuIndexFlatL2`` with faiss-gpu) and ``torch`` (``gemm.sqdist`` + ``topk``) for any data
(:mod:`.engines.fp32`); ``auto`` picks int8 for uint8 data, else faiss when importable, else torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.base import ImageSource
from ..errors import InputError, SdmemError
from ..utils import resolve_device
from .engines import TUNING
from .engines.faiss_knn import FaissEngine, import_faiss
from .engines.fp32 import TorchEngine
from .engines.int8 import TILE, Int8Engine
from .rows import QueryRows, as_rows, describe, query_blocks

BACKENDS = ("auto", "int8", "faiss", "torch")


def faiss_available() -> bool:
    try:
        import_faiss()
        return True
    except SdmemError:
        return False


def resolve_backend(backend: str, all_uint8: bool) -> str:
    if backend not in BACKENDS:
        raise SdmemError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if all_uint8:
            return "int8"
        return "faiss" if faiss_available() else "torch"
    if backend == "int8" and not all_uint8:
        raise SdmemError("backend int8 needs uint8 pixels for both generated and training images; "
                         "use backend faiss or torch for float data")
    if backend == "faiss":
        import_faiss()
    return backend


def default_block(backend: str, dim: int, device: torch.device) -> int:
    """Training rows per streamed block: ~48 MiB of uint8 rows (half for float backends) on CPU, at
    most 8192 rows, in whole 64-row tiles (CIFAR: 8192 rows; 256×256×3: 256 rows); more on a GPU."""
    budget = (48 << 20) if device.type == "cpu" else (1 << 27)
    if backend != "int8":
        budget = budget // 2  # float32 copies are 4x larger
    cap = 8192 if device.type == "cpu" else 32768
    rows = max(2 * TILE, min(cap, budget // max(dim, 1)))
    return rows - rows % TILE  # whole tiles: no padded rows in the int8 GEMM


def default_query_chunk(backend: str, dim: int, device: torch.device, qdtype: np.dtype) -> int:
    """Generated images per pass: ~1 GiB of resident queries on CPU (4 GiB on a GPU). int8 keeps one byte per
    feature; the float engines keep the input rows and an fp32 copy."""
    budget = (1 << 30) if device.type == "cpu" else (4 << 30)
    per_feature = 1 if backend == "int8" else 4 + (1 if qdtype == np.uint8 else 0)
    return max(1, budget // max(dim * per_feature, 1))


@dataclass
class Plan:
    """One search, checked: its inputs, backend, device and block sizes."""

    qrows: QueryRows
    rows: object  # an ImageSource or rows.ArrayRows
    name: str  # the training set's
    dim: int
    n_train: int
    dtype: np.dtype  # uint8 when both sides are, else float32
    backend: str
    device: torch.device
    faiss_gpu: bool
    block_size: int
    chunks: list[tuple[int, int]]  # query chunks, one pass over the training rows each

    @property
    def all_uint8(self) -> bool:
        return self.dtype == np.uint8

    def engine(self, qa: int, qb: int):
        """A fresh engine for generated images [qa, qb)."""
        if self.backend == "int8":
            return Int8Engine(qb - qa, self.dim, lambda a, b: self.qrows.read(qa + a, qa + b, self.dtype),
                              self.device, TUNING.query_block, TUNING.k_chunk)
        q = self.qrows.read(qa, qb, self.dtype)
        if self.backend == "torch":
            return TorchEngine(q, self.all_uint8, self.device, query_block=TUNING.query_block)
        return FaissEngine(q, self.all_uint8, self.device, self.faiss_gpu, query_block=TUNING.query_block)


def plan_search(queries, train, backend: str, device: str, block_size: int | None,
                query_chunk: int | None) -> Plan:
    """Check the inputs and settings of :func:`~sdmem.audit.knn.search_top2` (InputError, SdmemError)."""
    qrows = QueryRows(queries)
    rows, tdtype, tdim, tname = as_rows(train)
    if qrows.dim != tdim:
        tshape = getattr(train, "shape", None) if isinstance(train, ImageSource) else \
            (train.shape[1:] if train.ndim == 4 else None)
        raise InputError(tname, f"training images are {describe(tdim, tshape)} but generated images are "
                                f"{describe(qrows.dim, qrows.shape)}; pass --resolution R to compare both "
                                "at R x R")
    n_train = len(rows)
    if n_train < 2:
        raise InputError(tname, f"needs at least 2 distinct training images, found {n_train}")
    all_uint8 = qrows.dtype == np.uint8 and tdtype == np.uint8
    dtype = np.dtype(np.uint8) if all_uint8 else np.dtype(np.float32)
    backend = resolve_backend(backend, all_uint8)
    dev = torch.device(resolve_device(device))
    faiss_gpu = False
    if backend == "faiss":
        faiss = import_faiss()
        faiss_gpu = dev.type == "cuda" and faiss.get_num_gpus() > 0 and hasattr(faiss, "GpuIndexFlatL2")
        dev = torch.device("cuda" if faiss_gpu else "cpu")
    bs = block_size or default_block(backend, tdim, dev)
    if bs <= 0:
        raise InputError("block_size", f"expected a positive number of rows, got {bs}")
    qc = query_chunk or default_query_chunk(backend, tdim, dev, qrows.dtype)
    if qc <= 0:
        raise InputError("query_chunk", f"expected a positive number of images, got {qc}")
    return Plan(qrows, rows, tname, tdim, n_train, dtype, backend, dev, faiss_gpu, bs, query_blocks(len(qrows), qc))
