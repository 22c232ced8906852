"""The bits of native Pixel Data outside the stored pixel value: cleared, since a retired overlay may be there.

PS3.5 8.1.1: of the Bits Allocated bits of each Pixel Cell, Bits Stored hold the Pixel Sample Value, High
Bit its most significant bit (the sign bit of a two's complement value); editions up to 2013 add "Bits not
used for Pixel Sample Values can be used for overlay planes". That use is retired (PS3.5 8.1.2: Overlay Bits
Allocated and Overlay Bit Position "formerly" described overlay data in unused bits of Pixel Data; for
Overlay Data (60xx,3000) they are 1 and 0), but archives still hold such overlays, with their text. Table
E.1-1 removes Overlay Data (X), and the walk removes the overlay group, which leaves an embedded overlay's
bits in the pixels. So they are cleared here, without decoding the image: every bit outside the stored
value of every cell of native Pixel Data, whether or not an overlay is declared, since nothing else may
be there (pydicom's decoders ignore them too, ``correct_unused_bits``). Unsigned cells get zeros; signed
cells get their sign bit above High Bit, one of the two fillings PS3.3 C.11.7 Note 1 names (the other is
zeros): the cell then reads as the stored value even to a reader that ignores Bits Stored, and a
sign-extended original is unchanged. Bits below the value (High Bit above Bits Stored - 1) get zeros.

What cannot be cleared here, and is then refused with the reason (``UnclearablePixelBits``, quarantined by
``burned_in``): a declared embedded overlay in encapsulated Pixel Data (clearing needs decoding and
re-encoding), in a cell layout that does not locate the stored value, or inside the stored value itself
(the overlay is then part of the pixel values).

Hand-written: pydicom masks these bits when it decodes but never writes the masked cells back, and
pydicom/deid's request for this (issue #201) is open.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID

PIXEL_DATA = 0x7FE00010
_BITS_ALLOCATED = 0x00280100
_BITS_STORED = 0x00280101
_HIGH_BIT = 0x00280102
_PIXEL_REPRESENTATION = 0x00280103
_OVERLAY_BITS_ALLOCATED = 0x0100
_OVERLAY_BIT_POSITION = 0x0102
_OVERLAY_DATA = 0x3000
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Cells checked or cleared per step: bounds the temporary arrays whatever the size of the instance.
_CHUNK_CELLS = 1 << 20


class UnclearablePixelBits(ValueError):
    """Pixel Data declares an embedded overlay that cannot be cleared here; the message names attributes
    only, never a value."""


@dataclass(frozen=True)
class PixelCells:
    """One Pixel Cell (PS3.5 8.1.1): ``bits_allocated`` wide, the value in bits ``low_bit`` to ``high_bit``."""

    bits_allocated: int
    bits_stored: int
    high_bit: int
    signed: bool

    @property
    def low_bit(self) -> int:
        return self.high_bit - self.bits_stored + 1

    @property
    def value_mask(self) -> int:
        """The stored value's bits: one where the value is, zero elsewhere."""
        return ((1 << self.bits_stored) - 1) << self.low_bit

    @property
    def has_unused_bits(self) -> bool:
        return self.bits_stored < self.bits_allocated


def embedded_overlay_positions(dataset: Dataset) -> list[int | None]:
    """Bit positions in Pixel Data of the overlays ``dataset`` declares there (retired), one per overlay
    group; None where the group gives no Overlay Bit Position.

    A group declares one when it has no Overlay Data and its Overlay Bits Allocated is above 1 or its
    Overlay Bit Position is not 0: for an overlay in Overlay Data they are always 1 and 0 (PS3.5 8.1.2).
    """
    positions: list[int | None] = []
    for group in range(0x6000, 0x6020, 2):
        base = group << 16
        if base | _OVERLAY_DATA in dataset:
            continue
        bits_allocated = _us(dataset, base | _OVERLAY_BITS_ALLOCATED)
        position = _us(dataset, base | _OVERLAY_BIT_POSITION)
        if (bits_allocated or 0) > 1 or (position or 0) > 0:
            positions.append(position)
    return positions


def unclearable_reason(dataset: Dataset) -> str | None:
    """Why a declared embedded overlay cannot be cleared from ``dataset``'s Pixel Data, or None when it
    can (or none is declared). Reads attributes only; raises when one cannot be read."""
    return _plan(dataset)[0]


