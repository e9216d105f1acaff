"""Bad uploads are refused with a message naming the problem, leaving no row and no file."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from cases.models import BiopsyCase, TissuePatch
from tests.conftest import fixture_patch, png_bytes, stored_files

pytestmark = pytest.mark.django_db


def multipart(files: list[tuple[str, bytes]], field: str = "image") -> tuple[bytes, str]:
    """A multipart body with file names exactly as given (the test client would strip paths)."""
    boundary = "----cloudiopsy-test-boundary"
    parts = []
    for name, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        parts.append(head + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_files(api, case, files):
    body, content_type = multipart(files)
    return api.generic("POST", f"/api/v1/cases/{case.pk}/patches/", body, content_type=content_type)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A few-kilobyte PNG that claims (and decompresses to) width x height grey pixels."""
    row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def real_png() -> bytes:
    return fixture_patch("NORM-TCGA-CWFDHWAH.png").read_bytes()


def test_bomb_png_is_small_but_huge():
    data = bomb_png(6000, 6000)
    assert len(data) < 100_000


def _sixteen_bit_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("I;16", (128, 128), 1000).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (200, 100, 150)).save(buffer, format="GIF")
    return buffer.getvalue()


BAD_UPLOADS = {
    "truncated PNG": ("cut.png", lambda: real_png()[: len(real_png()) // 2], "corrupt or truncated"),
    "text file named .png": ("notes.png", lambda: b"Patient notes, not an image.\n" * 20, "not a PNG, JPEG or TIFF"),
    "decompression bomb (between 1x and 2x the pixel cap)": ("bomb.png", lambda: bomb_png(6000, 6000), "pixel"),
    "zero-byte file": ("empty.png", lambda: b"", "empty"),
    "200-megapixel image": ("huge.png", lambda: bomb_png(20000, 10000), "pixel"),
    "path as file name": ("../../etc/passwd.png", real_png, "plain name, not a path"),
    "tiny image": ("tiny.png", lambda: png_bytes(size=(28, 28)), "at least 64x64"),
    "16-bit image": ("deep.png", _sixteen_bit_png, "cannot be converted to RGB"),
    "GIF (not allowed)": ("anim.gif", _gif, "not a PNG, JPEG or TIFF"),
}


@pytest.mark.parametrize("kind", BAD_UPLOADS)
def test_bad_upload_is_refused_and_leaves_nothing(kind, case, lab_api, _media_root):
    name, make, message = BAD_UPLOADS[kind]
    response = post_files(lab_api, case, [(name, make())])
    assert response.status_code == 400, response.content
    body = response.json()
    assert message in body["detail"]
    assert body["rejected"][0]["file"] == name
    assert TissuePatch.objects.count() == 0
    assert stored_files(_media_root) == []
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.OPEN


def test_path_file_name_writes_nothing_outside_media(case, lab_api, _media_root, tmp_path):
    passwd = open("/etc/passwd", "rb").read()
    response = post_files(lab_api, case, [("../../etc/passwd.png", real_png())])
    assert response.status_code == 400
    assert open("/etc/passwd", "rb").read() == passwd
    assert not any(p.name == "passwd.png" for p in tmp_path.rglob("*"))


def test_mixed_upload_accepts_valid_files_and_names_each_bad_one(case, lab_api, _media_root):
    good = [("a.png", real_png()), ("b.tif", fixture_patch("TUM-AACHEHDV.tif").read_bytes())]
    bad = [("empty.png", b""), ("notes.png", b"plain text")]
    response = post_files(lab_api, case, good + bad)
    assert response.status_code == 202, response.content
    body = response.json()
    assert [p["original_name"] for p in body["patches"]] == ["a.png", "b.tif"]
    assert all(p["status"] == "queued" for p in body["patches"])
    assert {r["file"] for r in body["rejected"]} == {"empty.png", "notes.png"}
    assert TissuePatch.objects.count() == 2
    assert len(stored_files(_media_root)) == 2


def test_stored_file_is_a_lossless_reencoding_under_a_server_name(case, lab_api, _media_root):
    import hashlib
    import re

    upload = fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes()
    response = post_files(lab_api, case, [("my scan.png", upload)])
    assert response.status_code == 202
    patch = TissuePatch.objects.get()
    assert patch.format == "PNG" and (patch.width, patch.height) == (224, 224)
    assert patch.original_name == "my scan.png"
    assert re.fullmatch(r"patches/\d+/[0-9a-f]{32}\.bmp", patch.storage_name)
    stored = _media_root / patch.storage_name
    assert stored.read_bytes()[:2] == b"BM"  # re-encoded, not the uploaded bytes
    assert patch.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert patch.source_sha256 == hashlib.sha256(upload).hexdigest()
    with Image.open(stored) as image, Image.open(fixture_patch("TUM-TCGA-KECNIDCQ.png")) as original:
        assert image.convert("RGB").tobytes() == original.convert("RGB").tobytes()


def test_upload_without_files_is_400(case, lab_api):
    body, content_type = multipart([])
    response = lab_api.generic("POST", f"/api/v1/cases/{case.pk}/patches/", body, content_type=content_type)
    assert response.status_code == 400
    assert "no file" in response.json()["detail"]


def test_oversized_file_is_refused(case, lab_api, settings, _media_root):
    settings.UPLOAD_MAX_BYTES = 50_000
    response = post_files(lab_api, case, [("big.png", real_png())])
    assert response.status_code == 400
    assert "larger than" in response.json()["detail"]
    assert TissuePatch.objects.count() == 0


def test_web_upload_of_bad_file_shows_message_and_stores_nothing(case, clinician_client, _media_root):
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = clinician_client.post(
        f"/cases/{case.pk}/upload/", {"image": [SimpleUploadedFile("notes.png", b"not an image")]}
    )
    assert response.status_code == 400
    assert b"notes.png: not a PNG, JPEG or TIFF image" in response.content
    assert TissuePatch.objects.count() == 0
    assert stored_files(_media_root) == []


def test_web_upload_of_several_files_queues_them(case, clinician_client, django_capture_on_commit_callbacks):
    from django.core.files.uploadedfile import SimpleUploadedFile

    files = [SimpleUploadedFile("one.png", real_png()), SimpleUploadedFile("two.png", png_bytes())]
    with django_capture_on_commit_callbacks() as callbacks:
        response = clinician_client.post(f"/cases/{case.pk}/upload/", {"image": files})
    assert response.status_code == 302
    assert TissuePatch.objects.filter(status=TissuePatch.Status.QUEUED).count() == 2
    assert len(callbacks) == 1


def test_request_over_the_byte_cap_is_413_before_it_is_read(case, lab_api, settings, _media_root):
    settings.UPLOAD_MAX_REQUEST_BYTES = 50_000
    body, content_type = multipart([("big.png", real_png()), ("big2.png", real_png())])
    assert len(body) > 50_000
    response = lab_api.generic("POST", f"/api/v1/cases/{case.pk}/patches/", body, content_type)
    assert response.status_code == 413
    assert "limit is 50,000 bytes" in response.json()["detail"]
    assert not stored_files(_media_root) and not TissuePatch.objects.exists()


def test_files_are_written_before_the_transaction_and_rows_inserted_at_once(case, clinician, monkeypatch):
    from django.core.files.storage import default_storage
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from cases.services import patch_upload

    real_save = default_storage.save
    in_transaction = []
    test_depth = len(connection.atomic_blocks)  # the test's own transaction, which rolls back at its end
    monkeypatch.setattr(
        default_storage,
        "save",
        lambda *a, **k: in_transaction.append(len(connection.atomic_blocks) > test_depth) or real_save(*a, **k),
    )
    counts = []
    for size in (1, 1, 4):  # the first moves the case to "analysing": one more audited transition
        with CaptureQueriesContext(connection) as queries:
            patch_upload(case=case, uploaded_by=clinician, files=[(f"p{i}.png", real_png()) for i in range(size)])
        counts.append(len(queries))
    assert in_transaction == [False] * 6  # no file I/O while a row lock is held
    assert counts[2] == counts[1], counts  # one insert and one audit append, whatever the number of files


def test_a_transaction_that_fails_leaves_no_file(case, clinician, monkeypatch, _media_root):
    from cases import services

    def fail(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(services, "audit_record_many", fail)
    with pytest.raises(RuntimeError):
        services.patch_upload(case=case, uploaded_by=clinician, files=[("a.png", real_png()), ("b.png", real_png())])
    assert not stored_files(_media_root) and not TissuePatch.objects.exists()
