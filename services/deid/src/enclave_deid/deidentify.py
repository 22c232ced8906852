"""PS3.15 de-identification of one pydicom dataset: one walk, in place, no pixel decode.

The table and options are data (``profiles``); pydicom parses and writes. Hand-written here, because no
library does it with keyed, tenant-scoped and restart-stable results: the single recursive walk that
applies the resolved actions, UID remapping through a keyed HMAC, the per-patient date shift, pseudonyms
and the linkage record, private-attribute filtering by creator, and the de-identification marks.

The walk reads values from pydicom's raw elements where it can (UIDs, dates) and leaves every element it
keeps raw, so writing costs no more than a plain read-and-write. Pixel Data is not decoded: only the bits
outside the stored value, where a retired overlay may be embedded, are cleared (``pixel_bits``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache, partial
from io import BytesIO
from typing import NamedTuple, Protocol

from pydicom._uid_dict import UID_dictionary  # what pydicom.uid re-exports (outside its __all__)
from pydicom.datadict import get_entry, keyword_for_tag, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from enclave_deid.pixel_bits import PIXEL_DATA, clear_unused_pixel_bits
from enclave_deid.policy import DeidPolicy, MethodCode
from enclave_deid.profile_supplement import TABLE_EDITION
from enclave_deid.profiles import COMBINED_CHOICE, ActionCode, ResolvedProfile, resolve_profile
from enclave_deid.unlisted import UnlistedKind, unlisted_kind


class PseudonymKeys(Protocol):
    """Keyed, tenant-scoped derivations (HMAC); the keys never leave the implementation."""

    def pseudonym(self, tenant: str, kind: str, value: str) -> str: ...

    def uid(self, tenant: str, value: str) -> str: ...

    def date_shift_days(self, tenant: str, patient_pseudonym: str) -> int: ...


@dataclass(frozen=True)
class DeidContext:
    """What the caller knows about the instance beyond its bytes."""

    tenant: str


class AppliedAction(NamedTuple):
    """One action taken: the path of tags (sequences down to the attribute) and the action code applied."""

    path: tuple[int, ...]
    action: str


@dataclass(frozen=True)
class LinkageRecord:
    """Pseudonym -> original identifiers. Holds PHI: store it encrypted, read it only through break-glass."""

    tenant: str
    patient_pseudonym: str
    patient_id: str
    patient_name: str
    issuer_of_patient_id: str
    date_shift_days: int | None
    uids: dict[str, str]  # pseudonymous UID -> original, for the study, series and instance

    def __repr__(self) -> str:
        return f"LinkageRecord(tenant={self.tenant!r}, patient_pseudonym={self.patient_pseudonym!r}, <PHI>)"


@dataclass
class DeidResult:
    """The de-identified dataset (the input, changed in place) and what was done to it."""

    dataset: Dataset
    actions: list[AppliedAction]
    method_codes: tuple[MethodCode, ...]
    patient_pseudonym: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    linkage: LinkageRecord = field(repr=False)


# Attributes whose UIDs name a class, a transfer syntax or an implementation, never an instance.
_CLASS_UID_TAGS = frozenset(
    {
        0x00020002,  # MediaStorageSOPClassUID
        0x00020010,  # TransferSyntaxUID
        0x00020012,  # ImplementationClassUID
        0x00080016,  # SOPClassUID
        0x00081150,  # ReferencedSOPClassUID
        0x0008010C,  # CodingSchemeUID
        0x00041510,  # ReferencedSOPClassUIDInFile
        0x00041512,  # ReferencedTransferSyntaxUIDInFile
        0x0004151A,  # ReferencedRelatedGeneralSOPClassUIDInFile
    }
)
_UID_TAGS = frozenset({0x00080018, 0x0020000D, 0x0020000E})
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_ISSUER_OF_PATIENT_ID = 0x00100021
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_SPECIFIC_CHARACTER_SET = 0x00080005
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_DUMMY_TEXT = "REMOVED"
#: Unlisted attributes removed whatever their tag: person names, and URLs/URIs (a RetrieveURL carries
#: the original Study Instance UID, a RetrieveURI whatever query the sender put in it).
_UNLISTED_REMOVED_VRS = frozenset({"PN", "UR"})
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
#: Unlisted free text, replaced with a dummy (kept present: Type 1 in SR content items and graphic
#: text objects): reports (TextValue), annotations (UnformattedTextValue), comments. Table E.1-1 leaves
#: them to the sequences that hold them, and the Basic Profile's D on those sequences cannot keep them.
_UNLISTED_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})
#: Unlisted attributes removed by tag: Encrypted Attributes Sequence (original attributes, encrypted
#: for another recipient).
_UNLISTED_REMOVED_TAGS = frozenset({0x04000500})
#: Maximum length of one value of the text VRs an identifier pseudonym replaces (PS3.5 6.2).
_MAX_LENGTH = {"SH": 16, "LO": 64}
_OVERLAY_DATA = 0x60003000
#: The shape of one value of each VR whose character repertoire is constrained (PS3.5 6.2), padding
#: aside. A value the walk would release as it is must have it: text in a DS, IS, AS, date, time or
#: UID is free text in disguise (``_Walker.release_as_is``). Lengths are not checked (vendors write
#: longer DS values, and digits carry no more than a valid number does), nor are the zero padding of
#: an age (22Y for 022Y) and the pre-3.0 forms PS3.5 asks readers to accept (YYYY.MM.DD, HH:MM:SS):
#: they hold no text. CS is not checked: its repertoire has the upper-case letters and space, so a
#: name passes it, and vendors' lower-case codes in Type 1 attributes (Modality) would be blanked.
_VALUE_SHAPES = {
    "DS": re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"),
    "IS": re.compile(r"[+-]?\d+"),
    "AS": re.compile(r"\d{1,3}[DWMY]?"),
    "DA": re.compile(r"\d{8}|\d{4}\.\d{2}\.\d{2}"),
    "DT": re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"),
    "TM": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?|\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?"),
    "UI": re.compile(r"\d+(\.\d+)*"),
}
_DUMMY_STRINGS = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000D",
    "IS": "0",
    "DS": "0",
}
# Binary dummies are zeros, identical in either byte order: the width of one value of each VR.
_ZERO_WIDTH = {
    "US": 2,
    "SS": 2,
    "UL": 4,
    "SL": 4,
    "FL": 4,
    "AT": 4,
    "FD": 8,
    "UV": 8,
    "SV": 8,
    "OB": 2,
    "OW": 2,
}
_ZERO_WIDTH.update({"OD": 8, "OF": 4, "OL": 4, "OV": 8, "UN": 2})
_ZERO_VALUES = {"US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "AT": 0, "FD": 0.0, "UV": 0, "SV": 0}


def deidentify(dataset: Dataset, policy: DeidPolicy, keys: PseudonymKeys, context: DeidContext) -> DeidResult:
    """De-identify ``dataset`` in place under ``policy`` (PS3.15 Basic Profile plus the policy's options).

    Raises ``pixel_bits.UnclearablePixelBits`` (a ValueError), with nothing changed, when Pixel Data
    declares an embedded overlay that cannot be cleared (``burned_in`` quarantines those first).
    """
    if not context.tenant:
        raise ValueError("context.tenant is empty; a tenant id is required to scope pseudonyms")
    if _SOP_INSTANCE_UID not in dataset:
        raise ValueError(
            "SOPInstanceUID (0008,0018) is missing; only storable instances can be de-identified"
        )
    walker = _Walker(policy, resolve_profile(policy), keys, context.tenant)
    # Before the walk, which removes the overlay groups that say where an embedded overlay is.
    if clear_unused_pixel_bits(dataset):
        walker.actions.append(AppliedAction((PIXEL_DATA,), ActionCode.C.value))
    original = walker.identify_patient(dataset)
    instance_tags = (_STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, _SOP_INSTANCE_UID)
    original_uids = {tag: walker.text(dataset, tag) for tag in instance_tags}
    walker.walk(dataset, ())
    _rebuild_file_meta(dataset, walker)
    _mark(dataset, policy)
    mapped = {tag: walker.map_uid(value) if value else "" for tag, value in original_uids.items()}
    uids = {mapped[tag]: value for tag, value in original_uids.items() if value}
    linkage = LinkageRecord(
        tenant=context.tenant,
        patient_pseudonym=walker.patient_pseudonym,
        patient_id=original[0],
        patient_name=original[1],
        issuer_of_patient_id=original[2],
        date_shift_days=walker.shift_days,
        uids=uids,
    )
    return DeidResult(
        dataset=dataset,
        actions=walker.actions,
        method_codes=policy.method_codes,
        patient_pseudonym=walker.patient_pseudonym,
        study_instance_uid=mapped[_STUDY_INSTANCE_UID],
        series_instance_uid=mapped[_SERIES_INSTANCE_UID],
        sop_instance_uid=mapped[_SOP_INSTANCE_UID],
        linkage=linkage,
    )


def _raw_text(elem: DataElement | RawDataElement) -> list[str]:
    """Values of a string element without pydicom's conversion (ASCII VRs: UI, DA, DT, TM)."""
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        text = value.decode("ascii", errors="replace").rstrip("\x00 ")
        return [part.strip() for part in text.split("\\")] if text else []
    if isinstance(value, (list, MultiValue)):
        return ["" if v is None else str(v).strip() for v in value]
    text = str(value).strip()
    return [text] if text else []


@dataclass(frozen=True)
class _Identifiers:
    """What Clean Descriptors removes from the text it keeps: the instance's identifying words (one
    pattern) and the days of its identifying dates, however text writes them."""

    words: re.Pattern[str] | None
    days: frozenset[date]

    def scrub(self, text: str) -> str:
        """``text`` with each identifying word and each written identifying day replaced by ``*``."""
        if self.words is not None:
            text = self.words.sub("*", text)
        if self.days:
            for pattern, orders in _WRITTEN_DATES:
                text = pattern.sub(partial(_scrub_day, orders=orders, days=self.days), text)
        return text


class _Walker:
    """State of one de-identification: resolved actions, keys, UID cache and the actions log."""

    def __init__(
        self, policy: DeidPolicy, profile: ResolvedProfile, keys: PseudonymKeys, tenant: str
    ) -> None:
        self.policy = policy
        self.profile = profile
        self.keys = keys
        self.tenant = tenant
        self.actions: list[AppliedAction] = []
        self.uid_cache: dict[str, str] = {}
        self.patient_pseudonym = ""
        self.shift_days: int | None = None
        self.identifiers: _Identifiers | None = None
        #: Overlay Data removed (the Basic Profile's X; Clean Graphics is not implemented): the whole
        #: overlay group goes with it, its description and label text included.
        self.overlays_removed = profile.action_for(_OVERLAY_DATA) is ActionCode.X
        self.safe_private = (
            {
                (item.creator.strip().upper(), item.group, item.element)
                for item in policy.safe_private_attributes
            }
            if policy.retain_safe_private
            else set()
        )

    # -- identity -----------------------------------------------------------------------------------

    def text(self, dataset: Dataset, tag: int) -> str:
        if tag not in dataset:
            return ""
        if tag in _UID_TAGS:
            values = _raw_text(dataset.get_item(tag))
            return values[0] if values else ""
        value = _decoded(dataset, tag).value
        if value is None:
            return ""
        return str(value).strip()

    def identify_patient(self, dataset: Dataset) -> tuple[str, str, str]:
        """Derive the patient pseudonym (and the date shift) before the walk removes the identifiers."""
        patient_id = self.text(dataset, _PATIENT_ID)
        patient_name = self.text(dataset, _PATIENT_NAME)
        issuer = self.text(dataset, _ISSUER_OF_PATIENT_ID)
        if patient_id:
            basis = f"{issuer}|{patient_id}" if issuer else patient_id
            self.patient_pseudonym = self.keys.pseudonym(self.tenant, "patient", basis)
        elif patient_name:
            self.patient_pseudonym = self.keys.pseudonym(self.tenant, "patient_name", patient_name)
        else:
            study = self.text(dataset, _STUDY_INSTANCE_UID)
            self.patient_pseudonym = self.keys.pseudonym(self.tenant, "anonymous_study", study)
        if len(self.patient_pseudonym) > 64:
            raise ValueError("pseudonym longer than 64 characters; LO and PN allow at most 64")
        if self.policy.retain_longitudinal_modified_dates:
            self.shift_days = self.keys.date_shift_days(self.tenant, self.patient_pseudonym)
        if self.policy.clean_descriptors or self.policy.retain_patient_characteristics:
            self.identifiers = self._collect_identifiers(dataset)
        return patient_id, patient_name, issuer

    def _collect_identifiers(self, dataset: Dataset) -> _Identifiers:
        """Identifying words and days of this instance (what the output does not carry as it is, at any
        depth), to clean descriptors."""
        words: set[str] = set()
        days: set[date] = set()
        for vr, value in self._identifying_values(dataset):
            if vr not in ("DA", "DT"):
                words.update(_word_patterns(value, vr))
            elif (day := _full_date(value)) is not None:
                days.add(day)
                words.add(f"{day:%Y%m%d}")  # as DICOM writes it, wherever it occurs (20190312101112)
            elif _is_word(value):
                words.add(re.escape(value))  # a partial or malformed date, as written
        # The longest first (a whole name before its parts), ties in a fixed order: instances of one
        # series give the same pattern text, which re's cache then compiles once.
        ordered = sorted(words, key=lambda word: (-len(word), word))
        pattern = re.compile("|".join(ordered), re.IGNORECASE) if ordered else None
        return _Identifiers(pattern, frozenset(days))

    def _identifying_values(self, dataset: Dataset) -> Iterator[tuple[str, str]]:
        """(VR, value) of what the output loses, read before the walk changes it, in every sequence item:
        an identifier held only in a sequence (Other Patient IDs, Request Attributes) names the patient
        as well as one at the top. Private attributes are not read: they are removed, and what they hold
        is not known (it could be ordinary words)."""
        for key, elem in list(dataset.items()):
            tag = int(key)
            if tag >> 16 & 1:
                continue
            vr = _walked_vr(tag, elem.VR)
            if vr == "SQ":
                for item in dataset[tag].value or ():
                    yield from self._identifying_values(item)
            elif vr is not None and self._loses_verbatim(tag, vr):
                values = _raw_text(elem) if vr in ("DA", "DT") else _string_values(_decoded(dataset, tag))
                yield from ((vr, value.strip()) for value in values if value.strip())

    def _loses_verbatim(self, tag: int, vr: str) -> bool:
        """Whether the walk removes or changes this value, so that a descriptor repeating it would leak
        it: text the profile removes or replaces (not descriptors it cleans), dates it does not keep
        (shifted ones too: the original in a description would undo the shift), unlisted person names,
        dates and what ``unlisted`` removes or pseudonymises."""
        action = self.profile.action_for(tag)
        if action is None:
            return vr in ("PN", "DA", "DT") or unlisted_kind(tag, vr) in (
                UnlistedKind.PERSONAL,
                UnlistedKind.IDENTIFIER,
            )
        if vr in ("DA", "DT"):
            return action is not ActionCode.K
        return vr in _TEXT_VRS and action not in (ActionCode.K, ActionCode.C, ActionCode.U)

    # -- UIDs -----------------------------------------------------------------------------------------

    def map_uid(self, value: str) -> str:
        """The tenant's pseudonymous UID for ``value``; well-known standard UIDs stay as they are."""
        mapped = self.uid_cache.get(value)
        if mapped is None:
            mapped = value if value in UID_dictionary else self.keys.uid(self.tenant, value)
            self.uid_cache[value] = mapped
        return mapped

    def _remap_uids(self, dataset: Dataset, tag: int, elem: DataElement | RawDataElement) -> None:
        values = _raw_text(elem)
        mapped = [self.map_uid(value) for value in values if value]
        _put_text(dataset, tag, "UI", mapped, elem)

    # -- the walk -------------------------------------------------------------------------------------

    def walk(self, dataset: Dataset, path: tuple[int, ...]) -> None:
        private: list[int] = []
        for key, elem in list(dataset.items()):
            tag = int(key)  # BaseTag compares in Python; a plain int keeps the set lookups below in C
            group = tag >> 16
            if group & 1:
                private.append(tag)
                continue
            if self.overlays_removed and 0x6000 <= group <= 0x601E:
                del dataset[tag]
                self.actions.append(AppliedAction((*path, tag), "X"))
                continue
            action = self.profile.action_for(tag)
            vr = _walked_vr(tag, elem.VR)
            if vr is None:
                del dataset[tag]
                self.actions.append(AppliedAction((*path, tag), "X"))
                continue
            if action is None:
                self._unlisted(dataset, tag, elem, vr, path)
            else:
                self._apply(dataset, tag, elem, vr, COMBINED_CHOICE.get(action, action), path)
        if private:
            self._private(dataset, private, path)

    def _unlisted(
        self, dataset: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, path: tuple[int, ...]
    ) -> None:
        """Attributes Table E.1-1 does not list: removed when nothing vouches for them (group lengths, the
        command group, unknown tags, names, URLs) or their name says they identify someone (``unlisted``);
        dates shifted (Modified Dates) or replaced by a dummy, as the table does with the dates it lists;
        free text replaced with a dummy; identifiers pseudonymised; everything else kept if valid for its VR."""
        here = (*path, tag)
        kind = unlisted_kind(tag, vr)
        if (
            tag & 0xFFFF == 0
            or tag >> 16 == 0
            or not _is_standard(tag)
            or vr in _UNLISTED_REMOVED_VRS
            or tag in _UNLISTED_REMOVED_TAGS
            or kind is UnlistedKind.PERSONAL
        ):
            del dataset[tag]
            self.actions.append(AppliedAction(here, "X"))
        elif vr in ("DA", "DT") and _is_empty(elem):
            pass  # an unknown date stays unknown: a dummy would turn it into a concrete fake one
        elif vr in ("DA", "DT"):
            self._dummy(dataset, tag, elem, vr, path)
            self.actions.append(AppliedAction(here, "D" if self.shift_days is None else "C"))
        elif vr in _UNLISTED_FREE_TEXT_VRS or (
            kind is UnlistedKind.DESCRIPTION and not self.policy.clean_descriptors
        ):
            _put_dummy(dataset, tag, vr, elem)
            self.actions.append(AppliedAction(here, "D"))
        elif kind is UnlistedKind.DESCRIPTION:
            self._clean(dataset, tag, elem, vr, path)
            self.actions.append(AppliedAction(here, "C"))
        elif (
            kind is UnlistedKind.IDENTIFIER
            and self.policy.retain_device_identity
            and "Device" in keyword_for_tag(tag)
        ):
            # Retain Device Identity keeps a device's identifiers, as the table's K cells do for the
            # ones it lists (Device Serial Number, Secondary Capture Device ID).
            if (applied := self.release_as_is(dataset, tag, elem, vr)) is not None:
                self.actions.append(AppliedAction(here, applied))
        elif kind is UnlistedKind.IDENTIFIER:
            self._pseudonymise_identifier(dataset, tag, elem, vr)
            self.actions.append(AppliedAction(here, "pseudonym"))
        elif vr == "UI" and not self.policy.retain_uids and tag not in _CLASS_UID_TAGS:
            self._remap_uids(dataset, tag, elem)
        elif vr == "SQ":
            self._recurse(dataset, tag, path)
        elif (applied := self.release_as_is(dataset, tag, elem, vr)) is not None:
            self.actions.append(AppliedAction((*path, tag), applied))

    def _apply(
        self,
        dataset: Dataset,
        tag: int,
        elem: DataElement | RawDataElement,
        vr: str,
        action: ActionCode,
        path: tuple[int, ...],
    ) -> None:
        here = (*path, tag)
        if tag in (_PATIENT_ID, _PATIENT_NAME):
            if action is not ActionCode.K:
                _put_text(dataset, tag, vr, [self._pseudonym_for(dataset, tag, path)], elem)
                self.actions.append(AppliedAction(here, "pseudonym"))
            return
        applied = action.value
        if vr == "UN" and action in (ActionCode.K, ActionCode.C):
            action = ActionCode.X  # a tag pydicom does not know, read without a VR: it cannot be checked
            applied = "X"
        if action is ActionCode.X:
            del dataset[tag]
        elif action is ActionCode.K:
            if vr == "SQ":
                self._recurse(dataset, tag, path)
            else:
                applied = self.release_as_is(dataset, tag, elem, vr) or applied
        elif action is ActionCode.Z:
            _put_empty(dataset, tag, vr, elem)
        elif action is ActionCode.U or (action is ActionCode.X_Z_U_STAR and vr == "UI"):
            if vr == "UI":
                self._remap_uids(dataset, tag, elem)
            elif vr == "SQ":
                self._recurse(dataset, tag, path)
            else:
                _put_empty(dataset, tag, vr, elem)
        elif action is ActionCode.X_Z_U_STAR:
            if vr == "SQ":
                self._recurse(dataset, tag, path)
            else:
                _put_empty(dataset, tag, vr, elem)
        elif action is ActionCode.D:
            self._dummy(dataset, tag, elem, vr, path)
        elif action is ActionCode.C:
            self._clean(dataset, tag, elem, vr, path)
        self.actions.append(AppliedAction(here, applied))

    def release_as_is(
        self, dataset: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str
    ) -> str | None:
        """Keep a value the walk does not change, unless it is malformed for its VR (``_VALUE_SHAPES``);
        then the action taken instead (None when the value is kept).

        A malformed UID is remapped (U), value by value: references keep pointing at each other, and
        UIDs are mostly Type 1. Any other malformed value is made zero-length (Z). The IOD is not known
        here; zero-length is valid wherever removal is (Type 3) and for Type 2 too, and a Type 1 value
        of that kind was not valid either. A dummy number would pass a made-up measurement (a pixel
        spacing of 0) off as a real one.
        """
        shape = _VALUE_SHAPES.get(vr)
        if shape is None or not _malformed(elem, shape):
            return None
        if vr == "UI":
            values = [
                value if not value or shape.fullmatch(value) else self.map_uid(value)
                for value in _raw_text(elem)
            ]
            _put_text(dataset, tag, vr, values, elem)
            return ActionCode.U.value
        _put_empty(dataset, tag, vr, elem)
        return ActionCode.Z.value

    def _pseudonymise_identifier(
        self, dataset: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str
    ) -> None:
        """An unlisted identifier (LO, SH): each value becomes the tenant's keyed pseudonym of it, cut to
        the VR's length, so equal values stay equal and none is released."""
        width = _MAX_LENGTH[vr]
        values = [
            self.keys.pseudonym(self.tenant, "identifier", value.strip())[:width] if value.strip() else ""
            for value in _string_values(_decoded(dataset, tag))
        ]
        _put_text(dataset, tag, vr, values, elem)

    def _pseudonym_for(self, dataset: Dataset, tag: int, path: tuple[int, ...]) -> str:
        if not path:
            return self.patient_pseudonym
        value = self.text(dataset, tag)
        if not value:
            return ""
        kind = "patient" if tag == _PATIENT_ID else "patient_name"
        return self.keys.pseudonym(self.tenant, kind, value)

    def _dummy(
        self, dataset: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, path: tuple[int, ...]
    ) -> None:
        if vr == "SQ":
            self._recurse(dataset, tag, path)
        elif vr == "UI":
            self._remap_uids(dataset, tag, elem)
        elif vr in ("DA", "DT") and self.shift_days is not None:
            self._shift(dataset, tag, elem, vr)
        else:
            _put_dummy(dataset, tag, vr, elem)

    def _clean(
        self, dataset: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, path: tuple[int, ...]
    ) -> None:
        """C: keep the meaning, drop the identity: dates shifted, descriptors scrubbed, sequences walked."""
        if vr == "SQ":
            self._recurse(dataset, tag, path)
        elif vr in ("DA", "DT"):
            if self.shift_days is None:
                _put_empty(dataset, tag, vr, elem)
            else:
                self._shift(dataset, tag, elem, vr)
        elif vr == "UI":
            self._remap_uids(dataset, tag, elem)
        elif vr in _TEXT_VRS and vr != "CS":
            cleaned = [self._scrub(value) for value in _string_values(dataset[tag])]
            dataset[tag] = DataElement(tag, vr, cleaned if len(cleaned) != 1 else cleaned[0])
        else:
            self.release_as_is(dataset, tag, elem, vr)  # a time kept under Modified Dates

    def _scrub(self, text: str) -> str:
        return text if self.identifiers is None else self.identifiers.scrub(text)

    def _shift(self, dataset: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str) -> None:
        assert self.shift_days is not None
        shifted = [_shift_date(value, vr, self.shift_days) for value in _raw_text(elem)]
        _put_text(dataset, tag, vr, shifted, elem)

    def _recurse(self, dataset: Dataset, tag: int, path: tuple[int, ...]) -> None:
        sequence = dataset[tag].value
        for item in sequence or ():
            self.walk(item, (*path, tag))

    def _private(self, dataset: Dataset, tags: Iterable[int], path: tuple[int, ...]) -> None:
        """Private attributes: removed unless the Retain Safe Private allow-list names creator and element."""
        kept_blocks: set[int] = set()
        removed: list[int] = []
        for tag in tags:
            element = tag & 0xFFFF
            if self.safe_private and element >= 0x1000:
                creator_tag = (tag & 0xFFFF0000) | (element >> 8)
                creator_text = self.text(dataset, creator_tag) if creator_tag in dataset else ""
                creator = creator_text.upper()
                elem = dataset.get_item(tag)
                vr = elem.VR
                if vr is None or vr == "UN":  # implicit VR: pydicom's private dictionary may know it
                    try:
                        vr = private_dictionary_VR(tag, creator_text)
                    except KeyError:
                        vr = None
                # An element whose VR is unknown could be a UID or a sequence: it is not kept.
                if vr is not None and (creator, tag >> 16, element & 0xFF) in self.safe_private:
                    kept_blocks.add(creator_tag)
                    if vr == "UI" and not self.policy.retain_uids:
                        self._remap_uids(dataset, tag, elem)
                    elif vr == "SQ":
                        self._recurse(dataset, tag, path)
                    else:
                        self.release_as_is(dataset, tag, elem, vr)
                    self.actions.append(AppliedAction((*path, tag), "K"))
                    continue
            removed.append(tag)
        for tag in removed:
            if tag not in kept_blocks:
                del dataset[tag]
                self.actions.append(AppliedAction((*path, tag), "X"))


def _decoded(dataset: Dataset, tag: int) -> DataElement:
    """The element with its value decoded, leaving the dataset's raw element in place (``dataset[tag]``
    would replace it, and a replaced element can no longer be written as the bytes read)."""
    elem = dataset.get_item(tag)
    if isinstance(elem, RawDataElement):
        return convert_raw_data_element(elem, encoding=dataset.original_character_set, ds=dataset)
    return elem


def _string_values(elem: DataElement) -> list[str]:
    """The values of a decoded element as strings, one per value of a multi-valued one."""
    values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    return [str(value or "") for value in values]


def _malformed(elem: DataElement | RawDataElement, shape: re.Pattern[str]) -> bool:
    """Whether a value of the element (padding aside; empty values are fine) lacks ``shape``; bytes
    that are not ASCII never have it (they read as replacement characters)."""
    return any(text and shape.fullmatch(text) is None for text in _raw_text(elem))


def _walked_vr(tag: int, vr: str | None) -> str | None:
    """The VR the walk handles an element as: the dictionary's when the file gives none (implicit VR, UN,
    or the dictionary's own "OB or OW" that pydicom gives an undefined-length value read without a VR)
    or another text VR (a date written as LO is a date, under a date's rules); None for a sequence or
    binary value under a VR its tag cannot have (a sequence as OB), which cannot be walked and is removed."""
    allowed = _dictionary_vrs(tag)
    if vr is None or vr == "UN" or " or " in vr:
        return allowed[0] if len(allowed) == 1 else (vr or "UN")
    if allowed and vr not in allowed:
        if len(allowed) == 1 and vr in _STRING_VRS and allowed[0] in _STRING_VRS:
            return allowed[0]
        return None
    return vr


def _encoding(like: DataElement | RawDataElement) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a raw element read from bytes; None for elements built in memory."""
    if isinstance(like, RawDataElement):
        return like.is_implicit_VR, like.is_little_endian
    return None


def _raw(tag: int, vr: str, value: bytes, encoding: tuple[bool, bool]) -> RawDataElement:
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, encoding[0], encoding[1], True, False)


def _put_text(
    dataset: Dataset, tag: int, vr: str, values: list[str], like: DataElement | RawDataElement
) -> None:
    """Replace an element by string values; pre-encoded (ASCII) when the dataset was read from bytes."""
    encoding = _encoding(like)
    if encoding is not None and all(value.isascii() for value in values):
        payload = "\\".join(values).encode("ascii")
        if len(payload) % 2:
            payload += b"\x00" if vr == "UI" else b" "
        dataset[tag] = _raw(tag, vr, payload, encoding)
    else:
        dataset[tag] = DataElement(tag, vr, values if len(values) != 1 else values[0])


def _is_empty(elem: DataElement | RawDataElement) -> bool:
    """No value (an empty or all-padding one): nothing to shift or replace."""
    value = elem.value
    if isinstance(value, bytes):
        return not value.strip(b" \x00")
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def _put_empty(dataset: Dataset, tag: int, vr: str, like: DataElement | RawDataElement) -> None:
    encoding = _encoding(like)
    if encoding is not None:
        dataset[tag] = _raw(tag, vr, b"", encoding)
    else:
        dataset[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else None)


def _put_dummy(dataset: Dataset, tag: int, vr: str, like: DataElement | RawDataElement) -> None:
    """D: a value that carries nothing, valid for the VR."""
    width = _ZERO_WIDTH.get(vr)
    if width is None:
        _put_text(dataset, tag, vr, [_DUMMY_STRINGS.get(vr, _DUMMY_TEXT)], like)
    elif _encoding(like) is not None:
        dataset[tag] = _raw(tag, vr, b"\x00" * width, _encoding(like))  # type: ignore[arg-type]
    else:
        dataset[tag] = DataElement(tag, vr, _ZERO_VALUES.get(vr, b"\x00" * width))


@lru_cache(maxsize=4096)
def _dictionary_vrs(tag: int) -> tuple[str, ...]:
    """The VRs the data dictionary allows for ``tag`` ("US or SS" is two); () when it has none."""
    try:
        vr = get_entry(tag)[0]
    except KeyError:
        return ()
    return tuple(v.strip() for v in vr.split(" or ") if v.strip())


def _is_standard(tag: int) -> bool:
    """In pydicom's data dictionary, directly or as a repeater (e.g. overlay groups 60xx)."""
    return bool(_dictionary_vrs(tag))


#: What separates the words of an identifying value (PN components and groups included).
_WORD_SEPARATORS = re.compile(r"[\^=\s,./\\-]+")
#: What text puts between a family and a given name: nothing (山田太郎), a space, a comma, a middle dot.
_NAME_JOINER = r"[\s,.^\u30fb\u00b7]*"
#: Han, kana, Hangul (and their compatibility and half-width forms): scripts in which a two-character
#: name component (山田, 太郎, 민수) is common and a two-character word is not an abbreviation.
_CJK = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uffdc\U00020000-\U0003134f]"
)


