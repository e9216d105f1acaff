"""Webhook events: created in the transaction that changes the case, sent after commit by a
Celery task (queue "webhooks") with exponential backoff, signed so that a receiver can trust and
de-duplicate them. docs/webhooks.md tells the whole story; in short:

Signature header: ``Cloudiopsy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``, the HMAC of
``"<t>.<raw body>"`` under the endpoint's secret. Receivers should recompute it, reject a
timestamp more than SIGNATURE_TOLERANCE_SECONDS old (replays), and de-duplicate on the
``Cloudiopsy-Event-Id`` header (a retry after a lost response carries the same id).

An attempt claims its delivery with a conditional UPDATE (pending -> sending, attempts + 1) that
commits at once, then POSTs with no transaction open and no row locked, within a total deadline
of WEBHOOK_DEADLINE_SECONDS (name lookup, connect, TLS, send and the answer together), then
records the outcome with a second conditional UPDATE. The beat sweep re-sends what the broker
lost. Lab systems whose token is revoked or expired get nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from datetime import timedelta
from urllib.parse import unquote, urlparse

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import LabSystem
from cases.models import BiopsyCase
from webhooks.crypto import InvalidToken, secret_decrypt, secret_encrypt
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.signals import deliveries_due

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Cloudiopsy-Signature"
EVENT_ID_HEADER = "Cloudiopsy-Event-Id"
SIGNATURE_TOLERANCE_SECONDS = 300
MAX_ATTEMPTS = 8
BACKOFF_FIRST_SECONDS = 10  # then 20, 40 ... capped at BACKOFF_MAX_SECONDS
BACKOFF_MAX_SECONDS = 3600
# A claim older than the deadline plus this is a lost worker's, never a live attempt's.
CLAIM_MARGIN_SECONDS = 30
SWEEP_BATCH = 500
ANSWER_PREVIEW_BYTES = 2048  # of the receiver's answer, kept (500 characters) in last_error


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
    DNS, so a name re-pointed at an internal address is caught too; the send then connects to the
    very addresses checked (a second lookup could answer differently).

    Raises:
        ValueError: saying why.
    """
    parsed, port = _parse_url(url)
    if settings.WEBHOOK_ALLOW_PRIVATE_HOSTS:
        return
    _refuse_private(parsed.hostname, _resolve(parsed.hostname, port, timeout=None))


def endpoint_set(*, lab_system: LabSystem, url: str) -> tuple[WebhookEndpoint, str]:
    """Set (or replace) a lab system's callback URL (``check_url``); returns it and its new secret.

    The secret is returned once and stored only encrypted (``webhooks.crypto``).
    """
    # As stored now: a token revoked since ``lab_system`` was read counts.
    current = LabSystem.objects.only("revoked_at", "expires_at").get(pk=lab_system.pk)
    refused = _lab_system_refusal(current, timezone.now())
    if refused:
        raise ValueError(refused)
    check_url(url)
    secret = WebhookEndpoint.new_secret()
    endpoint, _ = WebhookEndpoint.objects.update_or_create(
        lab_system=lab_system, defaults={"url": url, "secret_encrypted": secret_encrypt(secret), "active": True}
    )
    return endpoint, secret


