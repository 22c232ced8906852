"""The revision of deid's output: which rules a released copy was made under.

**Bump ``DEID_REVISION`` whenever deid's output for the same input changes**: an attribute removed,
emptied, replaced or kept where it was not; a new quarantine rule; pixel bits cleared; the marks
(the profile edition). Not for a change that leaves every copy byte for byte as it was (a refactor, a
speed-up, a new limit that only refuses more). ``tests/test_revision.py`` pins the output of a few
instances to the current revision and fails, naming this constant, when it changes.

Each ``deidentified`` record holds the revision its copy was made under (records from before the
eighteenth session hold none: revision 0). ``enclave-deid-redo`` re-de-identifies the copies of
records below the current revision (docs/deidentification.md, "Redo released copies").
"""

from __future__ import annotations

from typing import Any

#: 1: the rules of the seventeenth session (Table E.1-1 of 2025b, unlisted dates shifted, free text
#: and URLs removed, malformed values emptied, bits outside the stored value cleared, the overlay
#: group removed, burned-in kinds by SOP class) and the first revision recorded.
DEID_REVISION = 1


def revision_of(record: dict[str, Any]) -> int:
    """The revision a record's copy was made under (0 for records that do not say)."""
    return int(record.get("revision") or 0)