def _is_word(word: str) -> bool:
    """Long enough to be scrubbed wherever it occurs: three characters, or two in a CJK script. Shorter
    Latin words (MR, WO, T1) are too ordinary: scrubbing them would blank descriptors, not names."""
    return len(word) >= 3 or (len(word) == 2 and _CJK.search(word) is not None)


def _word_patterns(value: str, vr: str) -> set[str]:
    """Regex alternatives for one identifying text value: the value and its words, and for a person name
    the family and given name of each component group written together."""
    words = {value, *_WORD_SEPARATORS.split(value)}
    patterns = {re.escape(word) for word in words if _is_word(word)}
    if vr == "PN":
        patterns.update(_name_patterns(value))
    return patterns


def _name_patterns(name: str) -> set[str]:
    """A PN's family and given names as text writes them, in either order and with or without a space
    (山田太郎, 山田 太郎, Tarou Yamada), once per component group (alphabetic, ideographic, phonetic):
    a name whose components are one character each (王^伟) is still caught as a whole."""
    patterns = set()
    for group in name.split("="):
        family, given = [*group.split("^"), ""][:2]
        family, given = family.strip(), given.strip()
        if family and given and _is_word(family + given):
            patterns.add(re.escape(family) + _NAME_JOINER + re.escape(given))
            patterns.add(re.escape(given) + _NAME_JOINER + re.escape(family))
    return patterns


