"""One background thread joined to its caller by a bounded queue (the prefetch of the auditor, the PNG writer).

:class:`Background` runs in either direction:

* :meth:`Background.produce`: the thread works through an iterable (e.g. reads and stages training blocks) and
  the caller iterates the results, at most ``depth`` ahead; an error in the thread is raised by the caller's
  iteration where it happened in the stream; ``close()`` stops the thread early (always call it).
* :meth:`Background.consume`: the caller ``put``\\ s items and the thread handles them in order (e.g. writes PNGs),
  at most ``depth`` waiting; the thread's first error is raised by the next ``put`` or by :meth:`check`, and the
  thread keeps taking (and skipping) items after it, so a ``put`` never blocks on a dead thread; ``close()`` lets
  the thread finish what is queued.

The module imports nothing from sdmem (any part of it may use it).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

_END = object()  # end of the stream (either direction)


class Background:
    """A daemon thread running ``body(self)`` and a queue of ``depth`` items between it and the caller."""

    def __init__(self, body: Callable[["Background"], None], name: str, depth: int, produces: bool):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._produces = produces
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(body,), name=name, daemon=True)
        self._thread.start()

    @classmethod
    def produce(cls, items: Iterable, stage: Callable = lambda item: item, *, name: str, depth: int = 1,
                setup: Callable[[], None] | None = None) -> "Background":
        """``stage(item)`` for each item of ``items`` on the thread (``setup()`` first, there); iterate the result."""

        def body(bg: Background) -> None:
            if setup is not None:
                setup()
            for item in items:
                if not bg._offer(stage(item)):
                    return

        return cls(body, name, depth, produces=True)

    @classmethod
    def consume(cls, work: Callable, *, name: str, depth: int = 2) -> "Background":
        """``work(item)`` on the thread for each item that the caller ``put``\\ s, in order."""

        def body(bg: Background) -> None:
            for item in iter(bg._queue.get, _END):
                if bg.error is None:  # after a failure keep draining, so that put() never blocks
                    try:
                        work(item)
                    except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                        bg.error = exc

        return cls(body, name, depth, produces=False)

    def _main(self, body) -> None:
        try:
            body(self)
        except BaseException as exc:  # noqa: BLE001 (handed to the caller, raised there)
            self.error = exc
        if self._produces and not self._stop.is_set():
            self._queue.put(_END)  # close() drains the queue, so this cannot block for ever

    def _offer(self, item) -> bool:
        """Thread side of :meth:`produce`: queue ``item``; False once the caller has stopped listening."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        """Caller side of :meth:`produce`: the staged items in order, then the thread's error if it failed."""
        while True:
            item = self._queue.get()
            if item is _END:
                self.check()
                return
            yield item

    def put(self, item) -> None:
        """Caller side of :meth:`consume`: queue ``item`` (blocks while ``depth`` wait); raises the thread's error."""
        self.check()
        self._queue.put(item)

    def check(self) -> None:
        """Raise the thread's first error, if any."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for the thread: a consumer first handles what is queued; a producer is stopped (its queue drained)."""
        if not self._produces:
            if self._thread.is_alive():
                self._queue.put(_END)
                self._thread.join()
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
