"""Prometheus metrics: what the processes measure, what the database and broker hold, and GET /metrics.

Two kinds of figures (names and meanings in docs/observability.md):

- Measured by the process that does the work, with prometheus-client: request latency
  (``MetricsMiddleware``), audit append latency (``audit.services._events_append``), Celery task
  counts and durations (signal handlers in ``cloudiopsy/celery.py``). Under gunicorn with several
  processes set ``PROMETHEUS_MULTIPROC_DIR``: each process writes its figures there and a scrape of
  any one of them adds up all of them (prometheus-client's multiprocess mode).
- Read at scrape time by ``PlatformCollector`` from the database and the broker, so that they are
  right whichever process serves the scrape: patches and cases by status, worker heartbeats, webhook
  deliveries by outcome, analysis latency over a recent window, queue depths.

``/metrics`` answers a bearer token (``METRICS_TOKEN``) or a signed-in superuser, nobody else.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import math
import os
import time
from collections.abc import Iterator

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F
from django.http import HttpResponse
from django.urls import Resolver404, resolve
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger(__name__)

# Latencies from a few milliseconds (a page) to a minute (a large upload).
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUEST_SECONDS = Histogram(
    "cloudiopsy_http_request_duration_seconds",
    "Time to answer an HTTP request, by view (URL name, never the path with its ids), method and status class.",
    ["view", "method", "status"],
    buckets=_REQUEST_BUCKETS,
)
AUDIT_APPEND_SECONDS = Histogram(
    "cloudiopsy_audit_append_duration_seconds",
    "Time to append audit events to their chains (waiting for the chain's lock included), per append call.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
TASKS = Counter(
    "cloudiopsy_celery_tasks",
    "Celery tasks run, by task name and outcome (success, failure, retry, ...).",
    ["task", "outcome"],
)
TASK_SECONDS = Histogram(
    "cloudiopsy_celery_task_duration_seconds",
    "Time a Celery task ran, by task name.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)

# Analysis latency quantiles over the window; the latest results at most (the query's bound).
_LATENCY_QUANTILES = (0.5, 0.9, 0.99, 1.0)
_LATENCY_MAX_RESULTS = 10_000
# A heartbeat row older than this is a worker that is gone for good; it stops being reported.
_HEARTBEAT_FORGET_AFTER = datetime.timedelta(days=1)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def process_registry():
    """What this process measured: in multiprocess mode the sum over every process writing to
    ``PROMETHEUS_MULTIPROC_DIR``, else this process's own registry."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return REGISTRY


# Request latency ---------------------------------------------------------------------------------


def view_label(request) -> str:
    """The URL pattern's name (``api:case-detail``), else its route, else ``<unresolved>``: a label
    with few values, never a path with ids in it."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        # Answered before URL resolution (a redirect to the second factor, a 413, an SSL redirect).
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return "<unresolved>"
    return match.view_name or match.route or "<unresolved>"


class MetricsMiddleware:
    """Observes each request's duration in ``cloudiopsy_http_request_duration_seconds``. Near the
    top of ``MIDDLEWARE``: the time spent in the other middleware counts."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        response = self.get_response(request)
        method = request.method if request.method in _METHODS else "OTHER"
        HTTP_REQUEST_SECONDS.labels(view_label(request), method, f"{response.status_code // 100}xx").observe(
            time.perf_counter() - started
        )
        return response


# Celery tasks (called by the signal handlers in cloudiopsy/celery.py) -----------------------------

_task_started: dict[str, float] = {}


def task_started(task_id: str) -> None:
    _task_started[task_id] = time.perf_counter()


def task_finished(task_id: str, task_name: str, state: str | None) -> None:
    started = _task_started.pop(task_id, None)
    TASKS.labels(task_name, (state or "unknown").lower()).inc()
    if started is not None:
        TASK_SECONDS.labels(task_name).observe(time.perf_counter() - started)


