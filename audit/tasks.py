"""Celery tasks: thin wrappers that call a service."""

from celery import shared_task
from django.conf import settings

from audit import anchors


@shared_task(name="audit.tasks.audit_anchor_write", acks_late=False)
def audit_anchor_write() -> int | None:
    # AUDIT_ANCHOR_DIR should be storage the web and worker hosts can add files to but not rewrite.
    anchor = anchors.audit_anchor_write(directory=getattr(settings, "AUDIT_ANCHOR_DIR", ""))
    return anchor["id"] if anchor else None
