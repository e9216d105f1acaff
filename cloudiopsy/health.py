"""GET /healthz: is every part needed to analyse a patch up? 200 when yes, 503 when not."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET


def _database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"ok": True, "engine": connection.vendor}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}


def _broker() -> dict:
    from cloudiopsy.celery import app

    url = settings.CELERY_BROKER_URL
    transport = url.split("://", 1)[0]
    try:
        with app.connection_for_write(url) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return {"ok": True, "transport": transport}
    except Exception as exc:
        return {"ok": False, "transport": transport, "error": type(exc).__name__}


def _worker() -> dict:
    from inference.models import WorkerHeartbeat

    window = timedelta(seconds=3 * settings.WORKER_HEARTBEAT_SECONDS)
    try:
        alive = WorkerHeartbeat.objects.filter(last_seen__gte=timezone.now() - window).count()
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": alive > 0, "workers": alive}


def _model() -> dict:
    from inference.models import ModelVersion

    try:
        version = ModelVersion.objects.filter(is_active=True).first()
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}
    if version is None:
        return {"ok": False, "error": "no active model version"}
    present = (version.directory / "model.keras").is_file()
    result = {"ok": present, "version": str(version), "classes": version.classes}
    if not present:
        result["error"] = "model file missing"
    return result


@never_cache
@require_GET
def healthz(request):
    checks = {"database": _database(), "broker": _broker(), "worker": _worker(), "model": _model()}
    healthy = all(check["ok"] for check in checks.values())
    return JsonResponse({"status": "ok" if healthy else "unavailable", **checks}, status=200 if healthy else 503)
