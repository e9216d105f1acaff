"""Webhook events: created in the transaction that changes the case, sent after commit by a
Celery task with exponential backoff, signed so that a receiver can trust and de-duplicate them.

Signature header: ``Cloudiopsy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``, the HMAC of
``"<t>.<raw body>"`` under the endpoint's secret. Receivers should recompute it, reject a
timestamp more than SIGNATURE_TOLERANCE_SECONDS old (replays), and de-duplicate on the
``Cloudiopsy-Event-Id`` header (a retry after a lost response carries the same id).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from urllib.parse import urlparse

from django.db import transaction
from django.utils import timezone

from accounts.models import LabSystem
from cases.models import BiopsyCase
from webhooks.models import WebhookDelivery, WebhookEndpoint

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Cloudiopsy-Signature"
EVENT_ID_HEADER = "Cloudiopsy-Event-Id"
SIGNATURE_TOLERANCE_SECONDS = 300
MAX_ATTEMPTS = 8
TIMEOUT_SECONDS = 10


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, now: float | None = None) -> bool:
    """Check a signature header as a receiver would (shown here for integrators and tests)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > SIGNATURE_TOLERANCE_SECONDS:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def endpoint_set(*, lab_system: LabSystem, url: str) -> tuple[WebhookEndpoint, str]:
    """Set (or replace) a lab system's callback URL; returns it and its new secret."""
    parsed = urlparse(url)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        raise ValueError(f"the webhook URL must be http(s)://host/...: {url!r}")
    secret = WebhookEndpoint.new_secret()
    endpoint, _ = WebhookEndpoint.objects.update_or_create(
        lab_system=lab_system, defaults={"url": url, "secret": secret, "active": True}
    )
    return endpoint, secret


def events_for_cases(*, case_ids: list[int], event: str) -> None:
    """Queue ``event`` for every active endpoint of each case's institution. Call inside the
    transaction that changed the cases: the events commit with the change, and are sent after."""
    if not case_ids:
        return
    cases = BiopsyCase.objects.filter(pk__in=case_ids).only("pk", "accession", "status", "institution_id", "updated_at")
    endpoints = list(
        WebhookEndpoint.objects.filter(
            active=True,
            lab_system__revoked_at__isnull=True,
            lab_system__institution_id__in={c.institution_id for c in cases},
        ).select_related("lab_system")
    )
    created = []
    for case in cases:
        for endpoint in endpoints:
            if endpoint.lab_system.institution_id != case.institution_id:
                continue
            delivery = WebhookDelivery(endpoint=endpoint, event=event, case=case, payload={})
            delivery.payload = {
                "id": str(delivery.event_id),
                "type": event,
                "created": timezone.now().isoformat(),
                "data": {"case": {"id": case.pk, "accession": case.accession, "status": case.status}},
            }
            created.append(delivery)
    WebhookDelivery.objects.bulk_create(created)
    ids = [d.pk for d in WebhookDelivery.objects.filter(event_id__in=[d.event_id for d in created])]
    if ids:
        from webhooks.tasks import webhook_deliver

        transaction.on_commit(lambda: [webhook_deliver.delay(pk) for pk in ids])


def deliver(*, delivery_id: int) -> str:
    """Try to send one delivery. Returns its status: ``delivered``, ``pending`` (retry later) or
    ``failed`` (gave up after MAX_ATTEMPTS). A delivered event is never sent again."""
    import requests

    with transaction.atomic():
        delivery = (
            WebhookDelivery.objects.select_for_update(skip_locked=True)
            .select_related("endpoint")
            .filter(pk=delivery_id, status=WebhookDelivery.Status.PENDING)
            .first()
        )
        if delivery is None:
            return "skipped"  # delivered, failed, gone, or being sent by another worker right now
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Cloudiopsy-Webhooks/1",
            SIGNATURE_HEADER: sign(delivery.endpoint.secret, timestamp, body),
            EVENT_ID_HEADER: str(delivery.event_id),
        }
        delivery.attempts += 1
        try:
            response = requests.post(delivery.endpoint.url, data=body, headers=headers, timeout=TIMEOUT_SECONDS)
            delivery.last_status_code = response.status_code
            delivery.last_error = "" if response.ok else response.text[:500]
            ok = response.ok
        except requests.RequestException as exc:
            delivery.last_status_code = None
            delivery.last_error = f"{type(exc).__name__}: {exc}"[:500]
            ok = False
        if ok:
            delivery.status = WebhookDelivery.Status.DELIVERED
            delivery.delivered_at = timezone.now()
        elif delivery.attempts >= MAX_ATTEMPTS:
            delivery.status = WebhookDelivery.Status.FAILED
        delivery.save()
    if not ok:
        logger.warning("webhook %s attempt %d failed: %s", delivery.event_id, delivery.attempts, delivery.last_error)
    return delivery.status
