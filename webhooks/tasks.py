from celery import shared_task

from webhooks import services


@shared_task(bind=True, name="webhooks.tasks.webhook_deliver", max_retries=services.MAX_ATTEMPTS, acks_late=True)
def webhook_deliver(self, delivery_id: int) -> str:
    status = services.deliver(delivery_id=int(delivery_id))
    if status == "pending":
        # Exponential backoff: 10 s, 20 s, 40 s ... capped at one hour.
        raise self.retry(countdown=min(10 * 2**self.request.retries, 3600))
    return status
