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
import ipaddress
import json
import logging
import socket
import time
from urllib.parse import urlparse

from django.conf import settings
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


def check_url(url: str) -> None:
    """Refuse a webhook URL the platform must not call: anything but https (unless
    WEBHOOK_ALLOW_HTTP), and a host that resolves to a loopback, private, link-local (cloud
    metadata), reserved or multicast address (unless WEBHOOK_ALLOW_PRIVATE_HOSTS, for receivers
    inside the hospital's network). Checked when the URL is set and again before every send, after
    DNS, so a name re-pointed at an internal address is caught too.

    Raises:
        ValueError: saying why.
    """
    parsed = urlparse(url)
    allowed = {"https", "http"} if settings.WEBHOOK_ALLOW_HTTP else {"https"}
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ValueError(f"the webhook URL must be http(s)://host/...: {url!r}")
    if parsed.scheme not in allowed:
        raise ValueError(f"the webhook URL must use https (WEBHOOK_ALLOW_HTTP is off): {url!r}")
    if settings.WEBHOOK_ALLOW_PRIVATE_HOSTS:
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError) as exc:
        raise ValueError(f"the webhook host {parsed.hostname!r} does not resolve: {exc}") from None
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ValueError(
                f"the webhook host {parsed.hostname!r} resolves to {ip}, a private, loopback or link-local "
                "address (set WEBHOOK_ALLOW_PRIVATE_HOSTS for a receiver inside the hospital's network)"
            )


def endpoint_set(*, lab_system: LabSystem, url: str) -> tuple[WebhookEndpoint, str]:
    """Set (or replace) a lab system's callback URL (``check_url``); returns it and its new secret."""
    check_url(url)
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
            check_url(delivery.endpoint.url)
            # No redirects: a receiver must not bounce the call to an address check_url refuses.
            response = requests.post(
                delivery.endpoint.url, data=body, headers=headers, timeout=TIMEOUT_SECONDS, allow_redirects=False
            )
            delivery.last_status_code = response.status_code
            ok = 200 <= response.status_code < 300  # a redirect is not a delivery
            delivery.last_error = "" if ok else response.text[:500]
        except (requests.RequestException, ValueError) as exc:
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
