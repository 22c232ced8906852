"""A series analysed again writes its reports at the same keys (same members, same analysis id): the
versions the new result supersedes are deleted once it is recorded and published, before the series
is finished, so a process that dies part-way finishes the deletion at the next claim. Until then
every older version stayed readable in the results bucket, including those made from copies
``enclave-deid-redo`` replaced (the SR and SEG copy the copies' patient and study modules)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pydicom
from botocore.exceptions import EndpointConnectionError
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.errors import PermanentError, classify_exception
from enclave_common.events import ObjectRef
from prometheus_client import CollectorRegistry

MEMBERS = [
    {
        "_id": f"iu-{n}",
        "state": "deidentified",
        "study_key": "st",
        "instance_key": f"ik-{n}",
        "object": {"key": f"c{n}"},
    }
    for n in range(3)
]
NAMES = ("sr.dcm", "seg.dcm")


class Journal:
    """What the service did, in order: published, deleted, finished."""

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self.pending: dict[str, Any] | None = None
        self.taken_over = False


class Assembly:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    missing = staticmethod(lambda series: [])

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        return MEMBERS

    async def decide(self, series: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
        self.journal.pending = outcome
        return outcome

    async def retry_later(self, series: dict[str, Any], delay_s: float, *, counted: bool) -> None:
        self.journal.steps.append(("retry", counted))

    async def finish(
        self, series: dict[str, Any], analysis_id: str, outcome: str, reason: Any = None
    ) -> None:
        self.journal.steps.append(("finish", outcome))

    async def held(self, series: dict[str, Any]) -> dict[str, Any] | None:
        return None if self.journal.taken_over else series


class Versions:
    """The results bucket's versions; ``refuse`` makes the next delete fail with it."""

    def __init__(self, journal: Journal, stored: list[tuple[str, str]]) -> None:
        self.journal = journal
        self.stored = stored
        self.refuse: BaseException | None = None
        self.refuse_listing: BaseException | None = None

    async def versions(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        """As S3 lists them: keys in order, each key's newest version (the last stored) first."""
        if self.refuse_listing is not None:
            raise self.refuse_listing
        newest_first = [v for v in reversed(self.stored) if v[0].startswith(prefix)]
        return sorted(newest_first, key=lambda v: v[0])

    async def delete(self, bucket: str, versions: list[tuple[str, str]]) -> None:
        if self.refuse is not None:
            refused, self.refuse = self.refuse, None
            raise refused
        self.journal.steps.append(("delete", sorted(versions)))
        self.stored = [v for v in self.stored if v not in versions]


def service(
    stored: list[tuple[str, str]], *, fails: bool = False
) -> tuple[AnalysisService, Journal, Versions]:
    journal = Journal()

    class Publisher:
        async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
            journal.steps.append(("publish", topic, envelope.id))

    def analyser(datasets: list[pydicom.Dataset]) -> Any:
        if fails:
            from enclave_analysis.errors import NotBrainT1Error

            raise NotBrainT1Error("not a brain")
        return {"icv_ml": 1.0}, {}, {}, [(name, "application/dicom", b"x") for name in NAMES]

    runtime = SimpleNamespace(
        publisher=Publisher(), registry=CollectorRegistry(), count_crypto=lambda _: None
    )
    versions = Versions(journal, stored)
    analysis = AnalysisService(
        runtime,
        AnalysisSettings(),
        Assembly(journal),
        None,
        analyser,
        report_versions=versions,  # type: ignore[arg-type]
    )

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> pydicom.Dataset:
        ds = pydicom.Dataset()
        ds.SOPInstanceUID = "2.25." + member["_id"].removeprefix("iu-")
        return ds

    async def store_report(tenant: str, study_key: str, analysis_id: str, name: str, *_: Any) -> ObjectRef:
        key = f"reports/{analysis_id}/{name}"
        versions.stored.append((key, "v-new"))
        return ObjectRef(bucket="results", key=key, version_id="v-new")

    analysis._load = load  # type: ignore[method-assign]
    analysis._store_report = store_report  # type: ignore[method-assign]
    return analysis, journal, versions


def series(**fields: Any) -> dict[str, Any]:
    return {"_id": "t:sk", "tenant": "t", "series_key": "sk", "changed_at": 1, "attempts": 1, **fields}


def analysis_id() -> str:
    from enclave_analysis.assembly import analysis_id_for

    return analysis_id_for("sk", [m["_id"] for m in MEMBERS])


def old_versions(of: str) -> list[tuple[str, str]]:
    return [(f"reports/{of}/{name}", version) for name in NAMES for version in ("v-1", "v-2")]


def deleted(value: Any) -> float:
    return float(
        value.runtime.registry.get_sample_value(
            "enclave_analysis_superseded_report_versions_total", {"outcome": "deleted"}
        )
    )


async def test_a_new_result_deletes_the_versions_it_superseded_after_publishing_and_before_finishing() -> (
    None
):
    current = analysis_id()
    earlier = old_versions(current) + old_versions("an-previous") + [("reports/an-other/sr.dcm", "v-1")]
    analysis, journal, versions = service(list(earlier))
    await analysis.attempt(series(analysis_id="an-previous"))
    [publish, delete, finish] = journal.steps
    assert publish[:2] == ("publish", topics.ANALYSIS_COMPLETED) and finish == ("finish", "completed")
    assert delete == ("delete", sorted(old_versions(current) + old_versions("an-previous")))
    assert sorted(versions.stored) == sorted(
        [(f"reports/{current}/{name}", "v-new") for name in NAMES] + [("reports/an-other/sr.dcm", "v-1")]
    )
    assert deleted(analysis) == 8


async def test_a_deletion_cut_short_is_finished_by_the_next_claim_with_the_same_event() -> None:
    analysis, journal, versions = service(old_versions(analysis_id()))
    versions.refuse = classify_exception(EndpointConnectionError(endpoint_url="http://minio"))
    await analysis.attempt(series())
    assert [s[0] for s in journal.steps] == ["publish", "retry"]  # not finished: nothing lost
    assert journal.steps[1] == ("retry", False)
    first_event = journal.steps[0][2]
    journal.steps.clear()
    await analysis.attempt(series(attempts=2, pending_event=journal.pending))
    assert [s[0] for s in journal.steps] == ["publish", "delete", "finish"]
    assert journal.steps[0][2] == first_event
    assert all(version == "v-new" for _, version in versions.stored)


async def test_versions_the_store_refuses_to_delete_are_logged_and_the_series_finishes() -> None:
    analysis, journal, versions = service(old_versions(analysis_id()))
    versions.refuse = PermanentError(
        "object store delete versions failed (AccessDenied)", code="s3_AccessDenied"
    )
    await analysis.attempt(series())
    assert [s[0] for s in journal.steps] == ["publish", "finish"]
    kept = analysis.runtime.registry.get_sample_value(
        "enclave_analysis_superseded_report_versions_total", {"outcome": "kept"}
    )
    assert kept == 4 and deleted(analysis) == 0


async def test_a_failed_outcome_deletes_no_report() -> None:
    analysis, journal, versions = service(old_versions(analysis_id()), fails=True)
    await analysis.attempt(series())
    assert [s[0] for s in journal.steps] == ["publish", "finish"]
    assert len(versions.stored) == 4


async def test_versions_the_store_refuses_to_list_are_kept_and_the_series_finishes() -> None:
    """Without ``s3:ListBucketVersions`` the listing is refused: the series finishes once (until a
    review of the eighteenth session the refusal was an unexpected error, and the recorded outcome
    was published again at every claim, for good)."""
    analysis, journal, versions = service(old_versions(analysis_id()))
    versions.refuse_listing = PermanentError(
        "object store list versions failed (AccessDenied)", code="s3_AccessDenied"
    )
    await analysis.attempt(series())
    assert [s[0] for s in journal.steps] == ["publish", "finish"]
    assert len(versions.stored) == 6


async def test_a_purge_keeps_newer_versions_than_its_own_and_keys_whose_kept_version_is_gone() -> None:
    """A replica that stalled before its purge while another analysed the same members again and
    published newer reports deletes none of those (it deleted them all before the review)."""
    current = analysis_id()
    analysis, journal, versions = service(old_versions(current))
    real_store = analysis._store_report

    async def store_then_overtaken(*args: Any) -> ObjectRef:
        ref = await real_store(*args)
        versions.stored.append((ref.key, "v-newer"))  # the other replica's, written after ours
        return ref

    analysis._store_report = store_then_overtaken  # type: ignore[method-assign]
    await analysis.attempt(series())
    [_, delete, _] = journal.steps
    assert delete == ("delete", sorted(old_versions(current)))
    assert sorted(v for v in versions.stored) == sorted(
        [(f"reports/{current}/{name}", v) for name in NAMES for v in ("v-new", "v-newer")]
    )


async def test_a_purge_deletes_nothing_once_the_series_was_taken_over() -> None:
    analysis, journal, versions = service(old_versions(analysis_id()))
    journal.taken_over = True
    await analysis.attempt(series())
    assert "delete" not in [s[0] for s in journal.steps]
    assert len(versions.stored) == 6