_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(.*)$")
#: What may follow the date in a DT: a time (HHMMSS.FFFFFF, each part optional from the right) and a
#: UTC offset. Anything else (a range, text) is dropped, not carried into the shifted value.
_DT_REST = re.compile(r"^(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?([+-]\d{4})?$")


def _shift_date(value: str, vr: str, days: int) -> str:
    """Shift a DA or DT value by whole days; times and UTC offsets stay, so paired TM values stay coherent."""
    match = _DT.match(value)
    if not match:
        return ""
    year, month, day, rest = match.group(1), match.group(2), match.group(3), match.group(4)
    try:
        shifted = date(int(year), int(month or 1), int(day or 1)) + timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    if vr == "DA":
        return shifted.strftime("%Y%m%d")
    text = f"{shifted.year:04d}"
    if month:
        text += f"{shifted.month:02d}"
    if day:
        text += f"{shifted.day:02d}" + (rest.strip() if _DT_REST.match(rest.strip()) else "")
    return text


def _calendar_day(year: int, month: int, day: int) -> date | None:
    """The day, or None for one the calendar does not have (2019-02-30, month 13)."""
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _full_date(value: str) -> date | None:
    """The calendar day a DA or DT value names; None when it names only a year or month, or none."""
    match = _DT.match(value)
    if not match or not match.group(3):
        return None
    return _calendar_day(int(match.group(1)), int(match.group(2)), int(match.group(3)))