def clear_unused_pixel_bits(dataset: Dataset) -> bool:
    """Clear the bits outside the stored value in ``dataset``'s native Pixel Data, in place; whether it
    changed. Raises :class:`UnclearablePixelBits` (before changing anything) when a declared embedded
    overlay cannot be cleared.

    Pixel Data is left as it is, the same element, when no cell has a bit to clear. Otherwise it is
    copied once and the copy changed from the first step that needs it, so the peak is twice the pixel
    data for a moment (the writer's own peak, three times the instance, comes later).
    """
    reason, cells, order = _plan(dataset)
    if reason is not None:
        raise UnclearablePixelBits(reason)
    if cells is None or order is None:
        return False
    elem = dataset.get_item(PIXEL_DATA)
    original = elem.value
    if not isinstance(original, (bytes, bytearray)):
        return False
    width = cells.bits_allocated // 8
    count = len(original) // width
    unsigned = np.dtype(f"{order}u{width}")
    signed = np.dtype(f"{order}i{width}")
    first = _first_chunk_to_clear(np.frombuffer(original, unsigned, count), cells, signed)
    padding_set = any(original[count * width :])  # PS3.5 8.1.1: padding "shall not be considered significant"
    if first is None and not padding_set:
        return False
    cleared = bytearray(original)
    cells_out = np.frombuffer(cleared, unsigned, count)
    for start in range((first if first is not None else count), count, _CHUNK_CELLS):
        _normalise(cells_out[start : start + _CHUNK_CELLS], cells, signed)
    del cells_out
    cleared[count * width :] = bytes(len(cleared) - count * width)
    vr, encoding = elem.VR, _encoding(elem)
    del elem, original
    del dataset[PIXEL_DATA]  # the original bytes go before the cleared copy is made bytes
    dataset[PIXEL_DATA] = _element(vr, bytes(cleared), encoding)
    return True


# -- the plan ----------------------------------------------------------------------------------------------


def _plan(dataset: Dataset) -> tuple[str | None, PixelCells | None, str | None]:
    """(reason it cannot be done, the cells to clear, their byte order '<' or '>'): nothing to clear is
    (None, None, None)."""
    declared = embedded_overlay_positions(dataset)
    if PIXEL_DATA not in dataset:
        return None, None, None
    cells, problem = _cells(dataset)
    if cells is None:
        reason = f"{problem}, so the overlay declared in Pixel Data (60xx,0102) cannot be located"
        return (reason if declared else None), None, None
    if any(
        cells.low_bit <= position <= cells.high_bit if position is not None else not cells.has_unused_bits
        for position in declared
    ):
        return (
            "an overlay is declared in Pixel Data (Overlay Bits Allocated (60xx,0100), Overlay Bit "
            "Position (60xx,0102)) within the stored pixel value (Bits Stored, High Bit): it is part "
            "of the pixel values and cannot be removed without changing them",
            None,
            None,
        )
    if not cells.has_unused_bits:
        return None, None, None
    order = _native_byte_order(dataset)
    if order is None:
        reason = (
            "an overlay is declared in the unused bits of encapsulated (compressed) or privately "
            "encoded Pixel Data (Overlay Bits Allocated (60xx,0100), Overlay Bit Position "
            "(60xx,0102)); it cannot be cleared without decoding and re-encoding the pixels"
        )
        return (reason if declared else None), None, None
    if cells.bits_allocated not in (8, 16, 32, 64):
        reason = (
            f"an overlay is declared in Pixel Data whose Bits Allocated ({cells.bits_allocated}) is not "
            "8, 16, 32 or 64; its unused bits cannot be cleared"
        )
        return (reason if declared else None), None, None
    if (padding := _padding_outside_stored_value(dataset, cells)) is not None:
        # Clearing would turn padding pixels into ordinary values that no longer match it.
        reason = (
            f"an overlay is declared in the unused bits of Pixel Data, and {padding} lies outside the "
            "stored pixel value (Bits Stored, High Bit): clearing the bits would change padding pixels"
        )
        return (reason if declared else None), None, None
    return None, cells, order


_PIXEL_PADDING = {
    0x00280120: "Pixel Padding Value (0028,0120)",
    0x00280121: "Pixel Padding Range Limit (0028,0121)",
}


def _padding_outside_stored_value(dataset: Dataset, cells: PixelCells) -> str | None:
    """The padding attribute whose value a cell cannot hold once its unused bits are cleared, if any
    (some unsigned images pad with 0xFFFF above a 12-bit value, for one)."""
    width = cells.bits_allocated
    for tag, name in _PIXEL_PADDING.items():
        value = _int(dataset, tag)
        if value is None:
            continue
        cell = np.array([value & ((1 << width) - 1)], dtype=np.dtype(f"<u{width // 8}"))
        before = int(cell[0])
        _normalise(cell, cells, np.dtype(f"<i{width // 8}"))
        if int(cell[0]) != before:
            return name
    return None


