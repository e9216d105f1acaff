"""Celery tasks, routed to the "webhooks" queue (CELERY_TASK_ROUTES) so that slow receivers never
hold up analysis. A worker started without -Q consumes every queue in CELERY_TASK_QUEUES."""

from celery import shared_task
from django.conf import settings

from webhooks import services

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