def events_for_cases(*, case_ids: list[int], event: str) -> None:
    """Queue ``event`` for every active endpoint of each case's institution whose lab system's token
    is neither revoked nor expired. Call inside the transaction that changed the cases: the events
    commit with the change, and are sent after."""
    if not case_ids:
        return
    now = timezone.now()
    cases = BiopsyCase.objects.filter(pk__in=case_ids).only("pk", "accession", "status", "institution_id", "updated_at")
    endpoints = list(
        WebhookEndpoint.objects.filter(
            Q(lab_system__expires_at__isnull=True) | Q(lab_system__expires_at__gt=now),
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
            delivery = WebhookDelivery(endpoint=endpoint, event=event, case=case, payload={}, next_attempt_at=now)
            delivery.payload = {
                "id": str(delivery.event_id),
                "type": event,
                "created": now.isoformat(),
                "data": {"case": {"id": case.pk, "accession": case.accession, "status": case.status}},
            }
            created.append(delivery)
    WebhookDelivery.objects.bulk_create(created)
    ids = list(
        WebhookDelivery.objects.filter(event_id__in=[d.event_id for d in created])
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if ids:
        transaction.on_commit(lambda: deliveries_due.send(sender=WebhookDelivery, delivery_ids=ids))


def webhook_deliver(*, delivery_id: int) -> str:
    """Make one attempt at a pending delivery. Returns its status afterwards: ``delivered``,
    ``pending`` (retry at its ``next_attempt_at``), ``failed`` (gave up after MAX_ATTEMPTS, or
    its lab system may no longer receive events), or ``skipped`` when it was not pending (delivered,
    failed, gone, or claimed by another worker). A delivered event is never sent again.

    Call it outside a transaction (a Celery task): the claim must commit before the POST, so that
    no transaction stays open and no row stays locked while a receiver takes its time.
    """
    delivery = (
        WebhookDelivery.objects.select_related("endpoint__lab_system")
        .filter(pk=delivery_id, status=WebhookDelivery.Status.PENDING)
        .first()
    )
    if delivery is None:
        return "skipped"
    endpoint = delivery.endpoint
    refused = _lab_system_refusal(endpoint.lab_system, timezone.now()) or (
        "" if endpoint.active else "not sent: this webhook endpoint was deactivated"
    )
    if refused:
        # Not an attempt and never retried: nothing more goes to this receiver.
        WebhookDelivery.objects.filter(pk=delivery.pk, status=WebhookDelivery.Status.PENDING).update(
            status=WebhookDelivery.Status.FAILED, last_status_code=None, last_error=refused
        )
        logger.warning("webhook %s not sent: %s", delivery.event_id, refused)
        return WebhookDelivery.Status.FAILED

    attempt = delivery.attempts + 1
    claimed = WebhookDelivery.objects.filter(
        pk=delivery.pk, status=WebhookDelivery.Status.PENDING, attempts=delivery.attempts
    ).update(status=WebhookDelivery.Status.SENDING, attempts=attempt, claimed_at=timezone.now())
    if not claimed:
        return "skipped"  # 0 rows updated: another worker claimed this attempt first.

    status_code, error = None, ""
    try:
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Cloudiopsy-Webhooks/1",
            SIGNATURE_HEADER: sign(secret_decrypt(endpoint.secret_encrypted), int(time.time()), body),
            EVENT_ID_HEADER: str(delivery.event_id),
        }
        status_code, answer = http_post(
            endpoint.url, body=body, headers=headers, deadline_seconds=settings.WEBHOOK_DEADLINE_SECONDS
        )
        if not 200 <= status_code < 300:  # a redirect is not a delivery
            error = answer.decode(errors="replace").strip() or f"HTTP {status_code}"
    except InvalidToken:
        error = "the signing secret cannot be decrypted: FIELD_ENCRYPTION_KEY changed? Set the webhook again."
    except (OSError, ValueError, http.client.HTTPException) as exc:
        error = f"{type(exc).__name__}: {exc}"

    now = timezone.now()
    outcome = {"last_status_code": status_code, "last_error": error[:500]}
    if not error:
        outcome.update(status=WebhookDelivery.Status.DELIVERED, delivered_at=now)
    elif attempt >= MAX_ATTEMPTS:
        outcome.update(status=WebhookDelivery.Status.FAILED)
    else:
        outcome.update(status=WebhookDelivery.Status.PENDING, next_attempt_at=now + timedelta(seconds=backoff(attempt)))
    recorded = WebhookDelivery.objects.filter(
        pk=delivery.pk, status=WebhookDelivery.Status.SENDING, attempts=attempt
    ).update(**outcome)
    if not recorded:
        # The sweep took this attempt for a lost one (it outlived the claim margin); its record stands.
        logger.warning("webhook %s attempt %d ended after the sweep released it", delivery.event_id, attempt)
    if error:
        logger.warning("webhook %s attempt %d failed: %s", delivery.event_id, attempt, outcome["last_error"])
    return outcome["status"]


deliver = webhook_deliver  # the name before issue 9


def backoff(attempt: int) -> int:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): 10, 20, 40 ... 3600."""
    return min(BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1), BACKOFF_MAX_SECONDS)


def retry_countdown(*, delivery_id: int) -> float:
    """Seconds until the delivery's next attempt is due (0 when due now or gone)."""
    due = WebhookDelivery.objects.filter(pk=delivery_id).values_list("next_attempt_at", flat=True).first()
    return max(0.0, (due - timezone.now()).total_seconds()) if due else 0.0


def webhook_sweep(*, now=None) -> dict[str, int]:
    """Re-send what the broker lost. Run by beat every minute.

    - pending deliveries due more than WEBHOOK_SWEEP_AFTER_SECONDS ago (their message, or the
      retry's, never arrived: broker down at commit, broker restarted) are enqueued again;
    - deliveries stuck in "sending" longer than that (and than the deadline plus a margin: the
      worker died mid-attempt) go back to pending, that attempt counted, and are enqueued again,
      or fail when it was the last attempt.

    Each delivery found is pushed to ``now`` (next_attempt_at), so the next sweep leaves it alone
    for another WEBHOOK_SWEEP_AFTER_SECONDS. Sending it twice is harmless: an attempt starts with
    a conditional claim, and a delivered event is never sent again. Returns counts.
    """
    now = now or timezone.now()
    late = now - timedelta(seconds=settings.WEBHOOK_SWEEP_AFTER_SECONDS)
    stuck = now - timedelta(
        seconds=max(settings.WEBHOOK_SWEEP_AFTER_SECONDS, settings.WEBHOOK_DEADLINE_SECONDS + CLAIM_MARGIN_SECONDS)
    )
    Status = WebhookDelivery.Status
    counts = {"resent": 0, "released": 0, "failed": 0}
    with transaction.atomic():
        lost = list(
            WebhookDelivery.objects.select_for_update(skip_locked=True)
            .filter(status=Status.SENDING, claimed_at__lte=stuck)
            .order_by("claimed_at")
            .values_list("pk", "attempts")[:SWEEP_BATCH]
        )
        for pk, attempts in lost:
            rows = WebhookDelivery.objects.filter(pk=pk, status=Status.SENDING, attempts=attempts)
            if attempts >= MAX_ATTEMPTS:
                counts["failed"] += rows.update(
                    status=Status.FAILED, last_error=f"attempt {attempts} was lost (its worker stopped); gave up"
                )
            else:
                counts["released"] += rows.update(
                    status=Status.PENDING,
                    next_attempt_at=late,
                    last_error=f"attempt {attempts} was lost (its worker stopped)",
                )
        due = list(
            WebhookDelivery.objects.select_for_update(skip_locked=True)
            .filter(status=Status.PENDING, next_attempt_at__lte=late)
            .order_by("next_attempt_at")
            .values_list("pk", flat=True)[:SWEEP_BATCH]
        )
        WebhookDelivery.objects.filter(pk__in=due).update(next_attempt_at=now)
        counts["resent"] = len(due)
        if due:
            transaction.on_commit(lambda: deliveries_due.send(sender=WebhookDelivery, delivery_ids=due))
    if any(counts.values()):
        logger.warning("webhook sweep: %s", counts)
    return counts


def http_post(url: str, *, body: bytes, headers: dict[str, str], deadline_seconds: float) -> tuple[int, bytes]:
    """POST ``body`` to ``url`` (checked by ``check_url``) and return the status code and the first
    ANSWER_PREVIEW_BYTES of the answer. Redirects are not followed.

    Everything, the name lookup included, ends within ``deadline_seconds``: requests' timeout is per
    socket operation, so a receiver trickling its answer a byte at a time could hold a worker
    indefinitely. Here every socket operation gets only the time left of one deadline. The
    connection goes to the addresses checked, never to those of a second lookup.

    Raises:
        ValueError: the URL is refused (``check_url``).
        OSError: name lookup, connection, TLS or the deadline (TimeoutError).
        http.client.HTTPException: the answer is not HTTP.
    """
    deadline = _Deadline(deadline_seconds)
    parsed, port = _parse_url(url)
    try:
        return _exchange(parsed, port, body, headers, deadline)
    except TimeoutError as exc:
        raise TimeoutError(f"no complete answer within the {deadline_seconds} s deadline ({exc})") from exc


def _exchange(parsed, port: int, body: bytes, headers: dict[str, str], deadline: _Deadline) -> tuple[int, bytes]:
    addresses = _resolve(parsed.hostname, port, timeout=deadline.remaining())
    if not settings.WEBHOOK_ALLOW_PRIVATE_HOSTS:
        _refuse_private(parsed.hostname, addresses)
    sock = _connect(addresses, deadline)
    connection = None
    try:
        if parsed.scheme == "https":
            sock = _tls_context().wrap_socket(sock, server_hostname=parsed.hostname, do_handshake_on_connect=False)
            sock.deadline = deadline
            sock.settimeout(deadline.remaining())
            sock.do_handshake()
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        headers = {**headers, "Host": host if parsed.port is None else f"{host}:{parsed.port}", "Connection": "close"}
        if parsed.username is not None:  # https://user:password@host/ as requests would send it
            credentials = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        connection = http.client.HTTPConnection(parsed.hostname, port)
        connection.sock = sock  # already connected: http.client never opens its own
        connection.request("POST", (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else ""), body, headers)
        response = connection.getresponse()
        return response.status, response.read(ANSWER_PREVIEW_BYTES)
    finally:
        if connection is not None:
            connection.close()
        sock.close()


def _parse_url(url: str):
    parsed = urlparse(url)
    allowed = {"https", "http"} if settings.WEBHOOK_ALLOW_HTTP else {"https"}
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ValueError(f"the webhook URL must be http(s)://host/...: {url!r}")
    if parsed.scheme not in allowed:
        raise ValueError(f"the webhook URL must use https (WEBHOOK_ALLOW_HTTP is off): {url!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)  # ValueError if out of range
    return parsed, port


def _resolve(host: str, port: int, *, timeout: float | None) -> list[tuple[int, tuple]]:
    """(family, socket address) for each address of ``host``, in the resolver's order."""
    found: dict = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            found["error"] = exc

    if timeout is None:
        lookup()
    else:
        # getaddrinfo has no timeout of its own: wait for it in a thread, and leave it behind if late.
        thread = threading.Thread(target=lookup, name="webhook-dns", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"looking up {host!r} took longer than the deadline")
    if "error" in found:
        raise ValueError(f"the webhook host {host!r} does not resolve: {found['error']}")
    return list(dict.fromkeys((info[0], info[4]) for info in found["infos"]))


def _refuse_private(host: str, addresses: list[tuple[int, tuple]]) -> None:
    for address in sorted({sockaddr[0] for _, sockaddr in addresses}):
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ValueError(
                f"the webhook host {host!r} resolves to {ip}, a private, loopback or link-local "
                "address (set WEBHOOK_ALLOW_PRIVATE_HOSTS for a receiver inside the hospital's network)"
            )


def _lab_system_refusal(lab_system: LabSystem, now) -> str:
    """Why this lab system may receive no event ('' when it may)."""
    if lab_system.revoked_at is not None:
        return f"not sent: the lab system's API token was revoked at {lab_system.revoked_at:%Y-%m-%d %H:%M} UTC"
    if lab_system.expires_at is not None and lab_system.expires_at <= now:
        return f"not sent: the lab system's API token expired at {lab_system.expires_at:%Y-%m-%d %H:%M} UTC"
    return ""


class _Deadline:
    """One end time (monotonic clock) shared by every step of an attempt."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("time is up")
        return left


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive gets only the time left of its deadline."""

    deadline: _Deadline

    def sendall(self, data, flags=0):
        self.settimeout(self.deadline.remaining())
        return super().sendall(data, flags)

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.settimeout(self.deadline.remaining())
        return super().recv_into(buffer, nbytes, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    deadline: _Deadline

    def send(self, data, flags=0):  # sendall sends through this
        self.settimeout(self.deadline.remaining())
        return super().send(data, flags)

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.settimeout(self.deadline.remaining())
        return super().recv_into(buffer, nbytes, flags)


def _connect(addresses: list[tuple[int, tuple]], deadline: _Deadline) -> socket.socket:
    error: OSError = OSError("no address to connect to")
    for family, sockaddr in addresses:
        sock = _DeadlineSocket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.deadline = deadline
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _tls_context() -> ssl.SSLContext:
    # The system's certificate authorities (SSL_CERT_FILE / SSL_CERT_DIR add a hospital's own)
    # and certifi's, which requests used before.
    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except ImportError:
        pass
    context.sslsocket_class = _DeadlineSSLSocket
    return context
