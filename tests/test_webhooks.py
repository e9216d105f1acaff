"""Signed webhooks to a real local HTTP receiver, with Celery's retry (run eagerly here)."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command

from accounts.services import lab_system_create
from cases.services import patch_upload
from inference import services as inference_services
from tests.conftest import fixture_patch, new_case
from webhooks import services
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.tasks import webhook_deliver

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _local_receivers(settings):
    """The test receivers listen on http://127.0.0.1, as an on-premise receiver would."""
    settings.WEBHOOK_ALLOW_HTTP = True
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True


@pytest.fixture(autouse=True)
def _field_encryption_key(settings):
    """Tests run with DEBUG off (pytest-django), where the key must be configured, as in production."""
    settings.FIELD_ENCRYPTION_KEY = Fernet.generate_key().decode()


class Receiver:
    """A real HTTP server on 127.0.0.1 that answers with the given status codes in turn.
    ``on_post(headers, body)``, when given, runs in the server's thread before it answers."""

    def __init__(self, statuses: list[int], on_post=None):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                if on_post is not None:
                    on_post(dict(self.headers), body)
                code = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code < 300 else b"try again")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/cloudiopsy"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    started = []

    def start(statuses, on_post=None):
        started.append(Receiver(statuses, on_post))
        return started[-1]

    yield start
    for r in started:
        r.close()


def _analyse_case(clinician, capture):
    case = new_case(clinician)
    patches = patch_upload(
        case=case, uploaded_by=clinician, files=[("t.png", fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes())]
    ).patches
    with capture(execute=True):
        inference_services.prediction_run(patch_ids=[p.pk for p in patches])
    return case


def test_ready_case_is_posted_signed_retried_after_500_and_not_repeated(
    institution, clinician, demo_model, receiver, eager_celery, django_capture_on_commit_callbacks
):
    lis = receiver([500, 200])
    lab, _ = lab_system_create(institution=institution, name="LIS")
    _, secret = services.endpoint_set(lab_system=lab, url=lis.url)
    case = _analyse_case(clinician, django_capture_on_commit_callbacks)

    assert len(lis.requests) == 2  # the 500, then the retry that succeeded
    (first_headers, first_body), (headers, body) = lis.requests
    assert headers["Cloudiopsy-Event-Id"] == first_headers["Cloudiopsy-Event-Id"] and body == first_body
    assert services.verify(secret, headers["Cloudiopsy-Signature"], body)
    assert not services.verify("whsec_wrong", headers["Cloudiopsy-Signature"], body)
    event = json.loads(body)
    assert event["type"] == "case.ready_for_review" and event["id"] == headers["Cloudiopsy-Event-Id"]
    assert event["data"]["case"] == {"id": case.pk, "accession": case.accession, "status": "ready_for_review"}
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 2, 200)

    assert webhook_deliver.delay(delivery.pk).get() == "skipped"  # delivered once, never again
    assert len(lis.requests) == 2


def test_unreachable_receiver_is_given_up_after_the_last_attempt(
    institution, clinician, demo_model, receiver, eager_celery, django_capture_on_commit_callbacks
):
    lis = receiver([503] * 20)
    lab, _ = lab_system_create(institution=institution, name="LIS")
    services.endpoint_set(lab_system=lab, url=lis.url)
    _analyse_case(clinician, django_capture_on_commit_callbacks)
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "failed" and delivery.attempts == services.MAX_ATTEMPTS
    assert delivery.last_status_code == 503 and len(lis.requests) == services.MAX_ATTEMPTS


def test_events_go_only_to_the_case_institution_and_live_tokens(
    institution, other_institution, clinician, demo_model, receiver, eager_celery, django_capture_on_commit_callbacks
):
    ours, theirs, revoked = receiver([]), receiver([]), receiver([])
    lab, _ = lab_system_create(institution=institution, name="LIS")
    services.endpoint_set(lab_system=lab, url=ours.url)
    other, _ = lab_system_create(institution=other_institution, name="LIS")
    services.endpoint_set(lab_system=other, url=theirs.url)
    old, _ = lab_system_create(institution=institution, name="Old LIS")
    services.endpoint_set(lab_system=old, url=revoked.url)
    from accounts.services import lab_system_revoke

    lab_system_revoke(lab_system=old)
    _analyse_case(clinician, django_capture_on_commit_callbacks)
    assert [d.endpoint.url for d in WebhookDelivery.objects.all()] == [ours.url]
    assert (len(ours.requests), len(theirs.requests), len(revoked.requests)) == (1, 0, 0)


def test_signature_rejects_old_timestamps():
    body = b'{"id":"x"}'
    old = int(time.time()) - services.SIGNATURE_TOLERANCE_SECONDS - 10
    assert not services.verify("whsec_k", services.sign("whsec_k", old, body), body)
    assert services.verify("whsec_k", services.sign("whsec_k", int(time.time()), body), body)


def test_set_lab_webhook_command_prints_the_secret_once(institution):
    from django.core.management import CommandError

    lab_system_create(institution=institution, name="LIS")
    out = io.StringIO()
    url = "https://93.184.215.14/hook"  # a public address: no DNS needed here
    call_command("set_lab_webhook", institution=institution.slug, name="LIS", url=url, stdout=out, stderr=io.StringIO())
    assert out.getvalue().startswith("WEBHOOK_SECRET=whsec_")
    with pytest.raises(CommandError, match="must be http"):
        call_command("set_lab_webhook", institution=institution.slug, name="LIS", url="ftp://x/y")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://127.0.0.1/hook", "private, loopback or link-local"),
        ("https://169.254.169.254/latest/meta-data/", "private, loopback or link-local"),
        ("https://10.0.0.1/hook", "private, loopback or link-local"),
        ("https://[::1]/hook", "private, loopback or link-local"),
        ("https://localhost/hook", "private, loopback or link-local"),
        ("http://93.184.215.14/hook", "must use https"),
        ("ftp://93.184.215.14/hook", "must be http"),
        ("https://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_webhook_urls_must_be_https_to_a_public_address(institution, settings, url, why):
    settings.WEBHOOK_ALLOW_HTTP = False
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = False
    lab, _ = lab_system_create(institution=institution, name="LIS")
    with pytest.raises(ValueError, match=why):
        services.endpoint_set(lab_system=lab, url=url)
    assert not WebhookEndpoint.objects.exists()


def test_a_url_refused_at_send_is_not_called_and_a_redirect_is_not_a_delivery(
    institution, clinician, demo_model, receiver, settings, eager_celery, django_capture_on_commit_callbacks
):
    lis = receiver([302, 302, 302, 302, 302, 302, 302, 302])
    lab, _ = lab_system_create(institution=institution, name="LIS")
    services.endpoint_set(lab_system=lab, url=lis.url)
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = False  # e.g. switched off since the URL was set
    _analyse_case(clinician, django_capture_on_commit_callbacks)
    delivery = WebhookDelivery.objects.get()
    assert delivery.status != WebhookDelivery.Status.DELIVERED and "private, loopback" in delivery.last_error
    assert lis.requests == []  # never called
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True
    WebhookDelivery.objects.filter(pk=delivery.pk).update(attempts=0, status=WebhookDelivery.Status.PENDING)
    services.deliver(delivery_id=delivery.pk)
    delivery.refresh_from_db()
    assert delivery.last_status_code == 302 and delivery.status == WebhookDelivery.Status.PENDING
