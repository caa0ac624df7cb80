"""A single background thread that runs exchanges in the order they were submitted.

Collectives must be issued in the same order on every rank. DDP calls its hook for the buckets in
the same order everywhere, so running each bucket's whole exchange (which may take several
collectives) on one FIFO thread keeps that order, while backward goes on computing the next
buckets: communication overlaps computation without any collective being issued from two threads.

On CUDA, the work runs on the stream that was current when it was submitted (the one backward
queued the gradients on), with that stream's device made current in the thread (a fresh thread's
current device is 0: leaving the stream context would otherwise switch to, and create a context
on, GPU 0 in every rank), and the Future is CUDA-aware and completed while that stream is
current, so DDP's wait orders its use of the result after the exchange's kernels.

The thread is a daemon so that an idle executor never keeps the interpreter alive, and it is
stopped and joined at interpreter exit: a daemon thread still returning from a completed Future
(C++ code) when the interpreter finalizes is killed mid-unwind, which aborts the process with
"terminate called without an active exception".
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .devices import new_future

_STOP = object()
_LIVE: weakref.WeakSet = weakref.WeakSet()


class SerialExecutor:
    """Run submitted functions one at a time, in order, on a daemon thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        _LIVE.add(self)

    def submit(
        self, fn: Callable[[], Any], device: torch.device | None = None
    ) -> torch.futures.Future:
        """Queue ``fn``; return a Future completed with its result (or its exception)."""
        fut = new_future(device)
        stream = (
            torch.cuda.current_stream(device)
            if device is not None and device.type == "cuda"
            else None
        )
        with self._lock:
            self._queue.put((fn, fut, stream))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sparsetrain-sync", daemon=True
                )
                self._thread.start()
        return fut

    def drain(self) -> None:
        """Wait until everything submitted so far has run (at once where nothing runs, or when
        called from the executor's own thread)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            return
        self.submit(lambda: None).wait()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Finish the queued work, then stop the thread (a later ``submit`` starts a new one)."""
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            self._queue.put(_STOP)
        thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, fut, stream = item
            if stream is None:
                complete(fut, fn)
                continue
            try:
                # The current device is per thread (0 in a fresh one); set it before entering
                # the stream context, whose exit restores the previous stream of that device.
                torch.cuda.set_device(stream.device)
                with torch.cuda.stream(stream):  # work on the stream that produced the gradients
                    complete(fut, fn)  # the Future records events on this stream
            except BaseException as e:  # noqa: BLE001 - the device, stream or set_result failed
                if not fut.done():  # a waiting DDP reducer must not wait forever
                    fut.set_exception(e)


_SHARED: SerialExecutor | None = None


def shared_executor() -> SerialExecutor:
    """The one background thread every DDP hook of this process submits to. Two hooked DDP
    models in one backward (a GAN's generator and discriminator) submit their buckets in
    autograd's order, the same on every rank; with a thread each, their collectives would go
    out in whichever order the two threads got there, different on each rank."""
    global _SHARED
    if _SHARED is None:
        _SHARED = SerialExecutor()
    return _SHARED


def complete(fut: torch.futures.Future, fn: Callable[[], Any]) -> None:
    """Complete ``fut`` with ``fn()``'s result or its exception (on CUDA, call it with the stream
    that ran ``fn`` current: a CUDA-aware Future records its events there)."""
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - handed to the waiting DDP reducer
        fut.set_exception(e)
    else:
        fut.set_result(result)


@atexit.register
def _shutdown_all() -> None:
    try:
        for executor in list(_LIVE):
            executor.shutdown(timeout=10.0)
    except KeyboardInterrupt:  # a second Ctrl-C while the process ends: no traceback for it
        pass
