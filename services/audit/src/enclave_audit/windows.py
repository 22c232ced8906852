"""Anomaly-rule history kept as per-minute buckets, each a document found by ``_id``.

The rules ask "how many distinct studies did this actor access in the last 10 minutes?" and "how many
authentication failures from this actor/address in the last 5 minutes?" for every record. Answering
that by querying the records is a scan per event on a MongoDB-wire server without secondary-index
pushdown (FerretDB v1 scans for any filter but ``_id``), i.e. quadratic in the trail. Instead each
stored record is *observed* once into minute buckets (``$addToSet`` of study keys or event ids, so a
repeated observation changes nothing) and each question reads at most window/1 min buckets by ``_id``.
The state is in the database, so a restart loses no window. Windows are rounded out to whole
minutes (a bucket is counted if it overlaps the window). The patient keys an actor looked up are kept
in hour buckets (their window is a day), and the latest restriction lifting per actor and patient
(and the latest one recorded but not made) in one document each, by ``$max``. Written by hand: no
library does this.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import DESCENDING

from enclave_audit.anomaly import lifting_undone, patient_key_lookup, restriction_lifted
from enclave_audit.codes import USER_AUTHENTICATION, EventOutcome, ObjectKind
from enclave_audit.records import AuditRecordDraft

WINDOWS = "anomaly_windows"
_ACCESS_TYPE = "enclave.access.recorded"


def _bucket(moment: datetime, *, hours: bool = False) -> str:
    """The minute (or, with ``hours``, the hour) bucket ``moment`` falls in."""
    return moment.strftime("%Y%m%d%H" if hours else "%Y%m%d%H%M")


def _buckets(since: datetime, until: datetime, *, hours: bool = False) -> list[str]:
    """The buckets a window overlaps: minutes, or hours for a window counted in hours (the
    patient-key lookups' 24 h: 25 reads)."""
    start = since.replace(minute=0 if hours else since.minute, second=0, microsecond=0)
    step = timedelta(hours=1) if hours else timedelta(minutes=1)
    out = []
    while start <= until:
        out.append(_bucket(start, hours=hours))
        start += step
    return out


class BucketedAuditHistory:
    """:class:`enclave_audit.anomaly.AuditHistory` over minute buckets (sync pymongo: run in a thread)."""

    def __init__(self, database: Any) -> None:
        self.windows = database[WINDOWS]
        self.alerts = database["alerts"]

    def observe(self, record: AuditRecordDraft, event_key: str) -> None:
        """Add one stored record to the buckets the rules read (idempotent)."""
        minute = _bucket(record.event_time)
        if record.event_type == _ACCESS_TYPE and record.outcome == EventOutcome.SUCCESS:
            studies = list(record.object_ids(ObjectKind.STUDY))
            if studies:
                self.windows.update_one(
                    {"_id": f"studies|{record.tenant}|{record.actor}|{minute}"},
                    {"$addToSet": {"items": {"$each": studies}}},
                    upsert=True,
                )
        lifted, undone = restriction_lifted(record), lifting_undone(record)
        if lifted or undone:
            # Not a minute bucket: the latest lifting per actor and patient, and the latest lifting
            # recorded but then not made, one small document each, kept as long as the trail.
            for key in record.object_ids(ObjectKind.PATIENT):
                self.windows.update_one(
                    {"_id": f"lifted|{record.tenant}|{record.actor}|{key}"},
                    {"$max": {"at" if lifted else "undone": record.event_time}},
                    upsert=True,
                )
        if patient_key_lookup(record):
            keys = list(record.object_ids(ObjectKind.PATIENT))
            if keys:
                self.windows.update_one(
                    {
                        "_id": f"patientkeys|{record.tenant}|{record.actor}|{_bucket(record.event_time, hours=True)}"
                    },
                    {"$addToSet": {"items": {"$each": keys}}},
                    upsert=True,
                )
        if record.event_code == USER_AUTHENTICATION and record.outcome != EventOutcome.SUCCESS:
            keys = [f"authfail|actor|{record.actor}|{minute}"]
            address = record.participants[0].network_address if record.participants else None
            if address:
                keys.append(f"authfail|source|{address}|{minute}")
            for key in keys:
                self.windows.update_one({"_id": key}, {"$addToSet": {"items": event_key}}, upsert=True)

    def _union(self, prefix: str, since: datetime, until: datetime, *, hours: bool = False) -> set[str]:
        items: set[str] = set()
        for bucket in _buckets(since, until, hours=hours):
            document = self.windows.find_one({"_id": f"{prefix}|{bucket}"})
            if document is not None:
                items.update(document.get("items") or ())
        return items

    def count_distinct_studies(
        self, *, actor: str, tenant: str | None, since: datetime, until: datetime
    ) -> int:
        return len(self._union(f"studies|{tenant}|{actor}", since, until))

    def count_authentication_failures(
        self, *, actor: str | None, source_address: str | None, since: datetime, until: datetime
    ) -> int:
        prefix = (
            f"authfail|source|{source_address}" if source_address is not None else f"authfail|actor|{actor}"
        )
        return len(self._union(prefix, since, until))

    def last_alert_time(self, *, rule: str, subject: str) -> datetime | None:
        document = self.alerts.find_one({"rule": rule, "subject": subject}, sort=[("at", DESCENDING)])
        return None if document is None else document["at"]

    def last_restriction_lift(self, *, actor: str, tenant: str | None, patient_key: str) -> datetime | None:
        document = self.windows.find_one({"_id": f"lifted|{tenant}|{actor}|{patient_key}"}) or {}
        lifted, undone = document.get("at"), document.get("undone")
        return lifted if lifted is not None and (undone is None or undone < lifted) else None

    def count_patient_key_lookups(
        self, *, actor: str, tenant: str | None, since: datetime, until: datetime
    ) -> int:
        return len(self._union(f"patientkeys|{tenant}|{actor}", since, until, hours=True))
