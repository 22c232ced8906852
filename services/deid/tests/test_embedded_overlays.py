"""Overlays embedded in Pixel Data (retired, PS3.5 8.1.2) leave with their group (a conformance hunt,
seventeenth session).

An overlay could live in the bits of each Pixel Cell outside the stored value: Overlay Bits Allocated
(60xx,0100) 16 and Overlay Bit Position (60xx,0102) 12 put one in bit 12 of a 16-bit cell, and no Overlay
Data (60xx,3000) is written. Removing the group (test_overlays) left those bits, text included, in the
released pixels. They are now cleared in native Pixel Data, values kept; what cannot be cleared (compressed
pixels, an overlay inside the stored value) is quarantined.
"""

from __future__ import annotations

import base64
import io
import warnings
from io import BytesIO

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from deid_keys import ALL_OPTIONS
from enclave_common.crypto import LocalKeyring, ObjectIdentity, decrypt_bytes, encrypt_bytes
from enclave_deid.burned_in import assess_burned_in_risk
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.pipeline import DeidPipeline, Quarantined, _Written
from enclave_deid.pixel_bits import PIXEL_DATA, UnclearablePixelBits
from enclave_deid.policy import DeidPolicy
from enclave_deid.pseudonym_keys import DeidPseudonymKeys
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

TENANT = "tenant-a"
MARK = "HUNTEMBED"
POLICIES = {"basic": DeidPolicy(), "all options": ALL_OPTIONS}
ROWS = COLUMNS = 64
#: A 12-bit image, values anywhere in 0..4095.
UNSIGNED_12 = np.random.default_rng(17).integers(0, 1 << 12, size=(1, ROWS, COLUMNS), dtype=np.uint16)


def _text_bitmap(frame: int = 0) -> npt.NDArray[np.bool_]:
    """An overlay plane standing in for a name written in it: a block of set bits, placed per frame."""
    plane = np.zeros((ROWS, COLUMNS), dtype=bool)
    plane[8 + frame : 20 + frame, 4:60:3] = True
    return plane


def _with_overlays(cells: npt.NDArray[np.integer], positions: tuple[int, ...]) -> npt.NDArray[np.uint16]:
    """``cells`` (frames, rows, columns) as 16-bit words with an overlay plane set in each bit position."""
    words = cells.astype(np.uint16)
    for frame in range(words.shape[0]):
        for position in positions:
            words[frame][_text_bitmap(frame)] |= np.uint16(1 << position)
    return words


def _declare(ds: Dataset, positions: tuple[int, ...]) -> None:
    """One overlay group per position, as the retired encoding wrote them: no Overlay Data."""
    for index, position in enumerate(positions):
        group = 0x6000 + 2 * index
        ds.add_new(group << 16 | 0x0010, "US", ROWS)  # Overlay Rows
        ds.add_new(group << 16 | 0x0011, "US", COLUMNS)  # Overlay Columns
        ds.add_new(group << 16 | 0x0022, "LO", f"{MARK} description")
        ds.add_new(group << 16 | 0x0040, "CS", "G")  # Overlay Type
        ds.add_new(group << 16 | 0x0050, "SS", [1, 1])  # Overlay Origin
        ds.add_new(group << 16 | 0x0100, "US", 16)  # Overlay Bits Allocated: the pixel cell's
        ds.add_new(group << 16 | 0x0102, "US", position)  # Overlay Bit Position