# Figures read at scrape time ---------------------------------------------------------------------


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a non-empty sorted list."""
    rank = math.ceil(q * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(rank, 1)) - 1]


class PlatformCollector:
    """The platform's state, asked of the database (one query per figure, whatever the number of
    rows) and of the broker at each scrape. A database or broker that does not answer gives
    ``cloudiopsy_database_up 0`` or ``cloudiopsy_broker_up 0``, never a failed scrape."""

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self._database())
        except Exception:
            logger.exception("metrics: the database did not answer")
            families = []
        yield GaugeMetricFamily(
            "cloudiopsy_database_up", "1 when the database answered this scrape.", int(bool(families))
        )
        yield from families
        yield from self._broker()

    def _database(self) -> Iterator[Metric]:
        from cases.models import BiopsyCase, TissuePatch
        from inference.models import Prediction, WorkerHeartbeat
        from slides.models import Slide, SlideChunk
        from webhooks.models import WebhookDelivery

        yield self._by_status(
            "cloudiopsy_patches", "Tissue patches by analysis status.", TissuePatch.objects, TissuePatch.Status
        )
        yield self._by_status("cloudiopsy_cases", "Biopsy cases by status.", BiopsyCase.objects, BiopsyCase.Status)
        yield self._by_status("cloudiopsy_slides", "Whole-slide images by analysis stage.", Slide.objects, Slide.Status)
        yield self._by_status(
            "cloudiopsy_slide_chunks",
            "Chunks of slide tiles by status (queued ones wait for a worker).",
            SlideChunk.objects,
            SlideChunk.Status,
        )
        yield self._by_status(
            "cloudiopsy_webhook_deliveries",
            "Webhook deliveries by outcome (pending, sending, delivered, failed).",
            WebhookDelivery.objects,
            WebhookDelivery.Status,
        )

        now = timezone.now()
        ages = GaugeMetricFamily(
            "cloudiopsy_worker_heartbeat_age_seconds",
            "Seconds since each Celery worker's last heartbeat (workers seen in the last day).",
            labels=["worker"],
        )
        beats = WorkerHeartbeat.objects.filter(last_seen__gte=now - _HEARTBEAT_FORGET_AFTER).values_list(
            "hostname", "last_seen"
        )
        for hostname, last_seen in beats:
            ages.add_metric([hostname], max(0.0, (now - last_seen).total_seconds()))
        yield ages

        window = settings.METRICS_ANALYSIS_WINDOW_SECONDS
        latencies = sorted(
            latency.total_seconds()
            for latency in Prediction.objects.filter(created_at__gte=now - datetime.timedelta(seconds=window))
            .annotate(latency=ExpressionWrapper(F("created_at") - F("patch__created_at"), output_field=DurationField()))
            .order_by("-created_at")
            .values_list("latency", flat=True)[:_LATENCY_MAX_RESULTS]
        )
        quantiles = GaugeMetricFamily(
            "cloudiopsy_analysis_latency_seconds",
            f"Upload to AI result, over the results of the last {window} s (at most the latest "
            f"{_LATENCY_MAX_RESULTS}): quantile 0.5, 0.9, 0.99 and 1 (the longest). Absent when there were none.",
            labels=["quantile"],
        )
        if latencies:
            for q in _LATENCY_QUANTILES:
                quantiles.add_metric([str(q)], _quantile(latencies, q))
        yield quantiles
        yield GaugeMetricFamily(
            "cloudiopsy_analysis_results_in_window",
            f"AI results stored in the last {window} s (METRICS_ANALYSIS_WINDOW_SECONDS), "
            f"at most {_LATENCY_MAX_RESULTS}.",
            len(latencies),
        )

    @staticmethod
    def _by_status(name: str, documentation: str, queryset, statuses) -> GaugeMetricFamily:
        counts = dict.fromkeys(statuses.values, 0)
        for row in queryset.order_by().values("status").annotate(n=Count("id")):
            counts[row["status"]] = row["n"]
        family = GaugeMetricFamily(name, documentation, labels=["status"])
        for status, n in counts.items():
            family.add_metric([status], n)
        return family

    def _broker(self) -> Iterator[Metric]:
        from cloudiopsy.celery import broker_queue_depths

        try:
            depths = broker_queue_depths(url=settings.CELERY_BROKER_URL)
        except Exception as exc:
            logger.warning("metrics: the broker did not answer: %s", type(exc).__name__)
            depths = None
        yield GaugeMetricFamily(
            "cloudiopsy_broker_up", "1 when the Celery broker answered this scrape.", int(depths is not None)
        )
        family = GaugeMetricFamily(
            "cloudiopsy_queue_messages",
            "Messages waiting in each Celery queue (not yet taken by a worker).",
            labels=["queue"],
        )
        for queue, n in (depths or {}).items():
            family.add_metric([queue], n)
        yield family


class _Scrape:
    """What one scrape shows: the processes' figures and the platform's."""

    def __init__(self):
        self.sources = [process_registry(), PlatformCollector()]

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


# GET /metrics ------------------------------------------------------------------------------------


def _bearer_token(request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _refusal(request) -> HttpResponse | None:
    """None when the caller may read the metrics, else the 401 or 403 to answer."""
    configured = settings.METRICS_TOKEN
    offered = _bearer_token(request)
    if configured and offered is not None and hmac.compare_digest(offered.encode(), configured.encode()):
        return None
    user = getattr(request, "user", None)
    if offered is None and user is not None and user.is_authenticated and user.is_superuser:
        return None  # SecondFactorMiddleware has seen to the superuser's second factor
    if not configured:
        return HttpResponse(
            "Metrics are for a signed-in superuser, or for a scraper once METRICS_TOKEN is set.\n",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    response = HttpResponse(
        "Send the metrics token: Authorization: Bearer <METRICS_TOKEN>.\n"
        if offered is None
        else "The metrics token is not right.\n",
        status=401,
        content_type="text/plain; charset=utf-8",
    )
    response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@never_cache
@require_GET
def metrics_view(request):
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(generate_latest(_Scrape()), content_type=CONTENT_TYPE_LATEST)
