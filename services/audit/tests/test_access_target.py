"""The auditor API's access record names the route's template, never the path a client sent: a path
parameter is client text (found by an API hunt: "/audit/fhir/AuditEvent/PHIMARKER JANE" was written,
unauthenticated, into the WORM-backed trail)."""

from __future__ import annotations

from types import SimpleNamespace

from enclave_audit.api import access_hook
from enclave_common.auth import Action
from enclave_common.auth.fastapi import AccessResult
from starlette.requests import Request

PLANTED = "PHIMARKER JANE"


class Capture:
    def __init__(self) -> None:
        self.published: list = []

    async def publish(self, topic, envelope, key=None) -> None:
        self.published.append(envelope)


async def test_the_record_names_the_route_template_not_the_path() -> None:
    route = SimpleNamespace(path="/audit/fhir/AuditEvent/{resource_id}")
    request = Request(
        {
            "type": "http",
            "method": "GET",
            "path": f"/audit/fhir/AuditEvent/{PLANTED}",
            "headers": [],
            "query_string": b"",
            "route": route,
            "client": ("192.0.2.1", 1234),
        }
    )
    sink = Capture()
    await access_hook(sink)(
        None, Action.AUDIT_QUERY, AccessResult("unauthenticated", "missing_token"), 401, request
    )
    (envelope,) = sink.published
    assert envelope.data["target"] == "/audit/fhir/AuditEvent/{resource_id}"
    assert PLANTED not in envelope.to_bytes().decode()