def _mr(
    words: npt.NDArray[np.integer],
    *,
    bits_stored: int = 12,
    high_bit: int | None = None,
    signed: bool = False,
    declared: tuple[int, ...] = (),
    name: str = "MR_small.dcm",
) -> bytes:
    """A Part 10 MR whose Pixel Data is ``words`` (frames, rows, columns) in 16-bit cells, in the byte
    order of the pydicom test file it is made from."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Rows, ds.Columns = words.shape[1], words.shape[2]
    ds.BitsAllocated, ds.BitsStored = 16, bits_stored
    ds.HighBit = bits_stored - 1 if high_bit is None else high_bit
    ds.PixelRepresentation = int(signed)
    if words.shape[0] > 1 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = words.shape[0]
    order = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
    ds.PixelData = words.astype(f"{order}u2").tobytes()
    _declare(ds, declared)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _released(original: bytes, policy: DeidPolicy, keys) -> tuple[Dataset, list[tuple[tuple[int, ...], str]]]:
    result = deidentify(read_instance(original), policy, keys, DeidContext(TENANT))
    out = write_instance(result.dataset)
    assert MARK.encode() not in out
    copy = read_instance(BytesIO(out))
    assert not [elem.tag for elem in copy if 0x6000 <= elem.tag.group <= 0x601E]
    return copy, [(action.path, action.action) for action in result.actions]


def _cells(ds: Dataset) -> npt.NDArray[np.uint16]:
    order = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
    frames = int(ds.get("NumberOfFrames") or 1)
    return np.frombuffer(ds.PixelData, f"{order}u2").reshape(frames, ds.Rows, ds.Columns).astype(np.uint16)


@pytest.mark.parametrize("policy_name", POLICIES)
def test_an_overlay_in_bits_12_to_15_leaves_and_the_12_bit_values_stay(policy_name: str, keys) -> None:
    words = _with_overlays(UNSIGNED_12, (12, 13, 14, 15))
    original = _mr(words, declared=(12, 13, 14, 15))
    assert (_cells(read_instance(original)) >> 12).any()  # the overlay is in the original's pixels
    copy, actions = _released(original, POLICIES[policy_name], keys)
    cells = _cells(copy)
    assert not (cells >> 12).any()
    assert np.array_equal(cells, UNSIGNED_12)
    assert np.array_equal(copy.pixel_array, pydicom.dcmread(BytesIO(original)).pixel_array)
    assert ((PIXEL_DATA,), "C") in actions


def test_bits_above_the_stored_value_are_cleared_without_a_declared_overlay(keys) -> None:
    """PS3.5 8.1.1: those bits are not part of the value, whatever put something there."""
    copy, _ = _released(_mr(_with_overlays(UNSIGNED_12, (13,))), DeidPolicy(), keys)
    assert np.array_equal(_cells(copy), UNSIGNED_12)


def test_signed_values_keep_their_sign_extended_above_high_bit(keys) -> None:
    """Signed 12-bit values in 16-bit cells: the overlay bits go, and each cell reads as its value even to a
    reader that ignores Bits Stored. A negative value written without its sign copied above High Bit
    (0x0800 for -2048) is normalised too; the value, as PS3.5 reads it, is the same."""
    values = np.random.default_rng(5).integers(-2048, 2048, size=(1, ROWS, COLUMNS)).astype(np.int16)
    values[0, 0, :4] = (-2048, -1, 0, 2047)
    sign_extended = values.view(np.uint16)
    words = _with_overlays(sign_extended & 0x0FFF, (12, 14))  # high bits: the overlay, no sign
    original = _mr(words, signed=True, declared=(12, 14))
    copy, _ = _released(original, DeidPolicy(), keys)
    assert np.array_equal(_cells(copy).view(np.int16), values)
    assert np.array_equal(copy.pixel_array, pydicom.dcmread(BytesIO(original)).pixel_array)
    assert np.array_equal(copy.pixel_array, values[0])


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_big_endian.dcm"])
def test_every_frame_is_cleared_in_either_byte_order(name: str, keys) -> None:
    frames = np.random.default_rng(3).integers(0, 1 << 12, size=(10, ROWS, COLUMNS), dtype=np.uint16)
    original = _mr(_with_overlays(frames, (12, 15)), declared=(12, 15), name=name)
    copy, actions = _released(original, ALL_OPTIONS, keys)
    assert copy.file_meta.TransferSyntaxUID == read_instance(original).file_meta.TransferSyntaxUID
    assert copy.NumberOfFrames == 10
    assert np.array_equal(_cells(copy), frames)
    assert ((PIXEL_DATA,), "C") in actions


def test_unused_bits_below_the_value_are_cleared_when_high_bit_is_15(keys) -> None:
    """PS3.5 8.1.1's example: 12 bits stored with High Bit 15 leave the 4 low bits of each word unused."""
    shifted = UNSIGNED_12 << 4
    copy, _ = _released(
        _mr(_with_overlays(shifted, (0, 2)), high_bit=15, declared=(0, 2)), DeidPolicy(), keys
    )
    assert np.array_equal(_cells(copy), shifted)


@pytest.mark.parametrize("bits_stored", [16, 12])
def test_pixel_data_with_nothing_to_clear_is_byte_identical(bits_stored: int, keys) -> None:
    """Bits Stored equal to Bits Allocated, or clean unused bits: the element is released as read."""
    words = np.random.default_rng(9).integers(0, 1 << bits_stored, size=(1, ROWS, COLUMNS), dtype=np.uint16)
    original = _mr(words, bits_stored=bits_stored, signed=bits_stored == 16)
    copy, actions = _released(original, ALL_OPTIONS, keys)
    assert copy.PixelData == read_instance(original).PixelData
    assert not [action for action in actions if action[0] == (PIXEL_DATA,)]


def _encapsulated_with(declared: tuple[int, ...]) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"))
    _declare(ds, declared)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_compressed_pixels_with_a_declared_embedded_overlay_are_quarantined(keys) -> None:
    """The bits cannot be cleared without decoding and re-encoding the JPEG 2000 frames."""
    dataset = read_instance(_encapsulated_with((12,)))
    reason = assess_burned_in_risk(dataset)
    assert reason is not None and "encapsulated" in reason and "(60xx,0102)" in reason
    assert MARK not in reason
    before = dataset.PixelData
    with pytest.raises(UnclearablePixelBits):
        deidentify(dataset, DeidPolicy(), keys, DeidContext(TENANT))
    assert dataset.PixelData == before and 0x60000102 in dataset  # refused before changing anything


