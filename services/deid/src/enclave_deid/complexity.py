"""Counting the data elements and sequence items of an instance before pydicom parses it.

pydicom holds each parsed data element and each sequence item as Python objects: about 0.4 KiB per
element and 1.3 KiB per (empty) item, whatever their size in bytes. An instance of a few MiB can
hold millions of them (89 KiB deflated held 1.5M items and took 2 GiB to parse: security hunt, F1),
so the instance-size limit alone does not bound deid's memory. ``count_elements`` walks the element
headers of the decrypted bytes the way pydicom 3's reader will read them, allocating nothing per
element, and stops as soon as the count passes the limit.

What is counted is what pydicom builds objects for: every data element (file meta included), every
sequence item, recursively. Items and fragments of encapsulated pixel data, and any other value of
undefined length read as bytes, are one element. A value that pydicom parses as a sequence only when
it is accessed (SQ of defined length, implicit VR or UN elements whose VR the dictionary says is SQ,
private values that start with an item tag) is counted as one: deid touches every element. The walk
follows pydicom where it is lenient (implicit/explicit VR detected per dataset and per item, an
invalid VR read as an implicit element, an item delimiter ending any dataset, a sequence item read
whatever its tag, a dataset of defined length read past its end) and stops where pydicom stops
(end of data). Deflated data is inflated once, bounded by the instance-size limit.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.datadict import dictionary_VR
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_TRANSFER_SYNTAX = 0x00020010
_KNOWN_VRS = frozenset(vr.encode("ascii") for vr in VR)
_LONG_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)


class TooManyElements(Exception):
    """The instance holds more than ``limit`` data elements and sequence items."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class NestedTooDeeply(Exception):
    """Sequences are nested deeper than the walk (and pydicom's recursive reader) can follow."""


class InflatesTooLarge(Exception):
    """The deflated dataset inflates to more than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def count_elements(data: bytes, limit: int, max_inflated_bytes: int) -> int:
    """The number of data elements and sequence items pydicom would build for ``data`` (a Part 10
    file, a file meta group without preamble, or a bare dataset), or :class:`TooManyElements` as soon
    as it passes ``limit``; :class:`InflatesTooLarge` when a deflated dataset inflates past
    ``max_inflated_bytes``; :class:`NestedTooDeeply` for sequences nested past Python's recursion
    limit. Malformed bytes end the walk where pydicom's reader would end (the parse decides)."""
    walker = _Walker(data, len(data), limit)
    try:
        position = 132 if data[128:132] == b"DICM" else 0
        # pydicom's read_partial: the file meta group, a command set, then the dataset
        position = walker.dataset(position, None, implicit=False, top=True, only_group=0x0002)
        position = walker.dataset(position, None, implicit=True, top=True, only_group=0x0000)
        syntax = walker.syntax
        if syntax == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                inflated = inflater.decompress(memoryview(data)[position:], max_inflated_bytes + 1)
            except zlib.error:
                return walker.count  # pydicom's inflate fails the same way: the parse refuses it
            if len(inflated) > max_inflated_bytes:
                raise InflatesTooLarge(max_inflated_bytes)
            walker = _Walker(inflated, len(inflated), limit, count=walker.count)
            position = 0
        elif syntax == ExplicitVRBigEndian:
            walker._structs(little=False)
        elif syntax is None and position + 6 <= len(data):
            group, vr = struct.unpack_from("<H2x2s", data, position)
            walker._structs(little=not (vr in _KNOWN_VRS and group >= 1024))  # pydicom's guess (issue 258)
        walker.dataset(position, None, implicit=False, top=True)
    except RecursionError:
        raise NestedTooDeeply from None
    return walker.count


