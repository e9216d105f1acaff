"""Worker liveness: each Celery worker records a heartbeat row that /healthz reads.

This works with every broker (the embedded filesystem broker has no remote control channel
for ``celery inspect ping``) and across hosts that share the database.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_init, worker_process_shutdown, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from inference.writer import write_behind_start, write_behind_stop

logger = logging.getLogger(__name__)
_stop = threading.Event()


def _beat(hostname: str) -> None:
    from inference.models import WorkerHeartbeat

    started = timezone.now()
    while not _stop.is_set():
        try:
            close_old_connections()
            WorkerHeartbeat.objects.update_or_create(
                hostname=hostname, defaults={"last_seen": timezone.now(), "started_at": started}
            )
        except Exception:
            logger.exception("worker heartbeat could not be written")
        finally:
            connection.close()
        _stop.wait(settings.WORKER_HEARTBEAT_SECONDS)


@worker_ready.connect
def _start_heartbeat(sender=None, **kwargs) -> None:
    hostname = getattr(sender, "hostname", None) or "worker"
    threading.Thread(target=_beat, args=(hostname,), name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(sender=None, **kwargs) -> None:
    _stop.set()


@worker_init.connect
def _start_write_behind(sender=None, **kwargs) -> None:
    """Worker processes store analysed batches while they analyse the next (inference/writer.py);
    the pool's processes, forked from this one, inherit the setting."""
    write_behind_start()


@worker_process_shutdown.connect
def _stop_write_behind(sender=None, **kwargs) -> None:
    write_behind_stop()  # a pool process's warm shutdown stores what it has analysed


@worker_shutdown.connect
def _stop_write_behind_solo(sender=None, **kwargs) -> None:
    write_behind_stop()  # the solo and threads pools analyse in the main process
