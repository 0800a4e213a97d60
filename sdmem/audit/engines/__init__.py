"""The search engines of the 2-NN search; each is built for one chunk of generated images and takes the training
blocks in stream order: ``add(block, ids)`` (rows [n, D] and their int64 training indices), then ``result()``
(exact float64 squared distances [Q, 2] and int64 indices [Q, 2], ascending, ties to the lower index; -1 where
there is no candidate).

* :mod:`.int8`: exact integer arithmetic on uint8 pixels (``torch._int_mm``), also the device fingerprints;
* :mod:`.fp32`: fp32 candidates with an exact re-rank (:class:`~.fp32.FloatEngine`), by ``gemm.sqdist``
  (:class:`~.fp32.TorchEngine`);
* :mod:`.faiss_knn`: the same re-rank over ``faiss`` candidates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Tuning:
    """Block sizes the engines choose for themselves; tests set them (``monkeypatch.setattr(TUNING, ...)``) to
    exercise many query blocks or a split feature dimension on small data. None: the engine's default."""

    query_block: int | None = None  # query rows per GEMM
    k_chunk: int | None = None  # int8: features per int32-safe GEMM chunk


TUNING = Tuning()
