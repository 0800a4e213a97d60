"""A sharded audit across processes (``accelerate launch`` / ``torchrun``, GPUs or nodes).

Every process searches *all* generated images against its contiguous share of the training rows
(:func:`shard_range`); the per-process top-2 candidates ``(squared distance, training index)`` are then
all-gathered and merged exactly (:func:`~sdmem.audit.top2.merge_top2`, the merge of one process too; ties to the lowest training index as in one process).

Duplicates are found globally: each process fingerprints its rows in the search pass as one process does
(device projections confirmed byte for byte with the int8 backend, SHA-256 with the float ones; exact copies
inside a shard are dropped from its search at once), then the 64-bit fingerprints of the shard's first copies
are all-gathered. A row whose fingerprint also belongs to a row of a lower shard is
compared byte for byte with those rows (read again from the source, lowest index first); an identical
one becomes its representative. The resulting global ``duplicates`` array is all-gathered too, and merging
drops every candidate that is not its own representative. Per-process top-2 lists are enough: a dropped
candidate's representative has the same distance and a lower index, so it precedes it in the global order.

All collectives are CPU tensors on a gloo group (the default group when it is gloo, else a new one), so the
same code runs under an NCCL default group. Errors on one process are agreed on at each collective step
(:meth:`Comm.check`), so a failing rank makes every rank raise instead of leaving the others waiting; what rank 0
alone does (checking that it can write ``--out`` before the search, writing the report after it) is shared by
:meth:`Comm.check_main`, so every rank raises the same error and exits 2 with one line.

``accelerate launch [--multi_gpu --num_processes N] -m sdmem audit ...`` and ``torchrun --nproc_per_node N -m
sdmem audit ...`` run :func:`sdmem.audit.api.audit_distributed` through the CLI.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from ..errors import InputError, SdmemError
from .top2 import merge_top2  # noqa: F401 (the one top-2 merge: in one process and across shards)

__all__ = ["Comm", "SOLO", "shard_range", "merge_top2", "launched", "process_group"]


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of process ``rank`` of ``world``: contiguous, sizes differ by at most one, in rank order."""
    return n * rank // world, n * (rank + 1) // world


class Comm:
    """The few collectives a sharded search needs; ``Comm()`` is the single process (no communication)."""

    rank: int = 0
    world: int = 1

    def all_gather(self, arr: np.ndarray) -> list[np.ndarray]:
        """Every process's array (same dtype and trailing shape, any length), in rank order."""
        return [arr]

    def check(self, err: BaseException | None) -> None:
        """Agree on failure: raise ``err`` here, or an SdmemError naming the process that failed elsewhere."""
        if err is not None:
            raise err

    def barrier(self) -> None:
        pass

    def check_main(self, err: BaseException | None) -> None:
        """Share the outcome of what process 0 alone did (``err``: its failure, or None; ignored on the other
        processes): process 0 raises ``err``, every other process the same InputError (same place, same problem;
        an SdmemError naming process 0 for any other failure), or nothing anywhere."""
        mine = None
        if self.rank == 0 and err is not None:
            mine = (("input", err.where, err.problem) if isinstance(err, InputError) else
                    ("sdmem", str(err)) if isinstance(err, SdmemError) else ("other", f"{type(err).__name__}: {err}"))
        outcome = self.all_gather_object(mine)[0]
        if self.rank == 0:
            if err is not None:
                raise err
            return
        if outcome is None:
            return
        if outcome[0] == "input":
            raise InputError(outcome[1], outcome[2])
        raise SdmemError(outcome[1] if outcome[0] == "sdmem" else f"process 0 of {self.world} failed: {outcome[1]}")

    def agree(self, facts: dict) -> None:
        """Refuse (InputError, on every process) when the processes were given different inputs: ``facts`` maps
        a description to a JSON-able value that must be equal everywhere."""
        gathered = self.all_gather_object(facts)
        for key in facts:
            values = [g.get(key) for g in gathered]
            if any(v != values[0] for v in values):
                seen = ", ".join(f"process {r}: {v}" for r, v in enumerate(values))
                raise InputError("sharded audit", f"the processes were given different inputs ({key}: {seen}); "
                                                  "every process must read the same sets with the same options")

    def all_gather_object(self, obj) -> list:
        return [obj]


SOLO = Comm()


class TorchComm(Comm):
    """Comm over a torch.distributed gloo group (CPU tensors)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def all_gather(self, arr: np.ndarray) -> list[np.ndarray]:
        import torch

        arr = np.asarray(arr)
        if arr.dtype == np.bool_:
            return [a.astype(bool) for a in self.all_gather(arr.astype(np.uint8))]
        size = torch.tensor([arr.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self.dist.all_gather(sizes, size, group=self.group)
        sizes = [int(s) for s in sizes]
        padded = np.zeros((max(sizes), *arr.shape[1:]), dtype=arr.dtype)  # gloo gathers equal shapes
        padded[: len(arr)] = arr
        mine = torch.from_numpy(padded)
        outs = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(outs, mine, group=self.group)
        return [o.numpy()[:s] for o, s in zip(outs, sizes)]

    def check(self, err: BaseException | None) -> None:
        msgs: list = [None] * self.world
        mine = None if err is None else str(err) if isinstance(err, SdmemError) else f"{type(err).__name__}: {err}"
        self.dist.all_gather_object(msgs, mine, group=self.group)
        if err is not None:
            raise err
        for r, m in enumerate(msgs):
            if m is not None:
                raise SdmemError(f"process {r} of {self.world} failed: {m}")

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def all_gather_object(self, obj) -> list:
        out: list = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out


def launched() -> bool:
    """True under a launcher with more than one process (torch.distributed initialised, or WORLD_SIZE > 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size() > 1
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


@contextmanager
def process_group(device: str = "auto") -> Iterator[Comm]:
    """A :class:`TorchComm` for this launch, on the launch's process group (``training.start_processes``: set up
    once, kept until the process exits); a barrier when the block ends."""
    import torch
    import torch.distributed as dist

    from ..training import start_processes

    start_processes(cpu=device == "cpu" or not torch.cuda.is_available())
    if not dist.is_initialized():
        raise SdmemError("WORLD_SIZE > 1 but torch.distributed could not be initialised; start the audit "
                         "with `accelerate launch -m sdmem audit ...` or `torchrun --nproc_per_node N -m sdmem "
                         "audit ...`")
    if device != "cpu" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    comm = TorchComm(group)
    try:
        yield comm
    finally:
        comm.barrier()
