"""Worker liveness: each Celery worker records a heartbeat row that /healthz reads.

This works with every broker (the embedded filesystem broker has no remote control channel
for ``celery inspect ping``) and across hosts that share the database.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

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
