"""The one thread that runs the model, fed by a priority queue.

Policy (why: the model and :class:`~segany.engine.predictor.Predictor` are not meant for
concurrent use, and one thread keeps CPU/GPU use predictable):

- Every model call (encode an upload, decode a prompt, segment everything) is a job run by a
  single worker thread, one job at a time; the event loop only waits on a future, so the server
  keeps answering (health, static files, queue-full errors) while the model is busy.
- Jobs are taken by priority, then first come first served: ``PROMPT`` (decoding on a cached
  embedding, milliseconds) before ``ENCODE`` (an upload, one encoder pass) before
  ``EVERYTHING`` (segment-everything, seconds). A prompt therefore never waits behind a queued
  encode or segment-everything job; it can only wait for the job already running (a running
  job is not interrupted) plus the prompts queued before it.
- The queue is bounded (``max_pending`` jobs; ``max_everything`` of them segment-everything);
  beyond that a request is refused at once with 503 rather than queued without limit.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from typing import Any, Callable

PROMPT, ENCODE, EVERYTHING = 0, 1, 2
_STOP = 99  # sorts after every job: the worker stops once the queue is drained of work


class QueueFullError(RuntimeError):
    """Too many jobs waiting; the client should retry later (HTTP 503)."""


class ModelWorker:
    """``submit(priority, fn, *args)`` → a :class:`concurrent.futures.Future` run on the model thread."""

    def __init__(self, max_pending: int = 64, max_everything: int = 2, max_encode: int = 8) -> None:
        # Waiting encode jobs each hold a decoded image (up to the server's pixel cap): their own cap.
        self.max_pending, self.max_everything, self.max_encode = max_pending, max_everything, max_encode
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._pending = {PROMPT: 0, ENCODE: 0, EVERYTHING: 0}
        self.done = 0
        self._thread = threading.Thread(target=self._loop, name="segany-model", daemon=True)
        self._thread.start()

    def check_room(self, priority: int) -> None:
        """Raise :class:`QueueFullError` if a job of ``priority`` would be refused now (callers check
        before costly preparation, e.g. decoding an upload; :meth:`submit` checks again)."""
        with self._lock:
            self._check_room(priority)

    def _check_room(self, priority: int) -> None:
        if not self._thread.is_alive():
            raise QueueFullError("the model worker has stopped")
        if sum(self._pending.values()) >= self.max_pending:
            raise QueueFullError(f"{self.max_pending} jobs are waiting for the model; retry shortly")
        for kind, cap, what in ((EVERYTHING, self.max_everything, "segment-everything"),
                                (ENCODE, self.max_encode, "image encoding")):
            if priority == kind and self._pending[kind] >= cap:
                raise QueueFullError(f"{cap} {what} jobs are waiting; retry shortly")

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        with self._lock:
            self._check_room(priority)
            self._pending[priority] += 1
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((priority, next(self._seq), fn, args, fut))
        return fut

    def pending(self) -> dict[str, int]:
        with self._lock:
            p = self._pending
            return dict(prompt=p[PROMPT], encode=p[ENCODE], everything=p[EVERYTHING])

    def _loop(self) -> None:
        while True:
            priority, _, fn, args, fut = self._queue.get()
            if priority == _STOP:
                return
            with self._lock:
                self._pending[priority] -= 1
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the waiting request, which maps it to a response
                fut.set_exception(e)
            finally:
                self.done += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then end the thread (bounded wait)."""
        self._queue.put((_STOP, next(self._seq), None, (), None))
        self._thread.join(timeout)
