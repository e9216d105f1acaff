"""gunicorn configuration for the Cloudiopsy web processes (``gunicorn -c deploy/gunicorn.conf.py cloudiopsy.wsgi``).

Every value can be changed by an environment variable; see docs/deployment.md. The web processes are
stateless: run as many hosts as needed behind the TLS-terminating reverse proxy.
"""

from __future__ import annotations

import os


def _cpus() -> int:
    """CPUs this process may run on (a container's or a cgroup-pinned service's, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"gunicorn.conf.py: {name} must be an integer, not {value!r}") from None


# Where to listen: the reverse proxy's upstream. PORT is what platforms such as a Procfile runner set.
bind = [os.environ.get("GUNICORN_BIND") or f"127.0.0.1:{os.environ.get('PORT', '8000')}"]

# Synchronous workers: requests are short (uploads are buffered by the proxy, then validated on CPU).
# The usual 2 x CPUs + 1, at most 12; WEB_CONCURRENCY overrides.
workers = _int("WEB_CONCURRENCY", min(2 * _cpus() + 1, 12))
worker_class = "sync"

# A request that takes longer than this (a 100-file upload is validated in seconds) is killed and
# logged; graceful_timeout is how long a stopping worker may finish the requests it has.
timeout = _int("GUNICORN_TIMEOUT", 120)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _int("GUNICORN_KEEPALIVE", 5)

# Recycle each worker after about this many requests, against slow leaks; jitter keeps them from
# restarting together.
max_requests = _int("GUNICORN_MAX_REQUESTS", 2000)
max_requests_jitter = max(1, max_requests // 10) if max_requests else 0

# Worker heartbeats in memory, not on a disk that may stall (containers often lack a fast /tmp).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 - gunicorn's own advice

# Request lines and headers stay small; upload bodies are limited by the application
# (UPLOAD_MAX_REQUEST_BYTES) and should also be by the proxy.
limit_request_line = 4094
limit_request_fields = 100

# Access log to stdout (journald or the container's log). The path only, never the query string or
# the referrer: those can carry search terms, and search terms can be patient names or numbers.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# X-Forwarded-For/-Proto are only believed from these addresses (the proxy's). Django decides what
# to trust itself (BEHIND_TLS_PROXY, TRUSTED_PROXY_HEADER); this is gunicorn's own view, for its log.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

proc_name = "cloudiopsy-web"
