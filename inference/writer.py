"""Write-behind for a worker process: a batch's results are stored on a thread of its own while
the worker's main thread decodes and analyses the next batch.

A worker's time per batch is the model plus the database (predictions, statuses, audit events).
The model call releases the GIL and the database round trips wait on the server, so running the
two side by side keeps the cores busy instead of taking turns. At most ``depth`` batches wait to be
stored (the analysing thread blocks beyond that), so memory stays bounded.

Nothing here weakens exactly-once: a batch's patches are claimed (committed) before analysis and
its results are stored under the claim token, as on the calling thread. Results still queued when a
worker is killed are lost with it, as they would be mid-analysis: the patches stay RUNNING and the
reconciler re-queues them. A warm shutdown drains the queue first (``write_behind_stop``).

Only worker processes use it (``inference.worker`` turns it on); elsewhere, including eager tasks
in the tests, ``write_behind`` stores on the calling thread before it returns.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections, connection

logger = logging.getLogger(__name__)


class _State:
    enabled = False
    writer: _Writer | None = None
    lock = threading.Lock()


class _Writer:
    def __init__(self, depth: int):
        self.pid = os.getpid()
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.thread = threading.Thread(target=self._run, name="analysis-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                function, kwargs = job
                close_old_connections()  # a connection the server dropped (restart) is replaced
                function(**kwargs)
            except Exception:
                # The batch's patches stay RUNNING under their claim: the reconciler re-queues them.
                logger.exception("storing an analysed batch failed; the reconciler will re-queue its patches")
            finally:
                self.jobs.task_done()
                if job is None:
                    connection.close()


def write_behind_start() -> None:
    """Store analysed batches on a background thread from now on (in this process and its forks)."""
    _State.enabled = bool(settings.ANALYSIS_WRITE_BEHIND)


def write_behind(function: Callable[..., None], **kwargs) -> None:
    """Run ``function(**kwargs)`` on the writer thread when write-behind is on, else here and now."""
    if not _State.enabled:
        function(**kwargs)
        return
    with _State.lock:
        if _State.writer is None or _State.writer.pid != os.getpid():  # threads do not survive a fork
            _State.writer = _Writer(settings.ANALYSIS_WRITE_BEHIND_DEPTH)
        writer = _State.writer
    writer.jobs.put((function, kwargs))


def write_behind_flush() -> None:
    """Wait until every batch handed to the writer is stored."""
    writer = _State.writer
    if writer is not None and writer.pid == os.getpid():
        writer.jobs.join()


def write_behind_stop() -> None:
    """Store what is queued, then end the writer thread (warm shutdown of a worker process)."""
    with _State.lock:
        writer, _State.writer = _State.writer, None
    if writer is not None and writer.pid == os.getpid():
        writer.jobs.put(None)
        writer.thread.join()
