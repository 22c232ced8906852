"""An instance whose upload broke off is given up by Kafka time, never by the consumer's clock: only
once its partition holds a record appended ``abandon_after_ms`` after its newest chunk. Until then it
holds its partition's committed offset, as an instance still arriving must."""

from __future__ import annotations

from enclave_ingest.spool import OffsetTracker

P = ("enclave.upload.chunk.v1", 0)
HOUR_MS = 3_600_000


def test_an_instance_is_abandoned_only_by_a_record_appended_long_after_its_newest_chunk() -> None:
    tracker = OffsetTracker(abandon_after_ms=HOUR_MS)
    t0 = 1_700_000_000_000
    tracker.observe(P, 10, t0)
    broken = tracker.track("broken", 3, P, 10, t0)
    broken.received.add(0)
    tracker.observe(P, 11, t0 + 5)
    tracker.track("broken", 3, P, 11, t0 + 5).received.add(1)  # a second chunk: its clock restarts

    assert tracker.observe(P, 12, t0 + 5 + HOUR_MS - 1) == []  # a record just inside the window
    assert tracker.safe_offset(P) == 10  # still held back: it may yet complete
    assert tracker.observe(P, 13, t0 + 5 + HOUR_MS) == [broken]
    tracker.finish("broken")
    assert tracker.safe_offset(P) == 14


def test_other_partitions_and_complete_instances_are_never_abandoned() -> None:
    tracker = OffsetTracker(abandon_after_ms=HOUR_MS)
    elsewhere = tracker.track("elsewhere", 2, ("enclave.upload.chunk.v1", 1), 0, 0)
    elsewhere.received.add(0)
    complete = tracker.track("complete", 1, P, 0, 0)
    complete.received.add(0)  # complete, waiting to be stored: not abandoned
    assert tracker.observe(P, 1, 10 * HOUR_MS) == []


def test_a_consumer_far_behind_does_not_abandon_what_its_next_records_complete() -> None:
    """Read days later, the records keep their own timestamps: the next chunk is seconds after."""
    tracker = OffsetTracker(abandon_after_ms=HOUR_MS)
    t0 = 1_600_000_000_000
    pending = tracker.track("late", 2, P, 0, t0)
    pending.received.add(0)
    assert tracker.observe(P, 1, t0 + 2_000) == []
