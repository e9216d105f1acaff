"""The short form of scripts/chaos.py: a worker SIGKILLed mid-batch three times, the broker losing
every message, the image store filling up, all while patches are uploaded through the API by real
web, worker and beat processes. Nothing may be lost, analysed twice or half stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, unavailable
from tests.integration.workers import database_url, require_postgres_and_redis

pytestmark = pytest.mark.django_db


@pytest.mark.timeout(400)
def test_faults_while_patches_flow_lose_nothing(tmp_path):
    require_postgres_and_redis()
    if os.geteuid() != 0:
        unavailable("the image-store fault mounts a small tmpfs, which needs root")
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "scripts/chaos.py", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": database_url()}, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["faults"]) == {"kill", "broker", "disk"}, done.stdout[-3000:]
    assert report["accepted"] > 50
    assert (report["lost"], report["twice"], report["half_stored"]) == (0, 0, 0)
    assert report["verify_audit"] == "ok"
    kill, broker, disk = report["faults"]["kill"], report["faults"]["broker"], report["faults"]["disk"]
    assert kill["killed_mid_batch"] >= 1  # at least one kill caught a batch between claim and result
    # Recovered within the short form's timeouts: a killed worker's patches once its heartbeat is
    # silent (3 x 2 s) and a reconciler run (every 4 s); lost messages after the re-send delay (8 s).
    assert kill["recovery_s"] is not None and kill["recovery_s"] < 60
    assert broker["recovery_s"] is not None and broker["recovery_s"] < 40
    assert disk["refused_while_full"].get("507", 0) > 0 and set(disk["refused_while_full"]) == {"507"}
    assert disk["recovery_s"] is not None and disk["recovery_s"] < 5
    assert done.returncode == 0, done.stdout[-3000:]
