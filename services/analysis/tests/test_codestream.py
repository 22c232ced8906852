"""A compressed frame's codestream header is checked against the attributes before anything is decoded.

The attributes (Rows, Columns, the voxel budget) were bounded, but a JPEG-family decoder allocates the
image its codestream declares: 8 KB of JPEG 2000 declaring 8192x8192 in a 1024x1024 instance took
pydicom's decode to +394 MiB before the output was found not to fit. Each frame's SOF (JPEG, JPEG-LS)
or SIZ (JPEG 2000, HTJ2K) segment is now read first, and an instance whose codestream declares another
matrix or sample count, or samples wider than BitsAllocated, is refused (``pixel_data_unreadable``)
before any frame of the series is decoded. The codestreams here are real ones (pydicom's encoders,
Pillow, pydicom's test files) with their attributes or header bytes changed."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from enclave_analysis.codestream import (
    CODESTREAM_HEADER_BYTES,
    DeclaredImage,
    check_codestreams,
    j2k_declared_image,
    jpeg_declared_image,
    without_fill_bytes,
)
from enclave_analysis.errors import PixelDataError
from enclave_analysis.phantoms import write_mr_series
from enclave_analysis.volume import Volume, build_volume
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)

SHAPE = (64, 48, 3)  # columns, rows, slices: openjpeg needs some size for its wavelet levels


def _voxels() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 4000, SHAPE).astype(np.float32)


def _series(syntax: str | None = None) -> list[pydicom.Dataset]:
    """A 3-slice 48x64 16-bit series, compressed with pydicom's encoder for ``syntax``."""
    series = write_mr_series(Volume(voxels=_voxels(), affine_ras=np.diag([2.0, 2.0, 3.0, 1.0])))
    for ds in series:
        if syntax is not None:
            ds.compress(syntax)
    return series


def _frame(ds: pydicom.Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _set_frame(ds: pydicom.Dataset, codestream: bytes) -> None:
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """The pixel data decodes the analysis asks pydicom for (``Dataset.pixel_array``), counted."""
    calls: list[int] = []
    original = Dataset.pixel_array

    def counted(ds):
        calls.append(1)
        return original.fget(ds)

    monkeypatch.setattr(Dataset, "pixel_array", property(counted))
    return calls


def _refused(series, decodes: list[int]) -> str:
    with pytest.raises(PixelDataError) as refused:
        build_volume(series)
    assert refused.value.code == "pixel_data_unreadable"
    assert decodes == [], "a frame was decoded before the codestream was refused"
    return refused.value.reason


# ---- series that decode as before ---------------------------------------------------------------


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless])
def test_a_compressed_series_whose_codestreams_match_is_decoded_exactly(syntax, decodes) -> None:
    volume = build_volume(_series(syntax))
    assert volume.shape == SHAPE
    np.testing.assert_array_equal(volume.voxels, build_volume(_series()).voxels)
    assert len(decodes) == 3 + 3  # each slice once, compressed and not


def test_a_jpeg_baseline_series_is_decoded() -> None:
    series = _series()
    for k, ds in enumerate(series):
        image = io.BytesIO()
        Image.fromarray(((np.arange(48 * 64).reshape(48, 64) + 40 * k) % 256).astype(np.uint8)).save(
            image, format="JPEG", quality=95
        )
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        _set_frame(ds, image.getvalue())
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    assert jpeg_declared_image(_frame(series[0])) == DeclaredImage(48, 64, 1, 8)
    assert build_volume(series).shape == SHAPE


def test_a_jp2_wrapped_codestream_is_read_in_its_jp2c_box() -> None:
    """DICOM does not wrap a codestream in a JP2 file, but pydicom and the decoders take it."""
    series = _series(JPEG2000Lossless)
    for ds in series:
        _set_frame(ds, _jp2(_frame(ds)))
    assert j2k_declared_image(_frame(series[0])) == DeclaredImage(48, 64, 1, 16)
    np.testing.assert_array_equal(build_volume(series).voxels, build_volume(_series()).voxels)


def test_the_htj2k_syntaxes_are_read_from_the_same_siz_segment() -> None:
    """No HTJ2K encoder is installed; openjpeg decodes a Part 1 codestream under the HTJ2K syntax."""
    series = _series(JPEG2000Lossless)
    for ds in series:
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    np.testing.assert_array_equal(build_volume(series).voxels, build_volume(_series()).voxels)


def test_jpeg_family_test_files_of_pydicom_from_several_encoders_pass_the_check() -> None:
    """Real encoders' output, including 693_J2KI (a 16-bit codestream of BitsStored 14) and
    J2K_pixelrep_mismatch (an unsigned codestream of PixelRepresentation 1)."""
    names = [
        "693_J2KI.dcm",
        "J2K_pixelrep_mismatch.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "JPEG-LL.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "MR2_J2KI.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "examples_ybr_color.dcm",
        "US1_J2KR.dcm",
    ]
    for name in names:
        ds = pydicom.dcmread(get_testdata_file(name))
        check_codestreams(ds, name)
    j2ki = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))
    assert j2k_declared_image(_frame(j2ki)).precision == 16 and j2ki.BitsStored == 14