class _Walker:
    def __init__(self, data: bytes, end: int, limit: int, *, count: int = 0) -> None:
        self.data = data
        self.end = end
        self.limit = limit
        self.count = count
        self._structs(little=True)
        #: The Transfer Syntax UID of the file meta group, once walked.
        self.syntax: str | None = None

    def _structs(self, *, little: bool) -> None:
        self.little = little
        order = "<" if little else ">"
        self._tag_length = struct.Struct(order + "HHL")
        self._explicit_header = struct.Struct(order + "HH2sH")
        self._long_length = struct.Struct(order + "L")

    def _add(self) -> None:
        self.count += 1
        if self.count > self.limit:
            raise TooManyElements(self.limit)

    def _found_implicit(self, position: int) -> bool | None:
        """pydicom's ``_is_implicit_vr``: the first element's VR bytes are two capital letters, or not."""
        if position + 6 > self.end:
            return None
        first, second = self.data[position + 4], self.data[position + 5]
        return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)

    def dataset(
        self, position: int, length: int | None, *, implicit: bool, top: bool, only_group: int | None = None
    ) -> int:
        """Walk a dataset from ``position`` (``length`` bytes, or until an item delimiter or the end);
        returns where pydicom's reader stops (past ``position + length`` if an element overruns it).
        ``only_group``: the file meta (0002) or command (0000) group, which ends at another group."""
        found = self._found_implicit(position)
        if found is not None and (top or (not implicit and found)):
            implicit = found
        start = position
        data = self.data
        end = self.end
        tag_length, explicit_header, long_length = self._tag_length, self._explicit_header, self._long_length
        while length is None or position - start < length:
            if position + 8 > end:
                return end
            element_start = position
            vr: bytes | None
            if implicit:
                group, element, value_length = tag_length.unpack_from(data, position)
                vr = None
                position += 8
            else:
                group, element, vr, value_length = explicit_header.unpack_from(data, position)
                position += 8
                if vr in _KNOWN_VRS:
                    if vr in _LONG_VRS:
                        if position + 4 > end:
                            return end
                        value_length = long_length.unpack_from(data, position)[0]
                        position += 4
                elif not (b"AA" <= vr <= b"ZZ"):  # pydicom reads this element as implicit VR
                    group, element, value_length = tag_length.unpack_from(data, position - 8)
                    vr = None
            tag = group << 16 | element
            if only_group is not None and group != only_group:
                return element_start
            if tag == _ITEM_DELIMITER:
                return position
            self._add()
            if value_length == _UNDEFINED:
                if self._undefined_is_sequence(tag, vr, position):
                    position = self.sequence(position, None, implicit=implicit)
                else:
                    position = self._past_sequence_delimiter(position)
                continue
            value_end = min(position + value_length, end)  # pydicom keeps a value cut short by the end
            if tag == _TRANSFER_SYNTAX and only_group == 0x0002:
                self.syntax = data[position:value_end].rstrip(b"\0 ").decode("ascii", "replace")
            if value_end - position >= 8 and self._defined_is_sequence(tag, vr, position, value_length):
                # pydicom parses it (on access) from the value's own bytes: the walk may not pass them
                self.end = value_end
                try:
                    self.sequence(position, value_end - position, implicit=implicit)
                finally:
                    self.end = end
            position = value_end
        return position

    def sequence(self, position: int, length: int | None, *, implicit: bool) -> int:
        """Walk the items of a sequence (``length`` bytes, or until the sequence delimiter)."""
        start = position
        while length is None or position - start < length:
            if position + 8 > self.end:
                return self.end
            tag_high, tag_low, item_length = self._tag_length.unpack_from(self.data, position)
            position += 8
            if (tag_high << 16 | tag_low) == _SEQUENCE_DELIMITER:
                return position
            self._add()  # pydicom reads an item here whatever its tag says
            if item_length == 0:
                continue
            position = self.dataset(
                position, None if item_length == _UNDEFINED else item_length, implicit=implicit, top=False
            )
        return position

    def _undefined_is_sequence(self, tag: int, vr: bytes | None, position: int) -> bool:
        if vr in (b"SQ", b"UN"):
            return True  # UN of undefined length is a sequence (PS3.5 6.2.2; pydicom infers SQ)
        if vr is not None:
            return False
        try:
            return str(dictionary_VR(tag)) == "SQ"
        except KeyError:
            return self._starts_with_item(position)

    def _defined_is_sequence(self, tag: int, vr: bytes | None, position: int, length: int) -> bool:
        if vr == b"SQ":
            return True
        if vr is not None and vr != b"UN":
            return False
        if not tag >> 16 & 1:  # public: the dictionary VR replaces implicit VR and UN
            try:
                return str(dictionary_VR(tag)) == "SQ"
            except KeyError:
                return False
        return self._starts_with_item(position)  # private: VR from a private dictionary, perhaps SQ

    def _starts_with_item(self, position: int) -> bool:
        return position + 8 <= self.end and self._tag_length.unpack_from(self.data, position)[:2] == (
            0xFFFE,
            0xE000,
        )

    def _past_sequence_delimiter(self, position: int) -> int:
        """pydicom's ``read_undefined_length_value``: the value ends at the next sequence delimiter."""
        delimiter = struct.pack("<HH" if self.little else ">HH", 0xFFFE, 0xE0DD)
        found = self.data.find(delimiter, position, self.end)
        return self.end if found < 0 else found + 8
