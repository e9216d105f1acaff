"""Django settings, read once from environment variables.

Every variable is documented in README.md. Safe local defaults: SQLite and an embedded
(filesystem) Celery broker under ``DATA_DIR``; real services come from ``DATABASE_URL`` and
``CELERY_BROKER_URL``.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    """A string from ``NAME``, or from the file named by ``NAME_FILE`` (for secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        return Path(file_name).read_text().strip()
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, not {value!r}") from None


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) is required when DEBUG is off")
    SECRET_KEY = "insecure-local-development-key-do-not-use-in-production"  # noqa: S105 - DEBUG only

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# Where local state lives: the SQLite database, uploaded images, the embedded broker's queue.
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var"))).resolve()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "accounts",
    "cases",
    "inference",
    "webhooks",
    "audit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "cloudiopsy.middleware.NoStoreMiddleware",
]

ROOT_URLCONF = "cloudiopsy.urls"
WSGI_APPLICATION = "cloudiopsy.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "inference.context_processors.drift_alert",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60))}
else:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "cloudiopsy.sqlite3",
            # The web server and the worker write concurrently: WAL lets readers go on while a
            # writer works, IMMEDIATE takes the write lock up front instead of failing mid-way.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
        }
    }

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "cases:list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-gb"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(DATA_DIR / "static")))
# Uploaded patches are patient data: never under STATIC_ROOT and never served by a public URL;
# views stream them to users of the owning institution only.
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(DATA_DIR / "media"))).resolve()
if MEDIA_ROOT == STATIC_ROOT.resolve() or STATIC_ROOT.resolve() in MEDIA_ROOT.parents:
    raise ImproperlyConfigured("MEDIA_ROOT must not be inside STATIC_ROOT")
MEDIA_URL = "/media-not-served/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Uploads: checked in memory before anything is stored.
UPLOAD_MAX_BYTES = env_int("UPLOAD_MAX_BYTES", 20 * 1024 * 1024)
UPLOAD_MAX_PIXELS = env_int("UPLOAD_MAX_PIXELS", 25_000_000)
UPLOAD_MIN_SIDE = env_int("UPLOAD_MIN_SIDE", 64)
UPLOAD_MAX_FILES = env_int("UPLOAD_MAX_FILES", 100)
DATA_UPLOAD_MAX_NUMBER_FILES = UPLOAD_MAX_FILES
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# Analysis.
INFERENCE_BATCH_SIZE = env_int("INFERENCE_BATCH_SIZE", 32)
# A patch queued or running for longer than this is re-enqueued by the reconciler; it must be
# longer than the task's hard time limit so that a live task is never taken for a lost one.
ANALYSIS_STALE_AFTER_SECONDS = env_int("ANALYSIS_STALE_AFTER_SECONDS", 600)
RECONCILE_INTERVAL_SECONDS = env_int("RECONCILE_INTERVAL_SECONDS", 60)
WORKER_HEARTBEAT_SECONDS = env_int("WORKER_HEARTBEAT_SECONDS", 10)

# Trust at each site. A model version's results count as validated at an institution only after a
# passing `validate_site` there: at least this many patches of each class, tumour sensitivity at or
# above the target. Off DEBUG, activating a version not validated at every institution needs --force.
SITE_VALIDATION_MIN_PER_CLASS = env_int("SITE_VALIDATION_MIN_PER_CLASS", 100)
SITE_TARGET_SENSITIVITY = float(env_str("SITE_TARGET_SENSITIVITY", "0.98"))
REQUIRE_SITE_VALIDATION = env_bool("REQUIRE_SITE_VALIDATION", not DEBUG)
# A POST's Idempotency-Key and its first response are kept this long, then purged (hourly).
IDEMPOTENCY_TTL_HOURS = env_int("IDEMPOTENCY_TTL_HOURS", 24)

# Webhooks go to https URLs on public addresses only, checked when set and before every send;
# on-premise receivers need these switched on explicitly.
WEBHOOK_ALLOW_HTTP = env_bool("WEBHOOK_ALLOW_HTTP", False)
WEBHOOK_ALLOW_PRIVATE_HOSTS = env_bool("WEBHOOK_ALLOW_PRIVATE_HOSTS", False)

# Drift monitoring: a week's figure over fewer patches than this is shown but not judged.
DRIFT_MIN_PATCHES = env_int("DRIFT_MIN_PATCHES", 20)

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
BROKER_DIR = DATA_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR),
        "data_folder_out": str(BROKER_DIR),
        # Fan-out (remote control) files: under DATA_DIR too, not in the working directory.
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
else:
    # Redis redelivers an unacknowledged message after this; the reconciler usually acts first.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 2 * ANALYSIS_STALE_AFTER_SECONDS}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_IGNORE_RESULT = True
# Reruns are harmless (atomic claim + unique prediction), so a task is acknowledged only when
# done and redelivered if its worker dies.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 240)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 300)
if CELERY_TASK_TIME_LIMIT >= ANALYSIS_STALE_AFTER_SECONDS:
    raise ImproperlyConfigured("ANALYSIS_STALE_AFTER_SECONDS must exceed CELERY_TASK_TIME_LIMIT")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE = {
    "reconcile-analysis": {
        "task": "inference.tasks.analysis_reconcile",
        "schedule": float(RECONCILE_INTERVAL_SECONDS),
    },
    "purge-idempotency-keys": {"task": "accounts.tasks.idempotency_purge", "schedule": 3600.0},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.LabSystemTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["accounts.permissions.IsInstitutionMember", "accounts.permissions.HasScope"],
    "DEFAULT_THROTTLE_CLASSES": ["cloudiopsy.api.LabSystemRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"lab_system": env_str("LAB_RATE_LIMIT", "600/min")},
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "cloudiopsy.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Cloudiopsy API",
    "DESCRIPTION": (
        "REST API for laboratory information systems: create biopsy cases, upload H&E patches, read AI "
        "results. Authenticate with `Authorization: Token <key>` (a lab-system token with scopes). "
        "Errors are problem-details JSON. POSTs accept an `Idempotency-Key` header: a retry with the "
        "same key and request returns the first response without repeating the work."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "SWAGGER_UI_DIST": "SIDECAR",  # served from our static files: no CDN
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "CaseStatusEnum": "cases.models.BiopsyCase.Status",
        "PatchStatusEnum": "cases.models.TissuePatch.Status",
    },
}

# The rate limiter counts in the cache: per process by default; set REDIS_CACHE_URL so that all
# web processes share one count.
if env_str("REDIS_CACHE_URL"):
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": env_str("REDIS_CACHE_URL")}
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600)
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
