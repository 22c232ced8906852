"""The event-time bounds of an auditor's query (``since``, ``until``): ISO 8601 times, or dates.

A date names a whole UTC day whichever bound it is: ``since=2026-11-23`` starts at 00:00 UTC and
``until=2026-11-23`` ends with that day (records before 2026-11-24T00:00Z), so the same date in both
asks for that day. A time is an instant: ``since`` is inclusive, ``until`` exclusive. A time without
an offset is UTC. Numbers are refused: pydantic reads them as Unix seconds, so a DICOM-style date
(``20261123``) silently meant 1970-08-23.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Final

from pydantic import BeforeValidator

_DATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NUMBER: Final = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?")
TIME_FORMS: Final = "an ISO 8601 time (2026-11-23T08:00:00Z; UTC without an offset) or a date (2026-11-23)"


class TimeBoundError(ValueError):
    """Bounds that name no instant in UTC (``bad_time``) or an empty range (``bad_range``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _not_a_number(value: object) -> object:
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        raise ValueError(f"expected {TIME_FORMS}, not a number")
    return value


def _until_end_of_day(value: object) -> object:
    """``until=<date>`` as the start of the next day (exclusive), so the date's own day is included."""
    value = _not_a_number(value)
    if not (isinstance(value, str) and _DATE.fullmatch(value)):
        return value
    try:
        day = date.fromisoformat(value)
    except ValueError:
        return value  # not a calendar date: pydantic's own refusal says so
    if day == date.max:  # 9999-12-31 has no next day; nothing is stored after its last millisecond
        return datetime.max.replace(tzinfo=UTC)
    return datetime.combine(day + timedelta(days=1), time.min, tzinfo=UTC)


#: ``since``: a time, or a date meaning its 00:00 UTC (pydantic already reads a date so).
SinceTime = Annotated[datetime, BeforeValidator(_not_a_number)]
#: ``until``: a time, or a date meaning the end of that day.
UntilTime = Annotated[datetime, BeforeValidator(_until_end_of_day)]


def utc_range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """Both bounds in UTC, ``since`` strictly before ``until`` (the range is half-open)."""
    first, end = _utc(since), _utc(until)
    if first is not None and end is not None and first >= end:
        raise TimeBoundError(
            "bad_range",
            "since must be before until (since is inclusive, until exclusive; until=<date> includes "
            "that whole day, so since and until may be the same date)",
        )
    return first, end


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is past the last datetime in UTC
        raise TimeBoundError(
            "bad_time", "since and until must be times between the years 1 and 9999 in UTC"
        ) from None
