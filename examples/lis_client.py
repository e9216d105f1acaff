"""Example client for laboratory information systems integrating with Cloudiopsy.

Creates a case, uploads patches, waits for the AI analysis (by polling; a webhook receiver
would be told instead), and fetches the FHIR report. Uses only ``requests``.

    python examples/lis_client.py --url http://127.0.0.1:8000 --token cldy_... \\
        --accession S26-0001 --mrn 123456 --name "Ada Example" patch1.png patch2.tif
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import requests


class Cloudiopsy:
    def __init__(self, url: str, token: str, timeout: float = 30):
        self.url = url.rstrip("/") + "/api/v1"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        self.timeout = timeout

    def _check(self, response: requests.Response) -> dict:
        if response.status_code >= 400:
            problem = response.json()
            raise RuntimeError(f"{problem['status']} {problem['title']}: {problem['detail']}")
        return response.json()

    def create_case(self, *, accession: str, patient: dict, specimen_site: str, priority: str = "routine") -> dict:
        # The same Idempotency-Key on a retry (after a timeout, say) never creates a second case.
        key = f"case-{accession}"
        body = {"accession": accession, "patient": patient, "specimen_site": specimen_site, "priority": priority}
        for attempt in range(3):
            try:
                response = self.session.post(
                    f"{self.url}/cases/", json=body, headers={"Idempotency-Key": key}, timeout=self.timeout
                )
                return self._check(response)
            except requests.ConnectionError:
                if attempt == 2:
                    raise
                time.sleep(2**attempt)
        raise AssertionError("unreachable")

    def upload(self, case_id: int, paths: list[Path]) -> dict:
        files = [("image", (p.name, p.read_bytes())) for p in paths]
        key = f"upload-{case_id}-{uuid.uuid4()}"
        return self._check(
            self.session.post(
                f"{self.url}/cases/{case_id}/patches/", files=files, headers={"Idempotency-Key": key}, timeout=120
            )
        )

    def wait_until_ready(self, case_id: int, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            case = self._check(self.session.get(f"{self.url}/cases/{case_id}/", timeout=self.timeout))
            if case["status"] in {"ready_for_review", "signed_out"}:
                return case
            if time.monotonic() > deadline:
                raise TimeoutError(f"case {case_id} still {case['status']} after {timeout} s")
            time.sleep(2)

    def fhir_report(self, case_id: int) -> dict:
        return self._check(self.session.get(f"{self.url}/cases/{case_id}/fhir/", timeout=self.timeout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", required=True)
    parser.add_argument("--accession", required=True)
    parser.add_argument("--mrn", required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--site", default="colon")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("patches", nargs="+", type=Path)
    args = parser.parse_args()

    api = Cloudiopsy(args.url, args.token)
    case = api.create_case(
        accession=args.accession, patient={"mrn": args.mrn, "name": args.name}, specimen_site=args.site
    )
    print(f"case {case['id']} ({case['accession']}) created")
    upload = api.upload(case["id"], args.patches)
    print(f"{len(upload['patches'])} patches queued, {len(upload['rejected'])} rejected")
    for rejected in upload["rejected"]:
        print(f"  rejected {rejected['file']}: {rejected['error']}")
    case = api.wait_until_ready(case["id"], args.timeout)
    for patch in case["patches"]:
        prediction = patch["prediction"] or {}
        print(f"  {patch['original_name']}: {patch['status']} {prediction.get('label', patch['failure_reason'])}")
    report = api.fhir_report(case["id"])
    diagnostic = next(e["resource"] for e in report["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    print(json.dumps({"status": diagnostic["status"], "conclusion": diagnostic["conclusion"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
