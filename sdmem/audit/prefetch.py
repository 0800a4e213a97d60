"""Training blocks read one block ahead by a background thread (:class:`~sdmem.pipeline.Background`): disk
reads and decoding overlap the search; on a GPU each block also goes into pinned memory and is copied to the
device on a side stream, so reading, the host-to-device copy and the search overlap."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from ..pipeline import Background
from .rows import as_tensor, flat


class Staged:
    """The (start, block) pairs of ``blocks`` flattened to [n, D] rows of ``dtype`` by a reader thread, one block
    ahead. Yields (start, host rows, device rows or None): with ``device`` None nothing is uploaded; with a CPU
    device the device rows share the host rows' memory. ``close()`` stops the reader (always call it)."""

    def __init__(self, blocks: Iterable, dtype: np.dtype, device: torch.device | None, depth: int = 1):
        self._cuda = device is not None and device.type == "cuda"
        if self._cuda and device.index is None:  # the reader thread must use this thread's GPU (set per thread)
            device = torch.device("cuda", torch.cuda.current_device())
        self._dtype, self._device = dtype, device
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        setup = (lambda: torch.cuda.set_device(device)) if self._cuda else None
        self._reader = Background.produce(blocks, self._stage, name="sdmem-prefetch", depth=depth, setup=setup)

    def _stage(self, item) -> tuple:
        start, block = item
        x = flat(np.asarray(block), self._dtype)
        if self._device is None:
            return start, x, None
        if not self._cuda:
            return start, x, as_tensor(x)
        pinned = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)  # torch caches pinned blocks
        pinned.numpy()[...] = x
        with torch.cuda.stream(self._stream):
            xd = pinned.to(self._device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return start, x, (xd, done)

    def __iter__(self) -> Iterator[tuple]:
        for start, x, xd in self._reader:
            if self._cuda:
                xd, done = xd
                current = torch.cuda.current_stream(self._device)
                current.wait_event(done)
                xd.record_stream(current)  # allocated on the side stream, used on this one
            yield start, x, xd

    def close(self) -> None:
        self._reader.close()
