"""A schemathesis run over /openapi.json (bounded examples): every generated request gets a documented status code
and a response that conforms to the documented schema, and the server never answers 500."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")  # the dev extra
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from test_server import Server  # noqa: E402


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    s = Server(tiny_checkpoint, app_kw={"max_body_bytes": 200_000})
    yield s.app
    s.stop()


@pytest.mark.parametrize("examples", [3, pytest.param(40, marks=pytest.mark.slow)])
def test_openapi_schema_fuzz(app, examples):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen = []
    for op in schema.get_all_operations():
        op = op.ok()

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            if isinstance(case.body, dict) and "max_tokens" in case.body:
                case.body["max_tokens"] = min(case.body["max_tokens"] or 0, 4)  # keep generation short
            response = case.call()
            seen.append(response.status_code)
            case.validate_response(response, checks=[checks.not_a_server_error, checks.status_code_conformance,
                                                     checks.content_type_conformance,
                                                     checks.response_schema_conformance])

        run()
    assert seen and 500 not in seen
