"""Validation of uploaded images, entirely in memory, before anything is stored.

Every check names the problem in a message a user can act on. What is stored is never the
uploaded bytes: it is a lossless re-encoding (``inference.core.preprocessing.STORAGE_FORMAT``) of
the fully decoded pixels, so a file that only looks like an image, or carries something besides
pixels, cannot reach the disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import IO

from django.conf import settings
from PIL import Image

from inference.core.preprocessing import encode_for_storage

ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF")
# Modes Pillow converts to RGB without losing meaning; 16-bit/float data (I;16, I, F) is not H&E.
RGB_CONVERTIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr"})
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


class UploadRejected(ValueError):
    """An uploaded file that must not be stored; the message says why."""


@dataclass(frozen=True)
class ValidatedImage:
    original_name: str
    stored_bytes: bytes  # lossless re-encoding in inference.core's storage format
    sha256: str
    source_sha256: str
    width: int
    height: int
    format: str

    def without_pixels(self) -> ValidatedImage:
        """The same facts without the stored bytes, once they are written (memory per request)."""
        return dataclasses.replace(self, stored_bytes=b"")


def read_uploads(uploads) -> tuple[list[tuple[str, IO[bytes]]], list[tuple[str, str]]]:
    """(name, file) of each uploaded file within the size cap, and (name, reason) for the others.

    An oversized file is refused from its declared size, without reading it; the others are read
    one at a time by ``patch_upload``.
    """
    files, refused = [], []
    for upload in uploads:
        if upload.size > settings.UPLOAD_MAX_BYTES:
            refused.append((upload.name, _too_large()))
        else:
            files.append((upload.name, upload))
    return files, refused


def _too_large() -> str:
    return f"the file is larger than the {settings.UPLOAD_MAX_BYTES // (1024 * 1024)} MB limit"


def check_file_name(name: str) -> str:
    """A display-safe file name, or UploadRejected if the name tries to be a path."""
    if not name or not name.strip():
        raise UploadRejected("the file has no name")
    if _UNSAFE_NAME.search(name) or name.strip() in {".", ".."}:
        raise UploadRejected("the file name must be a plain name, not a path or control characters")
    name = unicodedata.normalize("NFC", name).strip()
    return name[-255:]


def validate_image(name: str, data: bytes) -> ValidatedImage:
    """Check one uploaded file and re-encode it as PNG.

    Raises:
        UploadRejected: the name, size, format, pixel count or content is not acceptable.
    """
    original_name = check_file_name(name)
    if not data:
        raise UploadRejected("the file is empty")
    if len(data) > settings.UPLOAD_MAX_BYTES:
        raise UploadRejected(_too_large())
    max_pixels = settings.UPLOAD_MAX_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Image.MAX_IMAGE_PIXELS is set to UPLOAD_MAX_PIXELS at start-up (CasesConfig.ready).
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                image_format = image.format
                width, height = image.size
                if width * height > max_pixels:
                    raise UploadRejected(f"the image has {width * height:,} pixels; the limit is {max_pixels:,}")
                if image.mode not in RGB_CONVERTIBLE_MODES:
                    raise UploadRejected(f"image mode {image.mode} cannot be converted to RGB colour")
                image.load()  # full decode: a truncated or corrupt file fails here, not later
                rgb = image.convert("RGB")
    except UploadRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadRejected(f"the image exceeds the {max_pixels:,}-pixel limit (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise UploadRejected("not a PNG, JPEG or TIFF image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadRejected(f"the image is corrupt or truncated ({exc})") from None
    min_side = settings.UPLOAD_MIN_SIDE
    if min(width, height) < min_side:
        raise UploadRejected(f"the image is {width}x{height} pixels; at least {min_side}x{min_side} is needed")
    stored = encode_for_storage(rgb)
    return ValidatedImage(
        original_name=original_name,
        stored_bytes=stored,
        sha256=hashlib.sha256(stored).hexdigest(),
        source_sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=image_format,
    )
