"""Celery tasks, routed to the "webhooks" queue (CELERY_TASK_ROUTES) so that slow receivers never
hold up analysis. A worker started without -Q consumes every queue in CELERY_TASK_QUEUES. The only
module of the app that talks to Celery: it also sends the deliveries the services announce as due."""

import logging

from celery import shared_task
from django.conf import settings
from django.dispatch import receiver

from webhooks import services
from webhooks.signals import deliveries_due

logger = logging.getLogger(__name__)

# One attempt is bounded by WEBHOOK_DEADLINE_SECONDS; the rest is a few short queries.
_TIME_LIMIT = settings.WEBHOOK_DEADLINE_SECONDS + services.CLAIM_MARGIN_SECONDS


@shared_task(
    bind=True,
    name="webhooks.tasks.webhook_deliver",
    max_retries=services.MAX_ATTEMPTS,
    acks_late=True,
    soft_time_limit=_TIME_LIMIT - 5,
    time_limit=_TIME_LIMIT,
)
def webhook_deliver(self, delivery_id: int) -> str:
    status = services.webhook_deliver(delivery_id=int(delivery_id))
    if status == "pending":
        # Backoff as the delivery records it; if this retry message is lost, the sweep sends it.
        raise self.retry(countdown=services.retry_countdown(delivery_id=int(delivery_id)))
    return status


@shared_task(name="webhooks.tasks.webhook_sweep", acks_late=False, soft_time_limit=50, time_limit=55)
def webhook_sweep() -> dict[str, int]:
    return services.webhook_sweep()


@receiver(deliveries_due, dispatch_uid="webhooks.tasks.deliveries_enqueue")
def deliveries_enqueue(sender=None, *, delivery_ids: list[int], **kwargs) -> int:
    """Send the delivery task for each id; returns how many were sent. A broker error is logged,
    never raised: the change that made these events is committed already and must not turn into
    an error page. The deliveries stay pending and the sweep (``webhook_sweep``) sends them."""
    for sent, delivery_id in enumerate(delivery_ids):
        try:
            webhook_deliver.delay(delivery_id)
        except Exception:
            # The broker is down (or unreachable): the next ones would wait and fail the same way.
            logger.exception(
                "could not enqueue webhook deliveries %s; they stay pending and the sweep will send them",
                delivery_ids[sent:],
            )
            return sent
    return len(delivery_ids)
