"""A full image store (a real, small tmpfs as MEDIA_ROOT) is a clear 507 to the uploader, through the
API and the web page, and leaves no row, no audit event and no file, not even one cut short."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from audit.models import AuditEvent
from cases.models import TissuePatch
from tests.conftest import fixture_patch, stored_files, unavailable
from tests.test_uploads import multipart, post_files

pytestmark = pytest.mark.django_db

NAMES = ["NORM-TCGA-CWFDHWAH.png", "NORM-TCGA-INTLNRAV.png", "TUM-TCGA-KECNIDCQ.png", "TUM-TCGA-NHQGDFVF.png"]


@pytest.fixture
def small_disk(tmp_path, settings):
    """A 160 KB filesystem: room for one stored patch, not for four."""
    mount = tmp_path / f"small-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        unavailable(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    settings.MEDIA_ROOT = mount
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def files() -> list[tuple[str, bytes]]:
    return [(name, fixture_patch(name).read_bytes()) for name in NAMES]


def test_api_upload_to_a_full_disk_is_507_and_stores_nothing(case, lab_api, small_disk):
    events = AuditEvent.objects.count()
    response = post_files(lab_api, case, files())
    assert response.status_code == 507, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert "image store is full" in response.json()["detail"]
    assert "nothing from this upload was stored" in response.json()["detail"]
    assert TissuePatch.objects.count() == 0
    assert AuditEvent.objects.count() == events
    assert stored_files(small_disk) == []  # the files written before the disk filled were removed too

    # Once there is room the same upload goes through.
    response = post_files(lab_api, case, files()[:1])
    assert response.status_code == 202, response.content
    assert len(stored_files(small_disk)) == 1


def test_idempotent_retry_after_space_is_freed_does_the_work(case, lab_api, small_disk):
    """A 507 is not remembered under the Idempotency-Key: the same request retried later is done."""
    body, content_type = multipart(files())
    url, key = f"/api/v1/cases/{case.pk}/patches/", {"HTTP_IDEMPOTENCY_KEY": "upload-1"}
    assert lab_api.generic("POST", url, body, content_type, **key).status_code == 507
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    retry = lab_api.generic("POST", url, body, content_type, **key)
    assert retry.status_code == 202, retry.content
    assert "Idempotent-Replayed" not in retry
    assert TissuePatch.objects.count() == len(NAMES) == len(stored_files(small_disk))


def test_web_upload_to_a_full_disk_shows_the_reason(case, clinician_client, small_disk):
    uploads = []
    for name, data in files():
        path = Path(small_disk).parent / name
        path.write_bytes(data)
        uploads.append(path.open("rb"))
    try:
        response = clinician_client.post(f"/cases/{case.pk}/upload/", {"image": uploads})
    finally:
        for handle in uploads:
            handle.close()
    assert response.status_code == 507
    assert "image store is full" in response.content.decode()
    assert TissuePatch.objects.count() == 0
    assert stored_files(small_disk) == []