_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_MONTH_NAME = rf"(?<![a-z])({'|'.join(_MONTHS)})[a-z]*\.?"
_SEP = "[-/. ]"
#: Dates as free text writes them, with the groups holding (year, month, day): 2019-03-12, 12/03/2019,
#: 3.12.19, 12-MAR-2019, March 12th, 2019, 2019年3月12日. A numeric day and month are read in both
#: orders, since 03/12/2019 does not say which it uses. YYYYMMDD is matched as an identifying word.
_WRITTEN_DATES: tuple[tuple[re.Pattern[str], tuple[tuple[int, int, int], ...]], ...] = (
    (re.compile(rf"(?<!\d)(\d{{4}}){_SEP}(\d{{1,2}}){_SEP}(\d{{1,2}})(?!\d)"), ((1, 2, 3),)),
    (
        re.compile(rf"(?<!\d)(\d{{1,2}}){_SEP}(\d{{1,2}}){_SEP}(\d{{4}}|\d{{2}})(?!\d)"),
        ((3, 2, 1), (3, 1, 2)),
    ),
    (
        re.compile(rf"(?<!\d)(\d{{1,2}}){_SEP}?{_MONTH_NAME}{_SEP}?(\d{{4}}|\d{{2}})(?!\d)", re.IGNORECASE),
        ((3, 2, 1),),
    ),
    (
        re.compile(
            rf"{_MONTH_NAME}{_SEP}?(\d{{1,2}})(?:st|nd|rd|th)?,?{_SEP}?(\d{{4}})(?!\d)", re.IGNORECASE
        ),
        ((3, 1, 2),),
    ),
    (re.compile(r"(\d{4})\s*\u5e74\s*(\d{1,2})\s*\u6708\s*(\d{1,2})\s*\u65e5"), ((1, 2, 3),)),
)