def test_compressed_pixels_without_a_declared_overlay_are_released_as_they_are(keys) -> None:
    original = _encapsulated_with(())
    assert assess_burned_in_risk(read_instance(original)) is None
    copy, _ = _released(original, DeidPolicy(), keys)
    assert copy.PixelData == read_instance(original).PixelData


def test_an_overlay_declared_inside_the_stored_value_is_quarantined(keys) -> None:
    """Bit 0 of a 12-bit value: the overlay is part of the pixel values; clearing it would change them."""
    dataset = read_instance(_mr(UNSIGNED_12, declared=(0,)))
    reason = assess_burned_in_risk(dataset)
    assert reason is not None and "within the stored pixel value" in reason
    with pytest.raises(UnclearablePixelBits):
        deidentify(dataset, DeidPolicy(), keys, DeidContext(TENANT))


def test_an_overlay_in_overlay_data_is_no_embedded_one(keys) -> None:
    """Overlay Bits Allocated 1, Bit Position 0 and Overlay Data: the group goes, the pixels are not read
    as holding an overlay (MR-SIEMENS-DICOM-WithOverlays is one)."""
    path = get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")
    with open(path, "rb") as file:
        data = file.read()
    assert assess_burned_in_risk(read_instance(data)) is None
    copy, _ = _released(data, DeidPolicy(), keys)
    assert copy.PixelData == read_instance(data).PixelData


# -- through the service's worker-thread transform --------------------------------------------------------


def _transform(plaintext: bytes) -> tuple[_Written | Quarantined, LocalKeyring]:
    originals, deid_kek = LocalKeyring.generate("ingest"), LocalKeyring.generate("deid")
    pipeline = DeidPipeline(
        store=None,  # type: ignore[arg-type]  # the transform does not touch the store
        study_keys=None,  # type: ignore[arg-type]
        deid_kek=deid_kek,
        keys=DeidPseudonymKeys.from_base64(base64.b64encode(b"k" * 32).decode(), "x"),
        bucket="enclave-deidentified",
        max_instance_bytes=10 * 1024 * 1024,
    )
    source = ObjectIdentity("t", "study-key", "originals/1")
    dek, wrapped = originals.generate_data_key(source.key_context())
    blob = encrypt_bytes(plaintext, dek, wrapped, source, segment_size=4096)
    target = ObjectIdentity("t", "study-key", "deidentified/1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = pipeline._transform(io.BytesIO(blob), source, originals, "t", DeidPolicy(), target)
    return outcome, deid_kek


def test_the_service_releases_cleared_pixels_and_quarantines_what_it_cannot_clear() -> None:
    written, deid_kek = _transform(_mr(_with_overlays(UNSIGNED_12, (12,)), declared=(12,)))
    assert isinstance(written, _Written)
    with written.ciphertext as file:
        copy = decrypt_bytes(file.read(), ObjectIdentity("t", "study-key", "deidentified/1"), deid_kek)
    assert np.array_equal(_cells(read_instance(copy)), UNSIGNED_12)

    quarantined, _ = _transform(_encapsulated_with((12,)))
    assert isinstance(quarantined, Quarantined)
    assert quarantined.code == "burned_in_risk" and "encapsulated" in quarantined.reason


def test_padding_outside_the_stored_value_keeps_the_pixels_as_they_are(keys) -> None:
    """Pixel Padding Value 0xFFFF above 12-bit values (a review's case): clearing the high bits would turn
    the padding pixels into the ordinary value 0x0FFF that no longer matches it, so nothing is cleared;
    with an overlay declared there the instance cannot be released (quarantined)."""
    words = UNSIGNED_12.copy()
    words[0, :4, :] = 0xFFFF
    original = read_instance(_mr(words))
    original.add_new(0x00280120, "US", 0xFFFF)
    buffer = BytesIO()
    original.save_as(buffer, enforce_file_format=True)
    copy, actions = _released(buffer.getvalue(), DeidPolicy(), keys)
    assert np.array_equal(_cells(copy), words)
    assert ((PIXEL_DATA,), "C") not in actions
    declared = read_instance(_mr(words, declared=(13,)))
    declared.add_new(0x00280120, "US", 0xFFFF)
    reason = assess_burned_in_risk(declared)
    assert reason is not None and "Pixel Padding Value (0028,0120)" in reason


def test_padding_inside_the_stored_value_does_not_stop_the_clearing(keys) -> None:
    words = _with_overlays(UNSIGNED_12, (13,))
    original = read_instance(_mr(words))
    original.add_new(0x00280120, "US", 0)
    buffer = BytesIO()
    original.save_as(buffer, enforce_file_format=True)
    copy, _ = _released(buffer.getvalue(), DeidPolicy(), keys)
    assert np.array_equal(_cells(copy), UNSIGNED_12)
