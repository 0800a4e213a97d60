"""The faiss engine: fp32 candidates by faiss, re-ranked exactly as in :class:`~.fp32.FloatEngine`."""

from __future__ import annotations

import numpy as np
import torch

from ...errors import SdmemError
from .fp32 import FloatEngine


def import_faiss():
    try:
        import faiss  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError:
        raise SdmemError("backend faiss needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


class FaissEngine(FloatEngine):
    """fp32 k-NN by faiss per block: ``faiss.knn`` (no index copy) on CPU, ``GpuIndexFlatL2`` on a GPU."""

    def __init__(self, queries, uint8, device, gpu: bool, **kwargs):
        super().__init__(queries, uint8, torch.device("cpu"), **kwargs)
        self.faiss = import_faiss()
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
