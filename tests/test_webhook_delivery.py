"""How a webhook is sent: a committed claim, then the POST with no transaction open and within one
total deadline, the outcome recorded after; the beat sweep for lost messages; a broker that is
down; revoked or expired lab systems; the signing secret encrypted at rest. Real local HTTP(S)
servers; the broker is replaced only to make it fail."""

from __future__ import annotations

import datetime
import io
import logging
import ssl
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from accounts.services import lab_system_create, lab_system_revoke
from tests.conftest import new_case
from tests.test_webhooks import Receiver
from webhooks import crypto, services
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.tasks import webhook_deliver

pytestmark = pytest.mark.django_db

Status = WebhookDelivery.Status


@pytest.fixture(autouse=True)
def _settings(settings):
    """Receivers on http://127.0.0.1, as on premises; a configured key (DEBUG is off in tests)."""
    settings.WEBHOOK_ALLOW_HTTP = True
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True
    settings.FIELD_ENCRYPTION_KEY = Fernet.generate_key().decode()


@pytest.fixture
def receiver():
    started = []

    def start(statuses=(), on_post=None):
        started.append(Receiver(list(statuses), on_post))
        return started[-1]

    yield start
    for r in started:
        r.close()


@pytest.fixture
def lab(institution):
    lab_system, _ = lab_system_create(institution=institution, name="LIS")
    return lab_system


def _pending_delivery(lab, case, url: str) -> tuple[WebhookDelivery, str]:
    """A pending delivery whose task message was never sent (as when the broker lost it)."""
    endpoint, secret = services.endpoint_set(lab_system=lab, url=url)
    delivery = WebhookDelivery.objects.create(
        endpoint=endpoint, event=WebhookEndpoint.Event.CASE_READY, case=case, payload={"type": "case.ready_for_review"}
    )
    return delivery, secret


def _age(delivery: WebhookDelivery, seconds: float) -> None:
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=seconds),
        created_at=timezone.now() - timedelta(seconds=seconds),
    )


# The claim, the POST outside any transaction, the outcome.


@pytest.mark.django_db(transaction=True)
def test_no_transaction_is_open_and_no_row_locked_while_the_receiver_answers(lab, clinician, receiver):
    worker_connection = connection  # this thread's: the one webhook_deliver uses
    seen = {}

    def look_from_another_connection(headers, body):
        seen["worker_in_transaction"] = worker_connection.in_atomic_block
        try:
            # PostgreSQL: NOWAIT fails at once if the worker holds the row lock. SQLite: reading
            # fails ("table is locked") if the worker holds a write transaction open.
            with transaction.atomic():
                row = WebhookDelivery.objects.select_for_update(nowait=True).get(
                    event_id=headers["Cloudiopsy-Event-Id"]
                )
                seen["status"], seen["attempts"] = row.status, row.attempts
        except Exception as exc:
            seen["error"] = repr(exc)
        finally:
            connections.close_all()  # this server thread's own connections

    lis = receiver([200], on_post=look_from_another_connection)
    delivery, _ = _pending_delivery(lab, new_case(clinician), lis.url)

    assert services.webhook_deliver(delivery_id=delivery.pk) == Status.DELIVERED
    assert seen == {"worker_in_transaction": False, "status": Status.SENDING, "attempts": 1}
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (Status.DELIVERED, 1, 200)


def test_a_delivery_claimed_by_another_worker_is_not_sent(lab, clinician, receiver):
    lis = receiver([200])
    delivery, _ = _pending_delivery(lab, new_case(clinician), lis.url)
    WebhookDelivery.objects.filter(pk=delivery.pk).update(status=Status.SENDING, attempts=1, claimed_at=timezone.now())
    assert services.webhook_deliver(delivery_id=delivery.pk) == "skipped"
    assert lis.requests == []


