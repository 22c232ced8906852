"""Attributes Table E.1-1 does not list, judged by what their name says they hold.

PS3.15 E.1.1 Note 1 leaves identifying information in "new Standard Attributes" and in standard
attributes the table does not name to the de-identifier. The table cannot list what a later edition
adds, so the walk reads the attribute's keyword in pydicom's dictionary and acts on what it says:

* a person's name, a birth or death, an address, a telephone number or e-mail: removed;
* a description, comment or note (LO, SH): free text, replaced like other unlisted free text;
* an identifier (LO, SH keywords ending in ID, Identifier or Number): a keyed pseudonym, so that
  equal values stay equal (Stack ID groups the frames of an enhanced MR; Optical Path Identifier is
  referenced from elsewhere in a slide) while the value itself goes.

CS is left alone: its values are codes (Modality, enumerated "ID"s such as Study Status ID), and a
name in capitals would pass its repertoire anyway. Labels and names of things (Sequence Name, Segment
Label, Beam Name) are kept: they name protocols and objects, not people.
"""

from __future__ import annotations

import re
from enum import Enum
from functools import lru_cache

from pydicom.datadict import dictionary_has_tag, keyword_for_tag


class UnlistedKind(Enum):
    """What an unlisted attribute's keyword says it holds."""

    PERSONAL = "personal"
    DESCRIPTION = "description"
    IDENTIFIER = "identifier"
    OTHER = "other"


_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|$)|[A-Z]?[a-z]+|\d+")
_PERSONAL_WORDS = frozenset({"Birth", "Death", "Address", "Telephone", "Phone", "Telecom", "Email", "Mail"})
#: Words that, with "Name", make a person's name (Contact Display Name, Hanging Protocol User Group Name).
_PERSON_WORDS = frozenset(
    {
        "Person",
        "Patient",
        "Physician",
        "Physicians",
        "Operator",
        "Operators",
        "Owner",
        "Author",
        "Reviewer",
        "Observer",
        "Performer",
        "Recipient",
        "Recipients",
        "Contact",
        "Responsible",
        "Mother",
        "Evaluator",
        "User",
        "Requester",
        "Sponsor",
        "Investigator",
        "Signer",
        "Approver",
        "Interpreter",
        "Transcriber",
    }
)
_DESCRIPTION_WORDS = frozenset({"Description", "Comment", "Comments", "Note", "Notes"})
_IDENTIFIER_ENDINGS = ("ID", "IDs", "Identifier", "Identifiers", "Number", "Numbers")
_NAMED_TEXT_VRS = frozenset({"LO", "SH"})


@lru_cache(maxsize=4096)
def unlisted_kind(tag: int, vr: str) -> UnlistedKind:
    """What the standard attribute ``tag`` (handled as ``vr``) holds, by its keyword."""
    if not dictionary_has_tag(tag):
        return UnlistedKind.OTHER
    keyword = keyword_for_tag(tag)
    words = set(_WORDS.findall(keyword))
    names_someone = bool(words & {"Name", "Names"}) and bool(words & _PERSON_WORDS)
    if words & _PERSONAL_WORDS or names_someone:
        return UnlistedKind.PERSONAL
    if vr not in _NAMED_TEXT_VRS:
        return UnlistedKind.OTHER
    if words & _DESCRIPTION_WORDS:
        return UnlistedKind.DESCRIPTION
    if keyword.endswith(_IDENTIFIER_ENDINGS):
        return UnlistedKind.IDENTIFIER
    return UnlistedKind.OTHER