# ---- codestreams declaring another image --------------------------------------------------------


def test_a_jpeg_2000_codestream_of_a_larger_image_is_refused_before_any_decode(decodes) -> None:
    """A real 64x96 codestream in instance 1 of a series whose attributes say 48x64."""
    series = _series(JPEG2000Lossless)
    larger = write_mr_series(
        Volume(voxels=np.tile(_voxels(), (2, 1, 1)), affine_ras=np.diag([2.0, 2.0, 3.0, 1.0]))
    )[1]
    larger.compress(JPEG2000Lossless)
    _set_frame(series[1], _frame(larger))
    reason = _refused(series, decodes)
    assert reason == (
        "the pixel data of instance 1 cannot be decoded: frame 0 is JPEG 2000 Image Compression (Lossless "
        "Only) data declaring 48x128 pixels of 1 sample(s) in its codestream, where Rows x Columns is 48x64 "
        "of 1 (SamplesPerPixel); the codestream must declare the image its attributes describe"
    )
    larger.file_meta.TransferSyntaxUID = JPEG2000Lossless
    assert larger.pixel_array.shape == (48, 128)  # a real image, had its attributes said so


def test_the_hunt_s_8192_squared_jpeg_2000_is_refused_from_its_siz_segment(decodes) -> None:
    """The SIZ segment of every slice says 8192x8192 (one tile), the attributes 48x64."""
    series = _series(JPEG2000Lossless)
    for ds in series:
        codestream = bytearray(_frame(ds))
        struct.pack_into(">IIIIII", codestream, 8, 8192, 8192, 0, 0, 8192, 8192)  # Xsiz .. YTsiz
        _set_frame(ds, bytes(codestream))
    assert "declaring 8192x8192 pixels of 1 sample(s)" in _refused(series, decodes)


def test_an_htj2k_siz_of_a_larger_image_is_refused(decodes) -> None:
    series = _series(JPEG2000Lossless)
    for ds in series:
        codestream = bytearray(_frame(ds))
        struct.pack_into(">H", codestream, 6, 0x4000)  # Rsiz: HTJ2K capabilities (Part 15)
        struct.pack_into(">II", codestream, 8, 4096, 48)  # Xsiz, Ysiz
        _set_frame(ds, bytes(codestream))
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    assert "is High-Throughput JPEG 2000 Image Compression (Lossless Only) data declaring 48x4096" in (
        _refused(series, decodes)
    )


def test_the_image_offset_is_taken_off_the_declared_size() -> None:
    codestream = bytearray(_frame(_series(JPEG2000Lossless)[0]))
    struct.pack_into(">IIII", codestream, 8, 64 + 100, 48 + 7, 100, 7)  # Xsiz, Ysiz, XOsiz, YOsiz
    assert j2k_declared_image(bytes(codestream)) == DeclaredImage(48, 64, 1, 16)


def test_more_components_than_samples_per_pixel_are_refused(decodes) -> None:
    """A 3-component (RGB) codestream in a MONOCHROME2 instance: the decoder allocates 3 planes."""
    series = _series(JPEG2000Lossless)
    colour = Dataset()
    colour.file_meta = pydicom.dataset.FileMetaDataset()
    colour.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    colour.Rows, colour.Columns, colour.SamplesPerPixel = 48, 64, 3
    colour.PhotometricInterpretation, colour.PlanarConfiguration = "RGB", 0
    colour.BitsAllocated, colour.BitsStored, colour.HighBit, colour.PixelRepresentation = 8, 8, 7, 0
    colour.PixelData = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8).tobytes()
    colour.compress(JPEG2000Lossless)
    _set_frame(series[2], _frame(colour))
    reason = _refused(series, decodes)
    assert "instance 2 cannot be decoded: frame 0 is JPEG 2000" in reason
    assert (
        "declaring 48x64 pixels of 3 sample(s) in its codestream, where Rows x Columns is 48x64 of 1"
        in reason
    )


def test_a_jpeg_ls_codestream_of_a_larger_image_is_refused(decodes) -> None:
    series = _series(JPEGLSLossless)
    for ds in series:
        ds.Rows = 24  # the codestream keeps its 48 rows
    assert "JPEG-LS Lossless Image Compression data declaring 48x64 pixels" in _refused(series, decodes)


