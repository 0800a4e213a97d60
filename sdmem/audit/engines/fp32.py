"""The float engines: k fp32 candidates per query and training block, each re-ranked by its exact distance.

Each kept candidate's distance is recomputed exactly (int64 for uint8 data, float64 otherwise) while its
training block is in memory, and the final top-2 is taken on the exact distances, so fp32 rounding cannot flip
an order or a borderline replica flag. :class:`FloatEngine` keeps the running candidates;
:class:`TorchEngine` finds a block's by ``gemm.sqdist`` + ``topk`` (CPU or CUDA), and
:class:`~sdmem.audit.engines.faiss_knn.FaissEngine` by faiss.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..gemm import row_blocks, sqdist, sqnorms
from ..rows import as_tensor
from ..top2 import merge_top2
CANDIDATES = 8  # candidates per query kept for the exact re-rank
_U8_INT32_DIM = 33025  # uint8 squared differences summed in int32: D·255² < 2³¹


class FloatEngine:
    """Running top-k by fp32 distance with the exact distance of every kept candidate."""

    def __init__(self, queries: np.ndarray, uint8: bool, device: torch.device, k: int = CANDIDATES,
                 query_block: int | None = None):
        self.uint8 = uint8
        self.device = device
        self.k = k
        nq = len(queries)
        self.nq = nq
        self.q_np = np.ascontiguousarray(queries)  # uint8 or float32, for the exact re-rank
        self.q_t = as_tensor(self.q_np).to(device)
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
        x_t = as_tensor(x).to(self.device)
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
        return merge_top2([(ex.astype(np.float64), idx)])


def _exact_sqdist(q: np.ndarray, rows: np.ndarray, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact squared distances ||q[rows[i]] − x[cols[i]]||²: int64 for uint8 rows, float64 otherwise.

    numpy, in chunks of ~2M elements (16 pairs at least): uint8 differences squared and summed in int32
    (D·255² < 2³¹ for D ≤ 33025; larger D is summed in feature chunks of that size, then in int64).
    """
    d = q.shape[1]
    uint8 = q.dtype == np.uint8 and x.dtype == np.uint8
    out = np.empty(len(rows), np.int64 if uint8 else np.float64)
    feat = list(row_blocks(d, _U8_INT32_DIM)) if uint8 else [(0, d)]
    for a, b in row_blocks(len(rows), max(16, (1 << 21) // d)):
        total = 0
        for f0, f1 in feat:
            diff = q[rows[a:b], f0:f1].astype(np.int32 if uint8 else np.float64)
            diff -= x[cols[a:b], f0:f1]
            part = np.einsum("pd,pd->p", diff, diff)
            total = total + (part.astype(np.int64) if uint8 else part)
        out[a:b] = total
    return out


class TorchEngine(FloatEngine):
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
