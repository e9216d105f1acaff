"""Property-based run over the OpenAPI schema (Schemathesis): every operation, generated inputs,
a real token; no server error and no response that contradicts the schema. Bounded: a handful
of examples per operation, so it finishes in well under a minute."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from accounts.models import Institution
from accounts.services import lab_system_create
from cloudiopsy.wsgi import application

schema = schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", application)
# A piece of a resumable slide upload is raw bytes (slides/api.py).
schemathesis.openapi.media_type("application/offset+octet-stream", st.binary(max_size=4096))


@pytest.fixture
def lab_token(transactional_db):
    institution, _ = Institution.objects.get_or_create(slug="fuzz", defaults={"name": "Fuzz"})
    return lab_system_create(institution=institution, name=f"fuzz-{Institution.objects.count()}")[1]


@schema.parametrize()
@hypothesis_settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_never_errors_and_keeps_its_schema(case, lab_token):
    case.call_and_validate(
        headers={"Authorization": f"Token {lab_token}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