def _jpeg_lossless_series() -> list[pydicom.Dataset]:
    """pydicom's JPEG Lossless test image (GDCM's decoder) as a 3-slice series."""
    series, uid = [], generate_uid()
    for k in range(3):
        ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 2.0 * k]
        ds.PixelSpacing = [0.25, 0.25]
        series.append(ds)
    return series


def _with_sof(ds: pydicom.Dataset, rows: int, columns: int, precision: int | None = None) -> None:
    codestream = bytearray(_frame(ds))
    sof = codestream.index(b"\xff\xc3")  # the lossless start-of-frame
    if precision is not None:
        codestream[sof + 4] = precision
    struct.pack_into(">HH", codestream, sof + 5, rows, columns)
    _set_frame(ds, bytes(codestream))


def test_a_jpeg_lossless_start_of_frame_declaring_more_rows_is_refused(decodes) -> None:
    series = _jpeg_lossless_series()
    _with_sof(series[0], 4096, 256)
    assert (
        "frame 0 is JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1]) data declaring 4096x256 pixels"
        in (_refused(series, decodes))
    )


def test_a_jpeg_height_left_to_a_dnl_marker_is_refused(decodes) -> None:
    """A height of 0 means "given after the first scan" (a DNL marker): nothing bounds it beforehand."""
    series = _jpeg_lossless_series()
    _with_sof(series[2], 0, 256)
    assert "instance 2 cannot be decoded: frame 0 is JPEG Lossless" in _refused(series, decodes)


# ---- precision ----------------------------------------------------------------------------------


def test_a_precision_wider_than_bits_allocated_is_refused(decodes) -> None:
    """pydicom decodes a 16-bit codestream of BitsAllocated 8 into 8-bit samples without a word (values
    cut to the low byte)."""
    series = _series(JPEG2000Lossless)
    for ds in series:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    reason = _refused(series, decodes)
    assert reason.endswith(
        "frame 0 is JPEG 2000 Image Compression (Lossless Only) data of 16-bit samples, wider than "
        "BitsAllocated (8); a codestream's precision may differ from BitsStored but must fit BitsAllocated"
    )


def test_a_precision_that_differs_from_bits_stored_but_fits_is_decoded() -> None:
    """PS3.5 8.2: the codestream's characteristics control its decompression; pydicom decodes with the
    codestream's precision either way (16-bit data of BitsStored 12, 12-bit of BitsStored 16)."""
    series = _series(JPEG2000Lossless)
    for ds in series:
        ds.BitsStored, ds.HighBit = 12, 11
    np.testing.assert_array_equal(build_volume(series).voxels, build_volume(_series()).voxels)
    jpeg = _jpeg_lossless_series()
    _with_sof(jpeg[1], 1024, 256, precision=12)
    check_codestreams(jpeg[1], "instance 1")


# ---- headers that cannot be read ----------------------------------------------------------------


def test_a_jpeg_frame_without_a_start_of_image_is_refused(decodes) -> None:
    series = _series(JPEGLSLossless)
    _set_frame(series[1], b"\x00\x00" + _frame(series[1]))
    assert _refused(series, decodes) == (
        "the pixel data of instance 1 cannot be decoded: frame 0 is JPEG-LS Lossless Image Compression "
        "data whose header cannot be read (no start-of-frame or SIZ marker segment where the standard "
        "puts it, in its first 64 KiB); the image a codestream declares is checked before it is decoded"
    )


def test_a_start_of_frame_past_the_first_64_kib_is_refused() -> None:
    """Only a frame's first ``CODESTREAM_HEADER_BYTES`` are read; APP segments filling them hide the SOF."""
    ds = _series(JPEGLSLossless)[0]
    codestream = _frame(ds)
    filler = b"\xff\xe1" + struct.pack(">H", 65533) + bytes(65531)  # one APP1 segment of 64 KiB
    _set_frame(ds, codestream[:2] + filler + codestream[2:])
    assert len(_frame(ds)) > CODESTREAM_HEADER_BYTES
    with pytest.raises(PixelDataError, match="whose header cannot be read"):
        check_codestreams(ds, "instance 0")


@pytest.mark.timeout(60)
def test_a_jp2_box_of_length_0_is_refused_before_pydicom_s_parser_loops_on_it(decodes) -> None:
    """pydicom's ``get_j2k_parameters``, which its decoders call before each JPEG 2000 frame, never
    returns for a JP2 box whose length is 0 (the worker stalled for good); it is refused first."""
    series = _series(JPEG2000Lossless)
    _set_frame(series[0], _jp2(_frame(series[0]), empty_box_first=True))
    assert "whose header cannot be read" in _refused(series, decodes)


def test_a_siz_segment_cut_short_or_with_a_wrong_length_is_unreadable() -> None:
    codestream = _frame(_series(JPEG2000Lossless)[0])
    assert j2k_declared_image(codestream[:44]) is None
    wrong = bytearray(codestream)
    struct.pack_into(">H", wrong, 4, 40)  # Lsiz for Csiz 1 is 41
    assert j2k_declared_image(bytes(wrong)) is None
    assert j2k_declared_image(codestream) == DeclaredImage(48, 64, 1, 16)


