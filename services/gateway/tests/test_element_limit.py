"""The per-instance limit on data elements plus sequence items (``max_elements_per_instance``).

deid's pydicom holds every element and item as an object of about 1 KiB; an empty one is 8 bytes on
the wire, and fewer deflated. A deflated MR with 1.5M empty private items after Pixel Data was 18 KiB
here (89 KiB in the hunt) and took deid from 250 MiB to 2.1 GiB; the gateway accepted it."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import pydicom
import pytest
from corpus import builders as corpus  # tests/conftest.py puts this directory on sys.path
from enclave_gateway.config import GatewaySettings
from enclave_gateway.validation import (
    DEFAULT_MAX_ELEMENTS_PER_INSTANCE,
    FailureReason,
    InstanceInfo,
    InstanceInspector,
    ValidationFailure,
    ValidationPolicy,
    validate_instance,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]


def with_items(syntax: str, items: int, *, with_meta: bool = True) -> bytes:
    """An MR whose DigitalSignaturesSequence (FFFA,FFFA), after Pixel Data, holds ``items`` items of
    one element each, with a nested sequence of two items in the first: every level is counted. A
    standard sequence, so that pydicom reads it as one in implicit VR too (the oracle below)."""
    ds = corpus.make_dataset(pixel_bytes=512)
    members = []
    for number in range(items):
        item = Dataset()
        item.MACIDNumber = number % 65536
        members.append(item)
    if members:
        members[0].ModifiedAttributesSequence = Sequence([Dataset(), Dataset()])
    ds.DigitalSignaturesSequence = Sequence(members)
    return corpus.encode(ds, syntax=syntax, with_meta=with_meta)


def counted(data: bytes) -> int:
    """Data elements plus sequence items as pydicom reads them (file meta included): the oracle."""

    def count(dataset: Dataset) -> int:
        total = 0
        for element in dataset:
            total += 1
            if element.VR == "SQ" or isinstance(element.value, Sequence):  # a UN read as one too
                for item in element.value:
                    total += 1 + count(item)
        return total

    ds = pydicom.dcmread(BytesIO(data), force=True)
    meta = len(ds.file_meta) if hasattr(ds, "file_meta") else 0
    return meta + count(ds)


def refused_for_count(result: object, limit: int) -> ValidationFailure:
    assert isinstance(result, ValidationFailure), result
    assert result.reason_code == FailureReason.OUT_OF_RESOURCES
    assert result.problem == "too_many_elements"
    assert f"more than {limit} data elements and sequence items" in result.message
    assert "ENCLAVE_GATEWAY_MAX_ELEMENTS_PER_INSTANCE" in result.message
    assert corpus.PLANTED_PATIENT_ID not in result.message
    assert result.sop_instance_uid is not None  # the header was read: the failure names the instance
    return result


def streamed(data: bytes, policy: ValidationPolicy, sizes: list[int]) -> InstanceInfo | ValidationFailure:
    inspector = InstanceInspector(policy)
    for chunk in corpus.split(data, sizes):
        inspector.feed(chunk)
    return inspector.finish()


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_element_count_at_and_just_past_the_limit(syntax: str) -> None:
    data = with_items(syntax, 300)
    elements = counted(data)
    assert elements > 600  # 300 items of one element, the nested sequence, the header, the meta
    at_limit = ValidationPolicy(max_elements_per_instance=elements)
    assert isinstance(validate_instance(data, at_limit), InstanceInfo)
    assert isinstance(streamed(data, at_limit, [7, 1000, 3]), InstanceInfo)
    past = ValidationPolicy(max_elements_per_instance=elements - 1)
    refused_for_count(validate_instance(data, past), elements - 1)
    refused_for_count(streamed(data, past, [7, 1000, 3]), elements - 1)


def test_a_bare_dataset_is_counted_without_a_file_meta() -> None:
    data = with_items(ExplicitVRLittleEndian, 50, with_meta=False)
    elements = counted(data)
    assert isinstance(
        validate_instance(data, ValidationPolicy(max_elements_per_instance=elements)), InstanceInfo
    )
    refused_for_count(
        validate_instance(data, ValidationPolicy(max_elements_per_instance=elements - 1)), elements - 1
    )


def test_pixel_data_fragments_are_not_counted() -> None:
    """deid holds encapsulated Pixel Data as one value, whatever its number of fragments."""
    data = corpus.pydicom_file("MR_small_RLE.dcm")
    with_fragments = ValidationPolicy(max_elements_per_instance=counted(data))
    assert isinstance(validate_instance(data, with_fragments), InstanceInfo)


def _empty_items_after_pixel_data(items: int, *, deflated: bool) -> bytes:
    """The hunt's F1 instance: empty items of a private sequence after Pixel Data (8 bytes each)."""
    body = corpus.encode(corpus.make_dataset(pixel_bytes=64), syntax=ExplicitVRLittleEndian, with_meta=False)
    body += (
        struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 4)
        + b"TEST"
        + struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0) * items
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    if not deflated:
        return body
    meta = corpus.encode(corpus.make_dataset(pixel_bytes=2), syntax=DeflatedExplicitVRLittleEndian)
    meta = meta[: 132 + 12 + struct.unpack_from("<I", meta, 140)[0]]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return meta + compressor.compress(body) + compressor.flush()