def _cells(dataset: Dataset) -> tuple[PixelCells | None, str]:
    """The Pixel Cell the Image Pixel attributes describe, or None and what is wrong with them."""
    bits_allocated = _us(dataset, _BITS_ALLOCATED)
    bits_stored = _us(dataset, _BITS_STORED)
    if bits_allocated is None or bits_stored is None:
        return None, "Bits Allocated (0028,0100) or Bits Stored (0028,0101) is missing"
    high_bit = _us(dataset, _HIGH_BIT)
    if high_bit is None:
        high_bit = bits_stored - 1
    if not 0 < bits_stored <= bits_allocated or not bits_stored - 1 <= high_bit < bits_allocated:
        return None, "Bits Allocated, Bits Stored and High Bit (0028,0100-0102) are inconsistent"
    return PixelCells(bits_allocated, bits_stored, high_bit, _us(dataset, _PIXEL_REPRESENTATION) == 1), ""


def _native_byte_order(dataset: Dataset) -> str | None:
    """'<' or '>' when Pixel Data is native (not encapsulated) in a transfer syntax this knows; else None."""
    elem = dataset.get_item(PIXEL_DATA)
    if isinstance(elem, RawDataElement):
        if elem.length == _UNDEFINED_LENGTH:
            return None
    elif elem.is_undefined_length:
        return None
    meta = getattr(dataset, "file_meta", None)
    syntax: UID | None = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return ">" if dataset.original_encoding[1] is False else "<"
    if not syntax.is_transfer_syntax or syntax.is_encapsulated:
        return None
    return "<" if syntax.is_little_endian else ">"


# -- the cells -----------------------------------------------------------------------------------------------


def _normalise(cells_in: npt.NDArray[np.unsignedinteger], cells: PixelCells, signed: np.dtype) -> None:
    """In place: bits outside the stored value cleared; a signed value's sign bit copied above High Bit."""
    np.bitwise_and(cells_in, cells_in.dtype.type(cells.value_mask), out=cells_in)
    shift = cells.bits_allocated - 1 - cells.high_bit
    if cells.signed and shift:
        as_signed = cells_in.view(signed)
        np.left_shift(as_signed, shift, out=as_signed)
        np.right_shift(as_signed, shift, out=as_signed)  # arithmetic: copies the sign bit


def _first_chunk_to_clear(
    cells_in: npt.NDArray[np.unsignedinteger], cells: PixelCells, signed: np.dtype
) -> int | None:
    """The index of the first cell of the first step whose cells would change, or None."""
    for start in range(0, len(cells_in), _CHUNK_CELLS):
        chunk = cells_in[start : start + _CHUNK_CELLS]
        normalised = chunk.copy()
        _normalise(normalised, cells, signed)
        if not np.array_equal(normalised, chunk):
            return start
    return None


# -- elements ------------------------------------------------------------------------------------------------


def _int(dataset: Dataset, tag: int) -> int | None:
    """An US or SS value (first), read as :func:`_us` reads; None when absent, empty or unreadable."""
    try:
        return _us(dataset, tag)
    except (TypeError, ValueError):
        return None


def _us(dataset: Dataset, tag: int) -> int | None:
    """An unsigned short's (first) value, read without replacing the dataset's raw element; None when
    absent or empty."""
    if tag not in dataset:
        return None
    elem = dataset.get_item(tag)
    if isinstance(elem, RawDataElement):
        elem = convert_raw_data_element(elem, encoding=dataset.original_character_set, ds=dataset)
    value = elem.value
    if isinstance(value, (list, MultiValue)):
        value = value[0] if value else None
    if value is None or value == "" or value == b"":
        return None
    return int(value)


def _encoding(elem: DataElement | RawDataElement) -> tuple[bool, bool] | None:
    if isinstance(elem, RawDataElement):
        return bool(elem.is_implicit_VR), bool(elem.is_little_endian)
    return None


def _element(
    vr: str | None, value: bytes, encoding: tuple[bool, bool] | None
) -> DataElement | RawDataElement:
    """Pixel Data holding ``value``: raw, like the element read (the writer copies raw values as they
    are), or a plain element for a dataset built in memory."""
    if encoding is None:
        return DataElement(PIXEL_DATA, vr or "OW", value)
    return RawDataElement(
        BaseTag(PIXEL_DATA), vr, len(value), value, 0, encoding[0], encoding[1], True, False
    )