# ---- frames -------------------------------------------------------------------------------------


def test_each_frame_of_a_multi_frame_instance_is_checked_and_fragments_joined_for_the_header() -> None:
    """Frame 2 of 3 declares 96 rows; split into two fragments each (the first ends inside the SIZ
    segment), the frames' headers are still read whole."""
    frames = [_frame(ds) for ds in _series(JPEG2000Lossless)]
    taller = bytearray(frames[2])
    struct.pack_into(">I", taller, 12, 96)  # Ysiz
    ds = _series()[0]
    ds.NumberOfFrames = 3
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    for pixel_data in (encapsulate(frames), _split_fragments(frames, at=20)):
        ds.PixelData = pixel_data
        check_codestreams(ds, "enhanced instance 0")
    for pixel_data in (
        encapsulate([*frames[:2], bytes(taller)]),
        _split_fragments([*frames[:2], bytes(taller)], at=20),
    ):
        ds.PixelData = pixel_data
        with pytest.raises(
            PixelDataError, match="enhanced instance 0 cannot be decoded: frame 2 is .* 96x64"
        ):
            check_codestreams(ds, "enhanced instance 0")


def _split_fragments(frames: list[bytes], at: int) -> bytes:
    """Each frame in two fragments, the first ``at`` bytes long (mid-SIZ), with a basic offset table."""
    items, offsets, position = [], [], 0
    for frame in frames:
        offsets.append(position)
        for piece in (frame[:at], frame[at:] + b"\x00" * ((len(frame) - at) % 2)):
            item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(piece)) + piece
            items.append(item)
            position += len(item)
    table = (
        b"\xfe\xff\x00\xe0" + struct.pack("<I", 4 * len(offsets)) + struct.pack(f"<{len(offsets)}I", *offsets)
    )
    return table + b"".join(items)


def _jp2(codestream: bytes, empty_box_first: bool = False) -> bytes:
    """``codestream`` in a minimal JP2 file (ISO/IEC 15444-1 Annex I): signature, ftyp, jp2h, jp2c."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    header = box(b"ihdr", struct.pack(">IIHBBBB", 48, 64, 1, 15, 7, 0, 0)) + box(
        b"colr", bytes([1, 0, 0]) + struct.pack(">I", 17)
    )
    empty = struct.pack(">I", 0) + b"xml " if empty_box_first else b""
    return (
        box(b"jP  ", b"\r\n\x87\n")
        + empty
        + box(b"ftyp", b"jp2 " + bytes(4) + b"jp2 ")
        + box(b"jp2h", header)
        + box(b"jp2c", codestream)
    )


# ---- fill bytes before markers (T.81 B.1.1.2) ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "before"),
    [
        ("JPEG-LL.dcm", b"\xff\xc3"),  # lossless SOF3
        ("SC_rgb_jpeg_dcmtk.dcm", b"\xff\xc0"),  # baseline SOF0
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", b"\xff\xc3"),
        ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7"),  # JPEG-LS SOF55
    ],
)
def test_fill_bytes_before_a_marker_are_allowed_as_the_decoder_allows_them(name, before) -> None:
    """Any number of 0xFF may precede a marker; pydicom's header walk alone reads ``FF FF`` as a
    marker and gives up, so such a valid frame was refused ``header cannot be read``. Its decoder
    decodes it to the same pixels."""
    ds = pydicom.dcmread(get_testdata_file(name))
    reference = ds.pixel_array.copy()
    codestream = _frame(ds)
    at = codestream.index(before)
    filled = codestream[:at] + b"\xff\xff\xff" + codestream[at:]
    assert jpeg_declared_image(filled) == jpeg_declared_image(codestream) is not None
    _set_frame(ds, filled)
    check_codestreams(ds, name)
    assert np.array_equal(ds.pixel_array, reference)


def test_fill_bytes_are_taken_out_only_before_markers_not_inside_a_segment() -> None:
    """An ``FF FF`` inside an APP payload is data: the walk steps over the segment by its length."""
    app = b"\xff\xe1" + struct.pack(">H", 2 + 6) + b"\xff\xff\xff\xff\x00\x01"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 3, 5, 1) + b"\x01\x11\x00"
    head = b"\xff\xd8" + app + b"\xff\xff" + sof + b"\xff\xda\x00\x02" + b"\xff\xff\x00"
    assert without_fill_bytes(head) == b"\xff\xd8" + app + sof + b"\xff\xda\x00\x02" + b"\xff\xff\x00"
    assert jpeg_declared_image(head) == DeclaredImage(rows=3, columns=5, components=1, precision=8)
