"""The image a compressed frame declares, read from its codestream header before it is decoded.

A JPEG-family decoder allocates the image its codestream declares, whatever Rows and Columns say:
8 KB of JPEG 2000 declaring 8192x8192 in an instance of Rows and Columns 1024 took pydicom's decode
to +394 MiB before its output was found not to fit the frame. ``check_codestreams`` reads the header
of every frame (its first ``CODESTREAM_HEADER_BYTES``) and refuses the instance
(:class:`PixelDataError`, ``pixel_data_unreadable``) unless the codestream declares the rows,
columns and samples per pixel of its attributes, in samples no wider than ``BitsAllocated``.

PS3.5 8.2 lets the codestream's own characteristics control its decompression when they differ from
the attributes; pydicom follows that for the precision (it decodes with the codestream's, silently in
pydicom 3), so a precision that differs from ``BitsStored`` is taken: encoders write 16-bit
codestreams of 12-bit data and the reverse. A precision past ``BitsAllocated`` is not: pydicom then
returns the samples cut to ``BitsAllocated`` bits without a word (a 16-bit JPEG 2000 frame of
``BitsAllocated`` 8 came back as values up to 240 of 63984). A matrix or sample count that differs is
never usable here: the volume is built on Rows x Columns, and the decoded frame was refused afterwards
(a 3-component JPEG 2000 frame in a MONOCHROME2 instance did worse: GDCM's decoder aborted the worker
process with an uncaught C++ exception).

JPEG and JPEG-LS headers are read with pydicom's own parser (``_get_jpg_parameters``, what its
decoders use), once the fill bytes T.81 B.1.1.2 allows before any marker are taken out: pydicom's
walk reads ``FF FF`` as a marker and gives up, though its decoders decode such frames
(``without_fill_bytes``, by hand for that reason). The JPEG 2000 / HTJ2K SIZ segment is read by
hand: pydicom's ``get_j2k_parameters`` gives only the precision and signedness, and never returns for
a JP2 box whose length is 0 (its decoders call it before each JPEG 2000 frame, so such a frame would
stall the worker for good); and openjpeg's ``get_parameters`` parses the header in native code, which
this check keeps such headers from.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from enclave_analysis.errors import PixelDataError

#: The header of a frame is looked for in its first this many bytes (a JPEG's tables and APP
#: segments, a JPEG 2000 SIZ segment with up to 16384 components, take far less). Past it, the frame
#: is refused: what cannot be bounded is not decoded.
CODESTREAM_HEADER_BYTES = 64 * 1024
#: The first 8 bytes of a JP2 file (its signature box), as pydicom recognises a wrapped codestream.
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


@dataclass(frozen=True)
class DeclaredImage:
    """What a frame's codestream header declares: its matrix, samples per pixel (components) and the
    bits of its widest sample."""

    rows: int
    columns: int
    components: int
    precision: int


def check_codestreams(ds: Dataset, where: str) -> None:
    """Refuse JPEG, JPEG-LS, JPEG 2000 or HTJ2K pixel data any of whose frames declares another
    matrix or sample count than ``Rows``, ``Columns`` and ``SamplesPerPixel``, samples wider than
    ``BitsAllocated``, or a header that cannot be read in its first ``CODESTREAM_HEADER_BYTES``; before
    anything is decoded. Other transfer syntaxes, and an encapsulation pydicom cannot split into
    frames (its decoder fails on it just the same), are left alone."""
    syntax = UID(str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or ""))
    if syntax in JPEG2000TransferSyntaxes:
        read = j2k_declared_image
    elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        read = jpeg_declared_image
    else:
        return
    if "PixelData" not in ds:
        return
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits_allocated = ds.get("BitsAllocated")
    for frame_number, head in enumerate(_frame_heads(ds)):
        problem = f"the pixel data of {where} cannot be decoded: frame {frame_number} is {syntax.name} data"
        image = read(head)
        if image is None:
            raise PixelDataError(
                f"{problem} whose header cannot be read (no start-of-frame or SIZ marker segment where "
                f"the standard puts it, in its first {CODESTREAM_HEADER_BYTES // 1024} KiB); the image a "
                "codestream declares is checked before it is decoded"
            )
        if (image.rows, image.columns, image.components) != (rows, columns, samples):
            raise PixelDataError(
                f"{problem} declaring {image.rows}x{image.columns} pixels of {image.components} "
                f"sample(s) in its codestream, where Rows x Columns is {rows}x{columns} of {samples} "
                "(SamplesPerPixel); the codestream must declare the image its attributes describe"
            )
        if bits_allocated is not None and image.precision > int(bits_allocated):
            raise PixelDataError(
                f"{problem} of {image.precision}-bit samples, wider than BitsAllocated ({int(bits_allocated)});"
                " a codestream's precision may differ from BitsStored but must fit BitsAllocated"
            )


def _frame_heads(ds: Dataset) -> Iterator[bytes]:
    """The first ``CODESTREAM_HEADER_BYTES`` of each of the ``NumberOfFrames`` frames the decoder
    decodes, split as pydicom's decoders split them (the offset tables, else the number of frames):
    pydicom reads each frame's fragments whole, and a frame's head is joined from them only that far;
    one frame is held at a time. Stops at the first frame pydicom cannot split off."""
    count = int(ds.get("NumberOfFrames", 1) or 1)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frames = generate_fragmented_frames(ds.PixelData, number_of_frames=count, extended_offsets=extended)
        for fragments in itertools.islice(frames, count):
            head = b""
            for fragment in fragments:
                head += fragment[: CODESTREAM_HEADER_BYTES - len(head)]
                if len(head) >= CODESTREAM_HEADER_BYTES:
                    break
            yield head
    except Exception:  # not splittable into frames: pydicom's decoder fails on it the same way
        return


def jpeg_declared_image(head: bytes) -> DeclaredImage | None:
    """The image a JPEG (ISO/IEC 10918-1) or JPEG-LS (14495-1) frame header declares, from its first
    start-of-frame segment (pydicom's parser); ``None`` when there is none to read. A height of 0 (to
    be given later, by a DNL marker or a JPEG-LS LSE segment) is returned as 0."""
    info = _get_jpg_parameters(without_fill_bytes(head))
    try:
        return DeclaredImage(
            rows=int(info["height"]),
            columns=int(info["width"]),
            components=int(info["components"]),
            precision=int(info["precision"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


_MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI
_START_OF_SCAN = 0xDA


def without_fill_bytes(head: bytes) -> bytes:
    """``head`` with the fill bytes (``0xFF``, any number, T.81 B.1.1.2; JPEG-LS the same) before each
    marker of its header taken out, walked segment by segment up to the start of scan so that an
    ``FF FF`` inside a segment (a table, an APP payload) stays. A head that does not start with SOI, or
    that stops making sense, is returned from that point as it is, for the parser to refuse."""
    if not head.startswith(b"\xff\xd8"):
        return head
    out, i = bytearray(head[:2]), 2
    while i < len(head) and head[i] == 0xFF:
        while i + 1 < len(head) and head[i + 1] == 0xFF:
            i += 1  # a fill byte
        if i + 1 >= len(head):
            break
        marker = head[i + 1]
        out += head[i : i + 2]
        i += 2
        if marker in _MARKERS_WITHOUT_LENGTH:
            continue
        length = int.from_bytes(head[i : i + 2], "big")
        out += head[i : i + length]
        i += length
        if marker == _START_OF_SCAN:
            break
    out += head[i:]
    return bytes(out)


def j2k_declared_image(head: bytes) -> DeclaredImage | None:
    """The image a JPEG 2000 or HTJ2K (ISO/IEC 15444-1, -15) codestream declares in its SIZ segment,
    which must follow the SOC marker (A.5.1): the image area ``Xsiz - XOsiz`` by ``Ysiz - YOsiz``, its
    ``Csiz`` components and the widest one's bits. A JP2-wrapped codestream (which DICOM does not use,
    but pydicom and the decoders accept) is found in its ``jp2c`` box. ``None`` when it cannot be read.
    Written by hand: see the module's doc."""
    offset = _jp2_codestream_offset(head)
    if offset is None or head[offset : offset + 4] != b"\xff\x4f\xff\x51":
        return None
    try:
        length, _rsiz, xsiz, ysiz, xosiz, yosiz, *_tiles, csiz = struct.unpack_from(
            ">HHIIIIIIIIH", head, offset + 4
        )
    except struct.error:
        return None
    if csiz == 0 or length != 38 + 3 * csiz or len(head) < offset + 4 + length:
        return None
    components = head[offset + 42 : offset + 42 + 3 * csiz : 3]  # Ssiz of each, then XRsiz, YRsiz
    return DeclaredImage(
        rows=max(ysiz - yosiz, 0),
        columns=max(xsiz - xosiz, 0),
        components=csiz,
        precision=max((ssiz & 0x7F) + 1 for ssiz in components),  # the high bit: signed
    )


def _jp2_codestream_offset(head: bytes) -> int | None:
    """Where the codestream starts: 0 unless ``head`` is a JP2 file, then just inside its ``jp2c``
    box, walked as pydicom walks it; ``None`` when a box before it has a length under 8 (0: to the end
    of the file, 1: a 64-bit length), which pydicom's walk does not survive, or it is not found."""
    if not head.startswith(_JP2_SIGNATURE):
        return 0
    offset = 12
    while offset + 8 <= len(head):
        if head[offset + 4 : offset + 8] == b"jp2c":
            return offset + 8
        length = int.from_bytes(head[offset : offset + 4], "big")
        if length < 8:
            return None
        offset += length
    return None
