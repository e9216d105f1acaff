"""The Celery application. Configuration comes from Django settings (``CELERY_*``)."""

import logging
import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudiopsy.settings")

app = Celery("cloudiopsy")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def _create_embedded_broker_folder(sender, **kwargs) -> None:
    """The filesystem transport needs its folder to exist before the first message."""
    for key in ("data_folder_in", "control_folder"):
        folder = sender.conf.broker_transport_options.get(key)
        if folder:
            os.makedirs(folder, exist_ok=True)


# Observability (docs/observability.md) ----------------------------------------------------------


def broker_queue_depths(*, url: str | None = None, queues=None, timeout: float = 2.0) -> dict[str, int]:
    """Messages waiting in each Celery queue (default: the queues in ``CELERY_TASK_QUEUES``).

    Asked of the broker through the app's connection with a passive ``queue_declare``, which
    Redis, RabbitMQ and the embedded broker all answer; a queue the broker does not know yet holds
    nothing. Raises the broker's error when it cannot be reached (the caller reports it down).
    """
    names = list(queues) if queues is not None else list(app.amqp.queues)
    depths: dict[str, int] = {}
    with app.connection_for_read(url) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        for name in names:
            # A channel per queue: RabbitMQ closes the channel that asked about an unknown queue.
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors:
                count = 0  # NOT_FOUND
            finally:
                try:
                    channel.close()
                except Exception:  # noqa: S110 - already closed by the broker after NOT_FOUND
                    pass
            depths[name] = int(count)
    return depths


@signals.setup_logging.connect
def _logging_from_django(**kwargs) -> None:
    """The worker logs through Django's LOGGING (JSON or plain, with request ids), not Celery's own
    handlers: a receiver here tells Celery to leave logging alone."""
    import logging.config

    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)


@signals.before_task_publish.connect
def _request_id_to_message(headers=None, **kwargs) -> None:
    """A task sent while a request is handled (on commit too: that is still inside the request)
    carries the request's id in its message."""
    from cloudiopsy.logging import TASK_HEADER, current_request_id

    request_id = current_request_id()
    if request_id and headers is not None:
        headers.setdefault(TASK_HEADER, request_id)


# task id -> context tokens to reset when the task ends.
_task_context: dict[str, tuple] = {}


@signals.task_prerun.connect
def _task_begin(task_id=None, task=None, **kwargs) -> None:
    from cloudiopsy import metrics
    from cloudiopsy.logging import TASK_HEADER, request_id_var, sane_request_id, task_var

    tokens = [task_var.set((task.name, task_id))]
    # Absent when run eagerly (the caller's id is in the context already) or sent outside a request.
    request_id = sane_request_id(getattr(task.request, TASK_HEADER, None))
    if request_id:
        tokens.append(request_id_var.set(request_id))
    _task_context[task_id] = tuple(tokens)
    metrics.task_started(task_id)


@signals.task_postrun.connect
def _task_end(task_id=None, task=None, state=None, **kwargs) -> None:
    from cloudiopsy import metrics

    metrics.task_finished(task_id, task.name, state)
    for token in reversed(_task_context.pop(task_id, ())):
        token.var.reset(token)


@signals.worker_init.connect
def _worker_metrics_server(**kwargs) -> None:
    """With ``WORKER_METRICS_PORT`` set, the worker serves its task metrics on that port (every
    pool process's when ``PROMETHEUS_MULTIPROC_DIR`` is set too; see docs/observability.md)."""
    from django.conf import settings

    if settings.WORKER_METRICS_PORT:
        from prometheus_client import start_http_server

        from cloudiopsy.metrics import process_registry

        address, port = settings.WORKER_METRICS_ADDRESS, settings.WORKER_METRICS_PORT
        start_http_server(port, addr=address, registry=process_registry())
        logging.getLogger(__name__).info("task metrics on http://%s:%s/metrics", address, port)