def _scrub_day(match: re.Match[str], orders: tuple[tuple[int, int, int], ...], days: frozenset[date]) -> str:
    """``*`` for a written date that reads as one of ``days`` (a two-digit year in either century), the
    text as it was otherwise: a date that identifies no one (a protocol's version) is kept."""
    for year_group, month_group, day_group in orders:
        year, month = match.group(year_group), match.group(month_group)
        month_number = int(month) if month.isdigit() else _MONTHS.index(month[:3].upper()) + 1
        years = (int(year),) if len(year) == 4 else (1900 + int(year), 2000 + int(year))
        for full_year in years:
            if _calendar_day(full_year, month_number, int(match.group(day_group))) in days:
                return "*"
    return match.group(0)


_FILE_META_KEPT = frozenset({0x00020001, 0x00020002, 0x00020010})


def _rebuild_file_meta(dataset: Dataset, walker: _Walker) -> None:
    """File meta keeps only what the format needs; the instance UID follows the remapped SOP Instance UID.

    The 128-byte preamble goes too (written as zeros): its content is application-defined, e.g. the
    TIFF header of a dual-format file, and could carry anything.
    """
    dataset.preamble = None
    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        return
    for tag in list(meta.keys()):
        if tag not in _FILE_META_KEPT:
            del meta[tag]
    if 0x00020002 not in meta and "SOPClassUID" in dataset:
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    if _SOP_INSTANCE_UID in dataset:
        sop_instance = _raw_text(dataset.get_item(_SOP_INSTANCE_UID))
        meta[0x00020003] = DataElement(0x00020003, "UI", sop_instance[0] if sop_instance else "")
    meta[0x00020012] = DataElement(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID)
    meta[0x00020013] = DataElement(0x00020013, "SH", "ENCLAVE_DEID")


