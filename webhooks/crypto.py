"""Secrets kept in the database, encrypted with a key kept outside it (Fernet: AES-128-CBC and
HMAC-SHA256, with a timestamp).

The key is FIELD_ENCRYPTION_KEY (or FIELD_ENCRYPTION_KEY_FILE). Several keys separated by
commas rotate it: the first encrypts, any of them decrypts. Under DEBUG, when it is empty, a key
derived from SECRET_KEY is used, so that a development checkout works without one; off DEBUG an
empty key is an error at first use. Nothing here is specific to webhooks: it can move to a shared
module when another app stores a secret.
"""

from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = ["InvalidToken", "secret_decrypt", "secret_encrypt"]


def secret_encrypt(plaintext: str) -> str:
    """Encrypt ``plaintext`` with the current key; returns url-safe ASCII (a Fernet token)."""
    return _configured().encrypt(plaintext.encode()).decode()


def secret_decrypt(token: str) -> str:
    """Decrypt a token made by ``secret_encrypt`` under any configured key.

    Raises:
        InvalidToken: the token was made with another key (FIELD_ENCRYPTION_KEY changed), or altered.
    """
    return _configured().decrypt(token.encode()).decode()


def _configured() -> MultiFernet:
    # Read at each use (cached per value), so that a changed setting takes effect, in tests too.
    return _fernet(settings.FIELD_ENCRYPTION_KEY, settings.SECRET_KEY, settings.DEBUG)


@functools.lru_cache(maxsize=4)
def _fernet(configured: str, secret_key: str, debug: bool) -> MultiFernet:
    keys = [key.strip() for key in (configured or "").split(",") if key.strip()]
    if not keys:
        if not debug:
            raise ImproperlyConfigured(
                "FIELD_ENCRYPTION_KEY (or FIELD_ENCRYPTION_KEY_FILE) is required when DEBUG is off: it encrypts "
                "the webhook signing secrets in the database. Generate one with "
                '`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"` '
                "and keep it outside the database."
            )
        keys = [_derived_key(secret_key)]
    fernets = []
    for number, key in enumerate(keys, start=1):
        try:
            fernets.append(Fernet(key))
        except ValueError:
            raise ImproperlyConfigured(
                f"FIELD_ENCRYPTION_KEY: key {number} is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
    return MultiFernet(fernets)


def _derived_key(secret_key: str) -> bytes:
    # DEBUG only. HKDF with its own label, so that the derived key is not SECRET_KEY itself.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"cloudiopsy field encryption v1")
    return base64.urlsafe_b64encode(hkdf.derive(secret_key.encode()))