@pytest.mark.parametrize("deflated", [False, True])
def test_the_hunts_empty_item_flood_is_refused_by_default(deflated: bool) -> None:
    data = _empty_items_after_pixel_data(DEFAULT_MAX_ELEMENTS_PER_INSTANCE + 10, deflated=deflated)
    if deflated:
        assert len(data) < 64 * 1024  # below the 16 MiB inflation-ratio floor: only the count stops it
    refused_for_count(validate_instance(data), DEFAULT_MAX_ELEMENTS_PER_INSTANCE)


def test_the_setting_defaults_to_the_policy_default_and_has_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().max_elements_per_instance == DEFAULT_MAX_ELEMENTS_PER_INSTANCE == 400_000
    assert ValidationPolicy().max_elements_per_instance == DEFAULT_MAX_ELEMENTS_PER_INSTANCE
    monkeypatch.setenv("ENCLAVE_GATEWAY_MAX_ELEMENTS_PER_INSTANCE", "2000000")
    assert GatewaySettings().max_elements_per_instance == 2_000_000
    monkeypatch.setenv("ENCLAVE_GATEWAY_MAX_ELEMENTS_PER_INSTANCE", "10")
    with pytest.raises(ValueError, match="max_elements_per_instance"):
        GatewaySettings()


# --------------------------------------------------------------------------- parity with deid's count

_CREATOR = 0x7FE1


def _implicit_items(items: int) -> bytes:
    """``items`` implicit-VR items of one element (MACIDNumber), then an empty one."""
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 10) + struct.pack("<HHIH", 0x0400, 0x0005, 2, 7)
    return item * items + struct.pack("<HHI", 0xFFFE, 0xE000, 0)


def _sequence_in_disguise(kind: str, items: int) -> bytes:
    """An MR with, after Pixel Data, a defined-length value that deid's count walks as a sequence:
    ``private_un`` a private UN value holding items, ``public_un`` the DigitalSignaturesSequence
    (FFFA,FFFA) encoded as UN, ``private_implicit`` an implicit-VR private value holding items."""
    implicit = kind == "private_implicit"
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    data = corpus.encode(corpus.make_dataset(pixel_bytes=512), syntax=syntax, with_meta=True)
    value = _implicit_items(items)
    if kind == "public_un":
        return data + struct.pack("<HH2sHI", 0xFFFA, 0xFFFA, b"UN", 0, len(value)) + value
    if implicit:
        creator = struct.pack("<HHI", _CREATOR, 0x0010, 4) + b"ACME"
        element = struct.pack("<HHI", _CREATOR, 0x1010, len(value))
    else:
        creator = struct.pack("<HH2sH", _CREATOR, 0x0010, b"LO", 4) + b"ACME"
        element = struct.pack("<HH2sHI", _CREATOR, 0x1010, b"UN", 0, len(value))
    return data + creator + element + value


@pytest.mark.parametrize("kind", ["private_un", "public_un", "private_implicit"])
def test_values_deid_walks_as_sequences_are_counted_alike(kind: str) -> None:
    """deid counts the items (and their elements) of a public UN whose dictionary VR is SQ and of a
    private UN or implicit-VR value that starts with an Item tag: the gateway must count them too, or
    it accepts what deid quarantines as too complex."""
    from enclave_deid.complexity import TooManyElements, count_elements

    items = 300
    data = _sequence_in_disguise(kind, items)
    elements = count_elements(data, 10**9, 10**9)
    without = count_elements(_sequence_in_disguise(kind, 0), 10**9, 10**9)
    assert elements - without == 2 * items  # each item and its element
    if kind == "public_un":  # pydicom reads it as SQ; a private one only with a private dictionary
        assert counted(data) == elements
    at_limit = ValidationPolicy(max_elements_per_instance=elements)
    assert isinstance(validate_instance(data, at_limit), InstanceInfo)
    assert isinstance(streamed(data, at_limit, [7, 1000, 3]), InstanceInfo)
    assert isinstance(streamed(data, at_limit, [1]), InstanceInfo)  # the Item tag peeked byte by byte
    past = ValidationPolicy(max_elements_per_instance=elements - 1)
    with pytest.raises(TooManyElements):
        count_elements(data, elements - 1, 10**9)
    refused_for_count(validate_instance(data, past), elements - 1)
    refused_for_count(streamed(data, past, [7, 1000, 3]), elements - 1)


def test_a_private_value_without_an_item_tag_stays_opaque() -> None:
    """Bytes that do not start with an Item tag are a value, skipped uncounted, as deid skips them."""
    from enclave_deid.complexity import count_elements

    data = corpus.encode(corpus.make_dataset(pixel_bytes=512), syntax=ExplicitVRLittleEndian, with_meta=True)
    value = b"\xfe\xff\x00\xe1" + bytes(60)
    data += struct.pack("<HH2sH", _CREATOR, 0x0010, b"LO", 4) + b"ACME"
    data += struct.pack("<HH2sHI", _CREATOR, 0x1010, b"UN", 0, len(value)) + value
    elements = count_elements(data, 10**9, 10**9)
    policy = ValidationPolicy(max_elements_per_instance=elements)
    assert isinstance(validate_instance(data, policy), InstanceInfo)
    assert isinstance(streamed(data, policy, [1]), InstanceInfo)
    truncated = validate_instance(data[:-62], policy)  # ends inside the first 4 bytes of the value
    assert isinstance(truncated, ValidationFailure) and truncated.problem == "truncated"
