"""Celery tasks: thin wrappers that call a service."""

from celery import shared_task

from accounts import services


@shared_task(name="accounts.tasks.idempotency_purge", acks_late=False)
def idempotency_purge() -> int:
    return services.idempotency_purge()