class _Stalling(BaseHTTPRequestHandler):
    """Answers too slowly: says nothing (``silent``) or one header byte every 0.1 s (``trickle``)."""

    mode = "silent"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        try:
            if self.mode == "silent":
                time.sleep(4)
                return
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(40):  # each byte well within any per-read timeout, the whole far past the deadline
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client hung up, as it should

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("mode", "scheme"), [("silent", "http"), ("trickle", "http"), ("trickle", "https")])
def test_the_whole_attempt_ends_at_the_deadline(lab, clinician, settings, tmp_path, monkeypatch, mode, scheme):
    settings.WEBHOOK_DEADLINE_SECONDS = 1
    handler = type("Handler", (_Stalling,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if scheme == "https":
        ca, cert, key = _certificate_authority(tmp_path, "localhost")
        monkeypatch.setenv("SSL_CERT_FILE", ca)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"{scheme}://localhost:{server.server_port}/hook"
        delivery, _ = _pending_delivery(lab, new_case(clinician), url)
        started = time.monotonic()
        assert services.webhook_deliver(delivery_id=delivery.pk) == Status.PENDING
        took = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert 0.9 < took < 3.0  # the trickle alone lasts 4 s
    delivery.refresh_from_db()
    assert delivery.last_status_code is None and delivery.last_error.startswith("TimeoutError: no complete answer")
    assert "1 s deadline" in delivery.last_error
    assert 8 < (delivery.next_attempt_at - timezone.now()).total_seconds() <= 10  # first backoff


# HTTPS: certificate checked against the URL's name, connection to the address that was checked.


def _certificate_authority(tmp_path, name: str) -> tuple[str, str, str]:
    """A CA file, and a certificate + key signed by it for ``name``: paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test hospital CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tuple(str(p) for p in paths)


@pytest.mark.parametrize(
    ("certificate_name", "delivered"), [("localhost", True), ("lis.other-hospital.example", False)]
)
def test_https_receiver_is_verified_against_the_url_host(
    lab, clinician, receiver, tmp_path, monkeypatch, certificate_name, delivered
):
    ca, cert, key = _certificate_authority(tmp_path, certificate_name)
    monkeypatch.setenv("SSL_CERT_FILE", ca)  # the hospital's CA, as an operator would add it
    lis = receiver([200])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    lis.server.socket = context.wrap_socket(lis.server.socket, server_side=True)
    url = f"https://localhost:{lis.server.server_port}/hooks/cloudiopsy"
    delivery, secret = _pending_delivery(lab, new_case(clinician), url)

    services.webhook_deliver(delivery_id=delivery.pk)
    delivery.refresh_from_db()
    if delivered:
        assert delivery.status == Status.DELIVERED, delivery.last_error
        ((headers, body),) = lis.requests
        assert headers["Host"] == f"localhost:{lis.server.server_port}"
        assert services.verify(secret, headers["Cloudiopsy-Signature"], body)
    else:
        assert delivery.status == Status.PENDING and "CERTIFICATE_VERIFY_FAILED" in delivery.last_error
        assert lis.requests == []


# The sweep: what the broker lost is sent, once.


def test_sweep_sends_a_delivery_whose_message_was_lost_exactly_once(
    lab, clinician, receiver, settings, eager_celery, django_capture_on_commit_callbacks
):
    lis = receiver([200])
    delivery, _ = _pending_delivery(lab, new_case(clinician), lis.url)

    with django_capture_on_commit_callbacks(execute=True):
        assert services.webhook_sweep() == {"resent": 0, "released": 0, "failed": 0}  # not late yet
    assert lis.requests == []

    _age(delivery, settings.WEBHOOK_SWEEP_AFTER_SECONDS + 1)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.webhook_sweep()["resent"] == 1
    delivery.refresh_from_db()
    assert delivery.status == Status.DELIVERED and len(lis.requests) == 1

    _age(delivery, 10 * settings.WEBHOOK_SWEEP_AFTER_SECONDS)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.webhook_sweep()["resent"] == 0  # delivered: never sent again
        assert webhook_deliver.delay(delivery.pk).get() == "skipped"
    assert len(lis.requests) == 1


def test_sweep_waits_for_a_delivery_sent_recently(
    lab, clinician, receiver, settings, django_capture_on_commit_callbacks
):
    """Pushed to 'now' once enqueued, so the next sweeps do not pile up messages for it."""
    lis = receiver([200])
    delivery, _ = _pending_delivery(lab, new_case(clinician), lis.url)
    _age(delivery, settings.WEBHOOK_SWEEP_AFTER_SECONDS + 1)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.webhook_sweep()["resent"] == 1
        assert services.webhook_sweep()["resent"] == 0
    assert len(callbacks) == 1 and lis.requests == []


def test_failed_attempts_back_off_and_stop_at_the_last(lab, clinician, receiver, settings, eager_celery):
    lis = receiver([503] * 20)
    delivery, _ = _pending_delivery(lab, new_case(clinician), lis.url)
    for attempt in range(1, services.MAX_ATTEMPTS):
        assert services.webhook_deliver(delivery_id=delivery.pk) == Status.PENDING
        delivery.refresh_from_db()
        wait = (delivery.next_attempt_at - timezone.now()).total_seconds()
        assert services.backoff(attempt) - 2 < wait <= services.backoff(attempt) == 10 * 2 ** (attempt - 1)
        assert delivery.attempts == attempt and delivery.last_error == "try again"
    assert services.webhook_deliver(delivery_id=delivery.pk) == Status.FAILED
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (Status.FAILED, 8, 503)

    _age(delivery, 10 * settings.WEBHOOK_SWEEP_AFTER_SECONDS)
    assert services.webhook_sweep()["resent"] == 0
    assert len(lis.requests) == services.MAX_ATTEMPTS


def test_sweep_takes_back_an_attempt_whose_worker_died(
    lab, clinician, receiver, settings, eager_celery, django_capture_on_commit_callbacks
):
    lis = receiver([200])
    case = new_case(clinician)
    lost, _ = _pending_delivery(lab, case, lis.url)
    last = WebhookDelivery.objects.create(endpoint=lost.endpoint, event=lost.event, case=case, payload={})
    live = WebhookDelivery.objects.create(endpoint=lost.endpoint, event=lost.event, case=case, payload={})
    long_ago = timezone.now() - timedelta(seconds=settings.WEBHOOK_SWEEP_AFTER_SECONDS + 60)
    WebhookDelivery.objects.filter(pk=lost.pk).update(status=Status.SENDING, attempts=3, claimed_at=long_ago)
    WebhookDelivery.objects.filter(pk=last.pk).update(
        status=Status.SENDING, attempts=services.MAX_ATTEMPTS, claimed_at=long_ago
    )
    WebhookDelivery.objects.filter(pk=live.pk).update(status=Status.SENDING, attempts=1, claimed_at=timezone.now())

    with django_capture_on_commit_callbacks(execute=True):
        assert services.webhook_sweep() == {"resent": 1, "released": 1, "failed": 1}
    statuses = dict(WebhookDelivery.objects.values_list("pk", "status"))
    assert statuses == {lost.pk: Status.DELIVERED, last.pk: Status.FAILED, live.pk: Status.SENDING}
    lost.refresh_from_db()
    assert lost.attempts == 4 and len(lis.requests) == 1
    assert "lost" in WebhookDelivery.objects.get(pk=last.pk).last_error


# A broker that is down when the change commits.


def test_a_broker_down_at_commit_is_logged_and_the_deliveries_wait_for_the_sweep(
    institution,
    lab,
    clinician,
    receiver,
    settings,
    monkeypatch,
    caplog,
    eager_celery,
    django_capture_on_commit_callbacks,
):
    lis = receiver([200])
    services.endpoint_set(lab_system=lab, url=lis.url)
    other, _ = lab_system_create(institution=institution, name="Second LIS")
    services.endpoint_set(lab_system=other, url=lis.url)
    case = new_case(clinician)
    calls = []

    def broker_down(*args, **kwargs):
        calls.append(args)
        raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(webhook_deliver, "delay", broker_down)
    with caplog.at_level(logging.ERROR, logger="webhooks.tasks"):
        with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
            services.events_for_cases(case_ids=[case.pk], event=WebhookEndpoint.Event.CASE_READY)
    deliveries = list(WebhookDelivery.objects.order_by("pk"))
    assert [d.status for d in deliveries] == [Status.PENDING, Status.PENDING]
    assert len(calls) == 1  # the broker is down: the second one is not tried
    (record,) = caplog.records
    assert str([d.pk for d in deliveries]) in record.getMessage() and "sweep" in record.getMessage()
    assert record.exc_info and lis.requests == []

    monkeypatch.undo()  # the broker is back
    for delivery in deliveries:
        _age(delivery, settings.WEBHOOK_SWEEP_AFTER_SECONDS + 1)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.webhook_sweep()["resent"] == 2
    assert len(lis.requests) == 2


# Revoked or expired lab systems get nothing.


def test_an_expired_token_gets_no_event(lab, clinician, receiver, django_capture_on_commit_callbacks):
    lis = receiver([200])
    services.endpoint_set(lab_system=lab, url=lis.url)
    lab.expires_at = timezone.now() - timedelta(minutes=1)
    lab.save(update_fields=["expires_at"])
    services.events_for_cases(case_ids=[new_case(clinician).pk], event=WebhookEndpoint.Event.CASE_READY)
    assert not WebhookDelivery.objects.exists()


@pytest.mark.parametrize("change", ["revoke", "expire", "deactivate"])
def test_a_token_revoked_or_expired_after_the_event_gets_nothing(lab, clinician, receiver, change):
    lis = receiver([200])
    delivery, _ = _pending_delivery(lab, new_case(clinician), lis.url)
    if change == "revoke":
        lab_system_revoke(lab_system=lab)
    elif change == "expire":
        lab.expires_at = timezone.now() - timedelta(seconds=1)
        lab.save(update_fields=["expires_at"])
    else:
        WebhookEndpoint.objects.filter(pk=delivery.endpoint_id).update(active=False)

    assert services.webhook_deliver(delivery_id=delivery.pk) == Status.FAILED
    delivery.refresh_from_db()
    expected = {"revoke": "token was revoked", "expire": "token expired", "deactivate": "deactivated"}[change]
    assert delivery.attempts == 0 and delivery.last_error.startswith("not sent:") and expected in delivery.last_error
    assert lis.requests == []


def test_a_webhook_cannot_be_set_for_a_revoked_token(lab):
    lab_system_revoke(lab_system=lab)
    with pytest.raises(ValueError, match="revoked"):
        services.endpoint_set(lab_system=lab, url="http://127.0.0.1:9/hook")


# The signing secret, encrypted at rest.


def test_the_signing_secret_is_stored_only_encrypted(lab, clinician, receiver, settings):
    lis = receiver([200])
    delivery, secret = _pending_delivery(lab, new_case(clinician), lis.url)
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM webhooks_webhookendpoint")
        columns = [c[0] for c in cursor.description]
        (row,) = cursor.fetchall()
    assert "secret" not in columns and not any(secret in str(value) for value in row)
    stored = WebhookEndpoint.objects.get().secret_encrypted
    assert crypto.secret_decrypt(stored) == secret

    services.webhook_deliver(delivery_id=delivery.pk)  # signs with the decrypted secret
    ((headers, body),) = lis.requests
    assert services.verify(secret, headers["Cloudiopsy-Signature"], body)


def test_a_secret_unreadable_with_the_current_key_is_not_sent(lab, clinician, receiver, settings):
    lis = receiver([200])
    delivery, _ = _pending_delivery(lab, new_case(clinician), lis.url)
    settings.FIELD_ENCRYPTION_KEY = Fernet.generate_key().decode()  # the key was lost or changed
    assert services.webhook_deliver(delivery_id=delivery.pk) == Status.PENDING
    delivery.refresh_from_db()
    assert "cannot be decrypted" in delivery.last_error and lis.requests == []


def test_encryption_keys_rotate_and_are_required_off_debug(settings):
    old = settings.FIELD_ENCRYPTION_KEY
    token = crypto.secret_encrypt("whsec_x")
    new = Fernet.generate_key().decode()
    settings.FIELD_ENCRYPTION_KEY = f"{new}, {old}"  # the first encrypts, any decrypts
    assert crypto.secret_decrypt(token) == "whsec_x"
    assert Fernet(new.encode()).decrypt(crypto.secret_encrypt("whsec_y").encode()) == b"whsec_y"
    settings.FIELD_ENCRYPTION_KEY = new
    with pytest.raises(InvalidToken):
        crypto.secret_decrypt(token)

    settings.FIELD_ENCRYPTION_KEY = "not-a-key"
    with pytest.raises(ImproperlyConfigured, match="not a Fernet key"):
        crypto.secret_encrypt("whsec_x")
    settings.FIELD_ENCRYPTION_KEY = ""
    with pytest.raises(ImproperlyConfigured, match="FIELD_ENCRYPTION_KEY .* is required when DEBUG is off"):
        crypto.secret_encrypt("whsec_x")

    settings.DEBUG = True  # a development checkout: a key derived from SECRET_KEY
    token = crypto.secret_encrypt("whsec_x")
    assert crypto.secret_decrypt(token) == "whsec_x"
    settings.SECRET_KEY = "another-development-key"
    with pytest.raises(InvalidToken):
        crypto.secret_decrypt(token)


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_existing_plaintext_secrets(lab):
    from django.db.migrations.executor import MigrationExecutor

    before, latest = (
        ("webhooks", "0002_delivery_claim_and_encrypted_secret"),
        ("webhooks", "0004_remove_plaintext_secret"),
    )
    executor = MigrationExecutor(connection)
    executor.migrate([before])
    old_apps = executor.loader.project_state([before]).apps
    old_apps.get_model("webhooks", "WebhookEndpoint").objects.create(
        lab_system_id=lab.pk, url="https://lis.example/hook", secret="whsec_plain"
    )
    try:
        executor = MigrationExecutor(connection)
        executor.migrate([latest])
        stored = WebhookEndpoint.objects.get()
        assert crypto.secret_decrypt(stored.secret_encrypted) == "whsec_plain"
        with connection.cursor() as cursor:
            columns = [
                c.name for c in connection.introspection.get_table_description(cursor, "webhooks_webhookendpoint")
            ]
        assert "secret" not in columns

        executor = MigrationExecutor(connection)
        executor.migrate([before])  # and back: the plaintext column comes back filled
        old_apps = executor.loader.project_state([before]).apps
        assert old_apps.get_model("webhooks", "WebhookEndpoint").objects.get().secret == "whsec_plain"
    finally:
        MigrationExecutor(connection).migrate([latest])


# Its own queue.


def test_webhook_tasks_have_their_own_queue_and_a_plain_worker_consumes_every_queue():
    from cloudiopsy.celery import app

    def queue(task):
        return app.amqp.router.route({}, task)["queue"].name

    assert queue("webhooks.tasks.webhook_deliver") == queue("webhooks.tasks.webhook_sweep") == "webhooks"
    assert queue("inference.tasks.prediction_run") == "celery"
    # A worker started without -Q consumes app.amqp.queues: CELERY_TASK_QUEUES, both of them.
    assert set(app.amqp.queues) == {"celery", "webhooks"}
    assert app.conf.beat_schedule["sweep-webhook-deliveries"]["task"] == "webhooks.tasks.webhook_sweep"
    assert "webhooks.tasks.webhook_sweep" in app.tasks


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_started_without_q_delivers_from_the_webhooks_queue(lab, clinician, receiver, settings, tmp_path):
    from tests.integration.workers import Worker, flush_broker, queue_length, require_postgres_and_redis, wait_for

    broker = require_postgres_and_redis()
    flush_broker(broker)
    lis = receiver([200])
    delivery, secret = _pending_delivery(lab, new_case(clinician), lis.url)
    webhook_deliver.delay(delivery.pk)
    assert (queue_length(broker, "webhooks"), queue_length(broker, "celery")) == (1, 0)

    worker = Worker(
        "webhooks",
        broker,
        tmp_path,
        WEBHOOK_ALLOW_HTTP="true",
        WEBHOOK_ALLOW_PRIVATE_HOSTS="true",
        FIELD_ENCRYPTION_KEY=settings.FIELD_ENCRYPTION_KEY,
    )
    try:
        wait_for(lambda: lis.requests, timeout=90, what=f"the delivery (worker log:\n{worker.log_path})")
        wait_for(
            lambda: WebhookDelivery.objects.get(pk=delivery.pk).status == Status.DELIVERED, 10, "the outcome recorded"
        )
    finally:
        worker.stop()
        flush_broker(broker)
    ((headers, body),) = lis.requests
    assert services.verify(secret, headers["Cloudiopsy-Signature"], body)
    assert queue_length(broker, "webhooks") == 0


def test_set_lab_webhook_prints_a_secret_that_is_stored_encrypted(institution, lab):
    from django.core.management import call_command

    out = io.StringIO()
    call_command(
        "set_lab_webhook", institution=institution.slug, name="LIS", url="http://127.0.0.1:9/h", stdout=out,
        stderr=io.StringIO(),
    )  # fmt: skip
    secret = out.getvalue().strip().removeprefix("WEBHOOK_SECRET=")
    assert crypto.secret_decrypt(WebhookEndpoint.objects.get().secret_encrypted) == secret
