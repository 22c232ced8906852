"""The patient query takes any PatientID an upload takes: '/' (legal in an LO value) sent as %2F,
which the server decodes before routing, and the other characters a URL reserves, percent-encoded.
A path that ends in '/' as sent is still refused like on every route. Until the sixteenth session
``{patient_id}`` stopped at the decoded '/', so ``HX16/SLASH`` could be uploaded but never queried
(404 ``no_such_route``), and a PatientID ``analysis`` was taken by the instance analysis route."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from route_harness import PSEUDONYMIZER, Harness, asgi_request, gateway_routes


def _clinician(harness: Harness) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {harness.token('hospital-a', 'clinician')}")]


def _key(patient_id: str) -> str:
    return PSEUDONYMIZER.pseudonym("hospital-a", "patient", patient_id)


@pytest.mark.parametrize(
    "patient_id",
    [
        "HX16/SLASH",
        "/HX16",
        "HX16/",
        "A//B",
        "HX16\\BS",
        "HX 16",
        "HX16?Q=1",
        "HX16#F",
        "HX16%2F",
        "HX16;v=1",
        "HX16+&=@:,$",
        "analysis",
        "HÜNTER/山田",
    ],
)
async def test_a_percent_encoded_patient_id_is_queried_as_uploaded(tmp_path: Path, patient_id: str) -> None:
    harness = gateway_routes(tmp_path)
    path = f"/api/v1/imaging/patient/{quote(patient_id, safe='')}"
    exchange = await asgi_request(harness.app, "GET", path.encode(), _clinician(harness))
    assert exchange.status == 200
    assert harness.read_model.patient_queries == [_key(patient_id)]
    (event,) = harness.publisher.access_events()
    assert (event["action"], event["outcome"]) == ("query_patient", "success")
    assert event["target"] == f"patient:{_key(patient_id)}"


async def test_an_unencoded_slash_inside_the_id_is_read_as_part_of_it(tmp_path: Path) -> None:
    """A client (or a proxy that decodes %2F) may send the '/' as it is: the rest of the path is the id."""
    harness = gateway_routes(tmp_path)
    exchange = await asgi_request(
        harness.app, "GET", b"/api/v1/imaging/patient/HX16/SLASH", _clinician(harness)
    )
    assert exchange.status == 200
    assert harness.read_model.patient_queries == [_key("HX16/SLASH")]


@pytest.mark.parametrize("path", [b"/api/v1/imaging/patient/HX16/", b"/api/v1/imaging/patient/"])
async def test_a_path_ending_in_a_slash_is_no_route_before_the_token_is_read(
    tmp_path: Path, path: bytes
) -> None:
    harness = gateway_routes(tmp_path)
    exchange = await asgi_request(harness.app, "GET", path, [])  # no token at all
    assert exchange.status == 404
    assert b"no_such_route" in exchange.body and b"do not end in '/'" in exchange.body
    assert harness.read_model.patient_queries == []
    assert harness.publisher.access_events() == []


async def test_the_instance_routes_still_take_their_paths(tmp_path: Path) -> None:
    """Moving the patient route first must not take ``/api/v1/imaging/{imaging_id}/analysis``."""
    harness = gateway_routes(tmp_path)
    imaging_id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    for path in (f"/api/v1/imaging/{imaging_id}", f"/api/v1/imaging/{imaging_id}/analysis"):
        exchange = await asgi_request(harness.app, "GET", path.encode(), _clinician(harness))
        assert exchange.status == 404  # looked up as an instance: not found
    assert harness.read_model.patient_queries == []
    assert [e["target"] for e in harness.publisher.access_events()] == [imaging_id, imaging_id]
