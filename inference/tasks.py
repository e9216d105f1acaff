"""Celery tasks: thin wrappers that take ids and call a service."""

from celery import shared_task

from inference import services


@shared_task(name="inference.tasks.prediction_run")
def prediction_run(patch_ids: list[int]) -> dict[str, int]:
    return services.prediction_run(patch_ids=[int(i) for i in patch_ids])


@shared_task(name="inference.tasks.analysis_reconcile", acks_late=False)
def analysis_reconcile() -> dict[str, int]:
    return services.analysis_reconcile()