def _mark(dataset: Dataset, policy: DeidPolicy) -> None:
    """Add PatientIdentityRemoved, DeidentificationMethod(CodeSequence), LongitudinalTemporalInfoModified."""
    for tag, element in _marks(policy, dataset.original_encoding).items():
        dataset[tag] = element


@lru_cache(maxsize=128)
def _marks(
    policy: DeidPolicy, encoding: tuple[bool | None, bool | None]
) -> dict[int, DataElement | RawDataElement]:
    """The mark elements for a policy, encoded once per transfer-syntax encoding (raw elements are shared
    read-only between datasets; pydicom replaces, never mutates, an element on assignment)."""
    marks = Dataset()
    marks.PatientIdentityRemoved = "YES"
    marks.DeidentificationMethod = [f"PS3.15 {TABLE_EDITION} Table E.1-1"] + [
        code.meaning[:64] for code in policy.method_codes[1:]
    ]
    items = []
    for code in policy.method_codes:
        item = Dataset()
        item.CodeValue = code.value
        item.CodingSchemeDesignator = code.scheme
        item.CodeMeaning = code.meaning
        items.append(item)
    marks.DeidentificationMethodCodeSequence = Sequence(items)
    marks.LongitudinalTemporalInformationModified = (
        "MODIFIED" if policy.retain_longitudinal_modified_dates else "REMOVED"
    )
    implicit, little = encoding
    if implicit is None or little is None:
        return dict(marks.items())
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    write_dataset(buffer, marks)
    parsed = read_dataset(BytesIO(buffer.getvalue()), implicit, little)
    return dict(parsed.items())
