"""Django settings, read once from environment variables.

Every variable is documented in README.md. Safe local defaults: SQLite and an embedded
(filesystem) Celery broker under ``DATA_DIR``; real services come from ``DATABASE_URL`` and
``CELERY_BROKER_URL``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from pathlib import Path

import dj_database_url
from csp.constants import NONCE, NONE, SELF, UNSAFE_INLINE
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    """A string from ``NAME``, or from the file named by ``NAME_FILE`` (for secrets: a mounted secret,
    systemd's ``LoadCredential``), its trailing newline stripped. Both set, or a file that cannot be
    read or is empty, is an error: a secret must never silently fall back to a default."""
    file_name = os.environ.get(f"{name}_FILE")
    if not file_name:
        return os.environ.get(name, default)
    if os.environ.get(name):
        raise ImproperlyConfigured(f"both {name} and {name}_FILE are set: set only one of them")
    try:
        value = Path(file_name).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ImproperlyConfigured(f"{name}_FILE names {file_name}, which cannot be read: {reason}") from None
    if not value:
        raise ImproperlyConfigured(f"{name}_FILE names {file_name}, which is empty")
    return value


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


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}") from None


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
    "axes",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "csp",
    "mozilla_django_oidc",
    "accounts",
    "cases",
    "inference",
    "webhooks",
    "audit",
    "backups",
    "dashboards",
    "slides",
]

MIDDLEWARE = [
    # First: every line logged while a request is handled carries its id; every answer is timed.
    "cloudiopsy.logging.RequestIdMiddleware",
    "cloudiopsy.metrics.MetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files straight after the security headers, before sessions and the database.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "cloudiopsy.middleware.RequestSizeLimitMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "accounts.middleware.IdleTimeoutMiddleware",
    "accounts.middleware.SecondFactorMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "cloudiopsy.middleware.NoStoreMiddleware",
    "cloudiopsy.middleware.DatabaseUnavailableMiddleware",
    # Last, as django-axes asks: it turns a lockout raised during login into the lockout page.
    "axes.middleware.AxesMiddleware",
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
                "accounts.context_processors.session",
                "accounts.context_processors.oidc",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60))}
else:
    if not DEBUG:
        # SQLite is the local demo's database: one machine, no append-only audit protection against
        # whoever can write the file, no concurrent writers at a hospital's scale.
        raise ImproperlyConfigured(
            "DEBUG is off (production) but DATABASE_URL is not set: production runs on PostgreSQL "
            "(DATABASE_URL=postgres://...). SQLite is for the local demo only (DEBUG=true)."
        )
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
# django-axes first: it refuses a locked-out user or address before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

# Login throttling and lockout (django-axes), per user name and, separately, per client address:
# after LOGIN_FAILURE_LIMIT wrong passwords in a row the next attempt locks for LOGIN_LOCKOUT_MINUTES.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10)
LOGIN_LOCKOUT_MINUTES = env_int("LOGIN_LOCKOUT_MINUTES", 30)
AXES_ENABLED = True
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT + 1
AXES_COOLOFF_TIME = datetime.timedelta(minutes=LOGIN_LOCKOUT_MINUTES)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "accounts.views.lockout_response"
AXES_CLIENT_IP_CALLABLE = "audit.services.client_address"
AXES_USERNAME_FORM_FIELD = "username"
AXES_VERBOSE = False

# Second factor (TOTP, django-otp): required of these roles (and of every superuser) before any page;
# users enrol with a QR code and get single-use recovery codes.
MFA_REQUIRED_ROLES = env_list("MFA_REQUIRED_ROLES", "pathologist,admin,lab_manager")
MFA_ISSUER = env_str("MFA_ISSUER", "Cloudiopsy")
OTP_TOTP_ISSUER = MFA_ISSUER
MFA_RECOVERY_CODES = 10

# Sign-in through the hospital's identity provider (OpenID Connect, mozilla-django-oidc); off unless
# OIDC_ENABLED. Roles and institution come from claims; see README.md.
OIDC_ENABLED = env_bool("OIDC_ENABLED", False)
OIDC_RP_CLIENT_ID = env_str("OIDC_RP_CLIENT_ID")
OIDC_RP_CLIENT_SECRET = env_str("OIDC_RP_CLIENT_SECRET")
OIDC_RP_SIGN_ALGO = env_str("OIDC_RP_SIGN_ALGO", "RS256")
OIDC_OP_AUTHORIZATION_ENDPOINT = env_str("OIDC_OP_AUTHORIZATION_ENDPOINT")
OIDC_OP_TOKEN_ENDPOINT = env_str("OIDC_OP_TOKEN_ENDPOINT")
OIDC_OP_USER_ENDPOINT = env_str("OIDC_OP_USER_ENDPOINT")
OIDC_OP_JWKS_ENDPOINT = env_str("OIDC_OP_JWKS_ENDPOINT")
OIDC_OP_LOGOUT_ENDPOINT = env_str("OIDC_OP_LOGOUT_ENDPOINT")
OIDC_RP_SCOPES = env_str("OIDC_RP_SCOPES", "openid email profile")
OIDC_ROLE_CLAIM = env_str("OIDC_ROLE_CLAIM", "cloudiopsy_role")
OIDC_INSTITUTION_CLAIM = env_str("OIDC_INSTITUTION_CLAIM", "cloudiopsy_institution")
# The hospital's provider already asks for a second factor (its `amr` claim says so): no TOTP here.
OIDC_TRUST_IDP_MFA = env_bool("OIDC_TRUST_IDP_MFA", True)
if OIDC_ENABLED:
    AUTHENTICATION_BACKENDS.append("accounts.oidc.HospitalOIDCBackend")

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"  # the case list, or a lab manager's dashboards
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

# Static files are served by the web processes themselves (WhiteNoise): off DEBUG, compressed and
# under content-hashed names that browsers keep for a year; `collectstatic` writes them (scripts/serve.py
# runs it). Under DEBUG they are found in the apps, unhashed, as they change.
# Stored images (patient data) go to the filesystem under MEDIA_ROOT, or with STORAGE_BACKEND=s3 to a
# private bucket of an S3-compatible object store shared by every web and worker host. Code reads and
# writes them only through django.core.files.storage.default_storage, never by path.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
# Fixed here, not left to WhiteNoise: the test runner turns DEBUG off after the settings are read.
WHITENOISE_AUTOREFRESH = WHITENOISE_USE_FINDERS = DEBUG
STORAGE_BACKEND = env_str("STORAGE_BACKEND", "filesystem")
if STORAGE_BACKEND == "s3":
    AWS_STORAGE_BUCKET_NAME = env_str("AWS_STORAGE_BUCKET_NAME")
    if not AWS_STORAGE_BUCKET_NAME:
        raise ImproperlyConfigured("STORAGE_BACKEND=s3 needs AWS_STORAGE_BUCKET_NAME (the bucket for stored images)")
    _s3_options = {
        "bucket_name": AWS_STORAGE_BUCKET_NAME,
        "endpoint_url": env_str("AWS_S3_ENDPOINT_URL"),  # e.g. https://minio.hospital.internal:9000
        "region_name": env_str("AWS_S3_REGION_NAME"),
        "addressing_style": env_str("AWS_S3_ADDRESSING_STYLE"),  # "path" for most on-premise stores
        "location": env_str("AWS_LOCATION"),  # a key prefix inside the bucket
        # Unset: boto3's own chain (instance role, ~/.aws, AWS_* variables).
        "access_key": env_str("AWS_ACCESS_KEY_ID"),
        "secret_key": env_str("AWS_SECRET_ACCESS_KEY"),
    }
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            **{key: value for key, value in _s3_options.items() if value},
            "default_acl": "private",
            # Images reach users only through the platform's views, after its permission checks: an
            # object URL is never handed out, and if one were it would carry no signature to use.
            "querystring_auth": False,
            "file_overwrite": False,
        },
    }
elif STORAGE_BACKEND != "filesystem":
    raise ImproperlyConfigured(f"STORAGE_BACKEND must be filesystem or s3, not {STORAGE_BACKEND!r}")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Uploads: checked in memory before anything is stored.
UPLOAD_MAX_BYTES = env_int("UPLOAD_MAX_BYTES", 20 * 1024 * 1024)
UPLOAD_MAX_PIXELS = env_int("UPLOAD_MAX_PIXELS", 25_000_000)
UPLOAD_MIN_SIDE = env_int("UPLOAD_MIN_SIDE", 64)
UPLOAD_MAX_FILES = env_int("UPLOAD_MAX_FILES", 100)
DATA_UPLOAD_MAX_NUMBER_FILES = UPLOAD_MAX_FILES
# A request body over this is refused (413) from its declared length, before it is read.
UPLOAD_MAX_REQUEST_BYTES = env_int("UPLOAD_MAX_REQUEST_BYTES", 256 * 1024 * 1024)
# Uploaded files above this go to a temporary file while the request is parsed, not to memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# Analysis.
INFERENCE_BATCH_SIZE = env_int("INFERENCE_BATCH_SIZE", 32)
# Threads each worker process gives the model (0: one per core). With several worker processes on
# one machine, 1 keeps them from competing for the same cores.
INFERENCE_THREADS = env_int("INFERENCE_THREADS", 0)
# A worker fills each batch with other waiting patches (urgent cases first) when its message
# brought fewer than INFERENCE_BATCH_SIZE: full batches under a stream of single-patch uploads.
ANALYSIS_COALESCE = env_bool("ANALYSIS_COALESCE", True)
# A worker process stores a batch's results on a thread of its own while it analyses the next one
# (inference/writer.py); at most ANALYSIS_WRITE_BEHIND_DEPTH batches wait to be stored. Off by
# default: on 2 cores it drained a backlog up to a quarter faster but, with each worker then using
# more than one core, two workers scaled worse and the latency tail under load grew (README).
ANALYSIS_WRITE_BEHIND = env_bool("ANALYSIS_WRITE_BEHIND", False)
ANALYSIS_WRITE_BEHIND_DEPTH = env_int("ANALYSIS_WRITE_BEHIND_DEPTH", 1)
# A patch queued or running for longer than this is re-enqueued by the reconciler; it must be
# longer than the task's hard time limit so that a live task is never taken for a lost one.
ANALYSIS_STALE_AFTER_SECONDS = env_int("ANALYSIS_STALE_AFTER_SECONDS", 600)
# A patch queued longer than this while the broker holds no analysis message lost its message (a
# broker flushed or restarted without persistence): the reconciler sends it again. With the
# reconciler every RECONCILE_INTERVAL_SECONDS, analysis resumes within about their sum.
ANALYSIS_REQUEUE_AFTER_SECONDS = env_int("ANALYSIS_REQUEUE_AFTER_SECONDS", 45)
RECONCILE_INTERVAL_SECONDS = env_int("RECONCILE_INTERVAL_SECONDS", 30)
WORKER_HEARTBEAT_SECONDS = env_int("WORKER_HEARTBEAT_SECONDS", 10)
# A worker silent this long (or restarted since it claimed them) lost the patches it was analysing:
# the reconciler hands them on without waiting for ANALYSIS_STALE_AFTER_SECONDS.
WORKER_LOST_AFTER_SECONDS = env_int("WORKER_LOST_AFTER_SECONDS", 3 * WORKER_HEARTBEAT_SECONDS)

# Whole-slide images (slides/). A slide arrives in pieces of at most SLIDE_UPLOAD_PIECE_BYTES into
# SLIDE_UPLOAD_DIR (on a disk the web processes share, with room for the largest slide), is opened
# by OpenSlide and checked without reading its pixels, then moved to storage as uploaded.
SLIDE_MAX_BYTES = env_int("SLIDE_MAX_BYTES", 8 * 1024**3)
SLIDE_MAX_PIXELS = env_int("SLIDE_MAX_PIXELS", 25_000_000_000)
SLIDE_UPLOAD_PIECE_BYTES = env_int("SLIDE_UPLOAD_PIECE_BYTES", 32 * 1024 * 1024)
SLIDE_UPLOAD_DIR = Path(env_str("SLIDE_UPLOAD_DIR", str(DATA_DIR / "slide-uploads"))).resolve()
# An upload with no new piece for this long is abandoned and its partial file removed.
SLIDE_UPLOAD_EXPIRE_HOURS = env_int("SLIDE_UPLOAD_EXPIRE_HOURS", 48)
# Workers whose storage has no local path (S3) keep a copy of each slide they read here.
SLIDE_CACHE_DIR = Path(env_str("SLIDE_CACHE_DIR", str(DATA_DIR / "slide-cache"))).resolve()
SLIDE_CACHE_MAX_BYTES = env_int("SLIDE_CACHE_MAX_BYTES", 50 * 1024**3)
# A scanner's share to take slides from (slides/imports.py): <institution>/<accession>/<file>, taken
# once unchanged for SLIDE_IMPORT_SETTLE_SECONDS. Unset: no import folder.
SLIDE_IMPORT_DIR = env_str("SLIDE_IMPORT_DIR", "")
SLIDE_IMPORT_SETTLE_SECONDS = env_int("SLIDE_IMPORT_SETTLE_SECONDS", 60)
# Tissue tiles per worker task, and the most suspicious tiles that become patches for review.
SLIDE_CHUNK_TILES = env_int("SLIDE_CHUNK_TILES", 256)
SLIDE_REGIONS = env_int("SLIDE_REGIONS", 12)
# A grid tile is analysed when at least this share of it is tissue.
SLIDE_MIN_TISSUE = env_float("SLIDE_MIN_TISSUE", 0.25)

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
# One delivery attempt (connect, send, read the answer) never takes longer than this.
WEBHOOK_DEADLINE_SECONDS = env_int("WEBHOOK_DEADLINE_SECONDS", 10)
# A delivery still pending this long after it was due is re-sent by the beat sweep.
WEBHOOK_SWEEP_AFTER_SECONDS = env_int("WEBHOOK_SWEEP_AFTER_SECONDS", 120)

# Secrets stored in the database (webhook signing secrets) are encrypted with this key (Fernet,
# 32 url-safe base64 bytes: `python -c "from cryptography.fernet import Fernet as F; print(F.generate_key())"`).
# Kept outside the database: FIELD_ENCRYPTION_KEY_FILE; several, comma-separated, rotate it (the
# first encrypts). Required off DEBUG; under DEBUG a key derived from SECRET_KEY is used.
FIELD_ENCRYPTION_KEY = env_str("FIELD_ENCRYPTION_KEY")
if not FIELD_ENCRYPTION_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEY (or FIELD_ENCRYPTION_KEY_FILE) is required when DEBUG is off")
    _derived = hashlib.sha256(b"cloudiopsy field encryption v1:" + SECRET_KEY.encode()).digest()
    FIELD_ENCRYPTION_KEY = base64.urlsafe_b64encode(_derived).decode()

# The audit chain is keyed (HMAC-SHA256) with a key kept outside the database, so that whoever can
# write the audit table cannot rewrite the chain. Required off DEBUG: AUDIT_HMAC_KEY_FILE.
AUDIT_HMAC_KEY = env_str("AUDIT_HMAC_KEY")
if not AUDIT_HMAC_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("AUDIT_HMAC_KEY (or AUDIT_HMAC_KEY_FILE) is required when DEBUG is off")
    AUDIT_HMAC_KEY = "insecure-local-development-audit-key"

# Hourly, each audit chain's last event (id, hash, count) is logged as "AUDIT_ANCHOR {...}" and,
# when set, written to this folder: keep it (or ship the log) off the database server so that
# `verify_audit --anchor` can tell if events were cut from the end of a chain.
AUDIT_ANCHOR_DIR = env_str("AUDIT_ANCHOR_DIR")

# Backups (`manage.py backup` / `restore`, docs/backup.md): the folder holding pg_dump and pg_restore,
# when not the ones on PATH (they must be of the server's major version or newer).
PG_BIN_DIR = env_str("PG_BIN_DIR")
# The platform's git commit, recorded in each backup's manifest; found with git when unset and the
# project folder is a checkout.
PLATFORM_GIT_COMMIT = env_str("PLATFORM_GIT_COMMIT")

# Behind a reverse proxy: the client address comes from this header (e.g. X-Forwarded-For), taking
# the address TRUSTED_PROXY_COUNT hops from the right; without it, REMOTE_ADDR is used as is.
TRUSTED_PROXY_HEADER = env_str("TRUSTED_PROXY_HEADER")
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 1)

# Drift monitoring: a week's figure over fewer patches than this is shown but not judged.
DRIFT_MIN_PATCHES = env_int("DRIFT_MIN_PATCHES", 20)
# Turnaround dashboard: an urgent case signed out more than this after its first upload is a breach.
TURNAROUND_URGENT_TARGET_HOURS = env_int("TURNAROUND_URGENT_TARGET_HOURS", 24)

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
    "reconcile-slides": {"task": "slides.tasks.slide_reconcile", "schedule": float(RECONCILE_INTERVAL_SECONDS)},
    "import-slides": {"task": "slides.tasks.slides_import", "schedule": 60.0},
    "purge-idempotency-keys": {"task": "accounts.tasks.idempotency_purge", "schedule": 3600.0},
    "sweep-webhook-deliveries": {"task": "webhooks.tasks.webhook_sweep", "schedule": 60.0},
    "anchor-audit-trail": {"task": "audit.tasks.audit_anchor_write", "schedule": 3600.0},
}
# Webhook deliveries wait on other hospitals' servers: their own queue, so that a slow receiver
# never holds up analysis. A worker started without -Q consumes both queues.
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_TASK_QUEUES = {"celery": {}, "webhooks": {}}
CELERY_TASK_ROUTES = {"webhooks.tasks.*": {"queue": "webhooks"}}
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
# Deep Zoom tiles of slides (slides/viewer.py), kept apart so that they never evict the rate
# limiter's counts: in each web process's memory, about 20 KB a tile.
CACHES["slide_tiles"] = {
    "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
    "LOCATION": "slide-tiles",
    "OPTIONS": {"MAX_ENTRIES": env_int("SLIDE_TILE_CACHE_ENTRIES", 2000)},
}

SESSION_COOKIE_HTTPONLY = True
# A session ends after SESSION_IDLE_TIMEOUT seconds without a request, when the browser closes, and
# at the latest SESSION_COOKIE_AGE after sign-in.
SESSION_IDLE_TIMEOUT = env_int("SESSION_IDLE_TIMEOUT", 15 * 60)
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600)
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# HTTPS only off DEBUG: redirect, HSTS, and the TLS-terminating proxy's header trusted when set.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
# The preload flag only asks; a domain is preloaded only if its owner submits it to hstspreload.org.
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
if env_bool("BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# Content-Security-Policy (django-csp): scripts only from our static files or with this response's
# nonce; no plug-ins, no framing, forms post only to us.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, UNSAFE_INLINE],
        "img-src": [SELF, "data:"],
        "object-src": [NONE],
        "base-uri": [NONE],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "cloudiopsy.logging.RequestIdFilter"}},
    "formatters": {
        "plain": {"()": "cloudiopsy.logging.PlainFormatter"},
        "json": {"()": "cloudiopsy.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["request_id"]},
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# Observability (docs/observability.md). Log lines: one JSON object each (``json``, the default off
# DEBUG) or text for the local demo (``plain``); either way with the request id when there is one.
LOG_FORMAT = env_str("LOG_FORMAT", "plain" if DEBUG else "json")
if LOG_FORMAT not in LOGGING["formatters"]:
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or plain, not {LOG_FORMAT!r}")
LOGGING["handlers"]["console"]["formatter"] = LOG_FORMAT
# One line per HTTP request (logger cloudiopsy.access): method, path, view, status, duration.
LOG_REQUESTS = env_bool("LOG_REQUESTS", True)
# GET /metrics answers a scraper sending "Authorization: Bearer <METRICS_TOKEN>" (or the file named
# by METRICS_TOKEN_FILE), and signed-in superusers; nobody else.
METRICS_TOKEN = env_str("METRICS_TOKEN")
# Analysis latency (upload to result) is reported over the results of this many last seconds.
METRICS_ANALYSIS_WINDOW_SECONDS = env_int("METRICS_ANALYSIS_WINDOW_SECONDS", 3600)
# Several web (gunicorn) or worker processes on a host: PROMETHEUS_MULTIPROC_DIR names an empty folder
# they all write their figures to (prometheus-client reads it from the environment itself).
_multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _multiproc_dir and not Path(_multiproc_dir).is_dir():
    raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR={_multiproc_dir!r} is not an existing folder")
# A Celery worker serves its task metrics (no patient data, no authentication) on this address and
# port (0: off; see docs/observability.md).
WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0)
WORKER_METRICS_ADDRESS = env_str("WORKER_METRICS_ADDRESS", "127.0.0.1")
