"""Build one 3D volume from the instances of a DICOM MR series.

Slices are ordered by ``ImagePositionPatient`` projected on the slice normal (the cross product
of the two ``ImageOrientationPatient`` direction cosines), never by ``InstanceNumber``. Classic
single-frame MR and enhanced multi-frame MR (``PerFrameFunctionalGroupsSequence``) are supported.

Coordinate convention: DICOM patient coordinates are LPS (x to the patient's left, y to the
posterior, z to the head). The returned :class:`Volume` holds voxels indexed ``[i, j, k]`` with
``i`` along a row (the first ``ImageOrientationPatient`` vector), ``j`` down a column and ``k``
along the slice normal, and ``affine_ras`` maps ``(i, j, k, 1)`` to RAS millimetres (the NIfTI
convention: ``RAS = diag(-1, -1, 1) @ LPS``); ``affine_lps`` gives the DICOM/ITK one.

Written by hand: pydicom reads the attributes and pixels but no maintained library performs
this geometry validation with per-failure reasons (nibabel's ``nicom`` is deprecated and
dicom2nifti tolerates gaps silently).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
import structlog
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes, RLELossless, UncompressedTransferSyntaxes

from enclave_analysis.codestream import check_codestreams
from enclave_analysis.errors import (
    MixedPatientsError,
    PixelDataError,
    PixelValueError,
    SeriesGeometryError,
    SeriesTooLargeError,
)

log = structlog.get_logger("enclave.analysis")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Direction cosines of two slices are "the same orientation" within this absolute difference.
ORIENTATION_TOLERANCE = 1e-4
#: Slice gaps may differ from the median by this fraction (plus 0.01 mm) and still be uniform.
SPACING_RELATIVE_TOLERANCE = 0.02
#: In-plane offset between consecutive slice origins above this (mm) means gantry tilt or shear.
TILT_TOLERANCE_MM = 0.05
#: A voxel edge (each PixelSpacing value, the spacing of the slice positions) outside this range (mm)
#: is a wrong attribute, not an in-vivo brain MR acquisition (0.2 to 7 mm). ITK refuses a zero spacing
#: and a negative one mirrors the image.
VOXEL_SIZE_RANGE_MM = (0.05, 20.0)
#: Rescaled intensities are stored as 32-bit floats.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The field of view along each axis (voxels times spacing, mm) the pipeline takes. A larger one is
#: resampled to the 2 mm registration grid whatever it holds: a 1.3 m field ran for over 10 minutes
#: and 3.6 GB, a 0.45 m one 133 s and 2.1 GB (a head is ~0.25 m). Below a few mm the pipeline failed
#: with an internal error (1.5 mm). The upper bound is checked by ``build_volume`` before it allocates
#: the volume, the lower one by ``segment_brain`` (the unit tests build tiny volumes).
FIELD_OF_VIEW_RANGE_MM = (20.0, 500.0)
#: A decoded RLE segment may exceed Rows x Columns by at most this many bytes (one run: encoders that
#: pad a segment; pydicom warns and drops the excess). More is refused before it is decoded.
RLE_SEGMENT_SLACK = 128
#: A volume past ``VolumeLimits.max_voxels`` is reduced in-plane by block averaging with the smallest
#: integer factor up to this one that brings it within the budget (a 512x512 ZIP512 / interpolated T1
#: by 2); past it, refused. The pipeline registers on a 2 mm grid and bias-corrects at 4 mm.
MAX_IN_PLANE_REDUCTION = 4


@dataclass(frozen=True)
class VolumeLimits:
    """Size bounds checked from the attributes, before any pixel data is decoded or the volume is
    allocated (``SeriesTooLargeError``). Set from ``AnalysisSettings`` in the service."""

    #: Rows and Columns of each slice at most this (brain MR matrices are 64 to 512, rarely 1024).
    max_matrix: int = 1024
    #: Voxels of the whole volume as analysed (columns x rows x slices, after any in-plane reduction,
    #: ``MAX_IN_PLANE_REDUCTION``) at most this: 24 Mi, a 0.8 mm
    #: 320x320x240 T1, almost three times the 1 mm MNI template (8.7 M voxels, < 2 GiB peak in the
    #: worker). The pipeline needs ~160 bytes per voxel besides a ~0.5 GiB base, so 24 Mi voxels is
    #: ~4.3 GiB of the pod's 6 GiB (extrapolated from the template, not measured).
    max_voxels: int = 24 * 2**20


DEFAULT_LIMITS = VolumeLimits()


@dataclass(frozen=True)
class Volume:
    """A 3D scalar volume in real-world units with its voxel-to-RAS affine (see module doc).
    ``in_plane_reduction`` is the factor f by which ``build_volume`` averaged each slice in f x f
    blocks (the series was past its voxel budget); 1 when the slices kept their acquired matrix."""

    voxels: npt.NDArray[np.float32]
    affine_ras: npt.NDArray[np.float64]
    in_plane_reduction: int = 1

    @property
    def affine_lps(self) -> npt.NDArray[np.float64]:
        """Voxel index to DICOM patient (LPS) millimetres."""
        return LPS_TO_RAS @ self.affine_ras

    @cached_property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel edge lengths along i, j, k."""
        norms = np.linalg.norm(self.affine_ras[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm^3)."""
        return abs(float(np.linalg.det(self.affine_ras[:3, :3]))) / 1000.0

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.voxels.shape
        return (int(s[0]), int(s[1]), int(s[2]))


@dataclass(frozen=True)
class _Plane:
    """One 2D frame with the geometry needed to stack it; pixels are read on demand."""

    key: str
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    pixels: Callable[[], npt.NDArray[np.generic]]


def build_volume(datasets: Sequence[Dataset], limits: VolumeLimits = DEFAULT_LIMITS) -> Volume:
    """Stack the instances of one series into a :class:`Volume`.

    Before any pixel data is decoded and before the volume is allocated, the matrix of each slice
    and the voxels of the whole volume are checked against ``limits`` (:class:`SeriesTooLargeError`)
    and the field of view against ``FIELD_OF_VIEW_RANGE_MM``'s upper bound; then a JPEG, JPEG-LS,
    JPEG 2000 or HTJ2K frame whose codestream header declares another image than its instance's
    attributes (``codestream.check_codestreams``), and an RLE segment that would decode to more than
    its frame's Rows x Columns, are refused (:class:`PixelDataError`): the codestreams before any
    frame of the series is decoded, the RLE segment before its instance is. A volume past
    ``limits.max_voxels`` is reduced in-plane, each decoded slice averaged in f x f blocks before it
    is written into a volume allocated at the reduced size, with the smallest f up to
    ``MAX_IN_PLANE_REDUCTION`` that fits (spacing x f, the first voxel at the first block's centre;
    ``Volume.in_plane_reduction`` is f); only when none fits is it refused.

    Raises :class:`SeriesGeometryError` with a precise, PHI-free reason when the instances do
    not form a single regular volume: missing geometry attributes, several series, mixed
    orientation or in-plane geometry, a voxel size out of range, gantry tilt, two different slices
    at one position, or a missing slice / non-uniform spacing. Raises :class:`MixedPatientsError`
    when the instances belong to different patients, and :class:`PixelValueError` when the stored
    values do not give an image (unusable rescale attributes, non-finite or uniform intensities).
    """
    if not datasets:
        raise SeriesGeometryError("the series has no instances; at least 2 slices are required")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise SeriesGeometryError(
            f"instances belong to {len(series_uids)} different series; one series is allowed"
        )
    _check_one_patient(datasets)
    planes = [plane for number, ds in enumerate(datasets) for plane in _planes_of(ds, number, limits)]
    planes = _without_duplicates(planes)
    if len(planes) < 2:
        raise SeriesGeometryError(f"the series has {len(planes)} slice; at least 2 are required")
    factor = _in_plane_reduction(planes, limits)
    _check_same_in_plane_geometry(planes)
    normal = _slice_normal(planes[0].orientation)
    heights = np.array([float(p.position @ normal) for p in planes])
    order = np.argsort(heights, kind="stable")
    planes = [planes[int(n)] for n in order]
    heights = heights[order]
    _check_finite_gaps(heights)
    _check_positions_distinct(heights)
    _check_no_tilt(planes, normal)
    slice_spacing = _check_uniform_spacing(heights)
    if not _voxel_size_allowed(slice_spacing):
        raise SeriesGeometryError(
            f"slices are {slice_spacing:.3g} mm apart (from ImagePositionPatient); the spacing between "
            f"slices must be between {_voxel_size_range()}"
        )

    first = planes[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    row_spacing, col_spacing = first.pixel_spacing  # PixelSpacing = (between rows, between columns)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = (planes[-1].position - first.position) / (len(planes) - 1)
    # The first voxel of a reduced volume is the centre of the first f x f block.
    affine_lps[:3, 3] = first.position + (factor - 1) / 2 * (affine_lps[:3, 0] + affine_lps[:3, 1])
    affine_lps[:3, :2] *= factor
    if not np.isclose(np.linalg.norm(affine_lps[:3, 2]), slice_spacing, rtol=1e-3, atol=1e-3):
        raise SeriesGeometryError("slice positions are inconsistent with the slice normal")
    # Before the volume is allocated (segment_brain checks the lower bound too).
    check_field_of_view(
        (first.columns * col_spacing, first.rows * row_spacing, len(planes) * slice_spacing), low=False
    )
    # The image each compressed frame declares, before any frame of the series is decoded.
    for number, ds in enumerate(datasets):
        check_codestreams(ds, _instance_where(ds, number))

    voxels = np.empty((first.columns // factor, first.rows // factor, len(planes)), dtype=np.float32)
    for k, plane in enumerate(planes):
        frame = np.asarray(plane.pixels(), dtype=np.float64)
        if frame.shape != (plane.rows, plane.columns):
            raise SeriesGeometryError(
                f"slice {k} pixel data has shape {frame.shape}; expected ({plane.rows}, {plane.columns})"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below, with a reason
            rescaled = frame * plane.slope + plane.intercept
        if not np.all(np.abs(rescaled) <= FLOAT32_MAX):  # also false for NaN
            raise PixelValueError(
                f"RescaleSlope and RescaleIntercept turn the stored values of slice {k} into numbers that "
                "are not finite or exceed 32-bit floating point (3.4e38); rescaled values must stay "
                "within that range"
            )
        if factor > 1:
            rescaled = _block_mean(rescaled, factor)
        voxels[:, :, k] = rescaled.T
    if factor > 1:
        log.info("volume reduced in-plane", factor=factor, shape=list(voxels.shape))
    if float(voxels.min()) == float(voxels.max()):
        raise PixelValueError(
            "every voxel of the volume has the same value: there is no image to analyse (blank pixel "
            "data, or a RescaleSlope that gives every voxel one value); a T1-weighted brain volume is required"
        )
    return Volume(voxels=voxels, affine_ras=LPS_TO_RAS @ affine_lps, in_plane_reduction=factor)


def _in_plane_reduction(planes: list[_Plane], limits: VolumeLimits) -> int:
    """The smallest in-plane reduction factor (1 = none, up to ``MAX_IN_PLANE_REDUCTION``) with which
    the volume has at most ``limits.max_voxels`` voxels, from the attributes; none fits: refused."""
    voxel_count = sum(plane.rows * plane.columns for plane in planes)
    for factor in range(1, MAX_IN_PLANE_REDUCTION + 1):
        if any(plane.rows < factor or plane.columns < factor for plane in planes):
            break
        if sum((plane.rows // factor) * (plane.columns // factor) for plane in planes) <= limits.max_voxels:
            return factor
    raise SeriesTooLargeError(
        f"the series' {len(planes)} slices of {planes[0].rows}x{planes[0].columns} make a volume of "
        f"{voxel_count:,} voxels, more than {limits.max_voxels:,} even reduced in-plane by "
        f"{MAX_IN_PLANE_REDUCTION} (ENCLAVE_ANALYSIS_MAX_SERIES_VOXELS)"
    )


def _block_mean(frame: npt.NDArray[np.float64], factor: int) -> npt.NDArray[np.float64]:
    """The means of ``factor`` x ``factor`` blocks of a frame; rows and columns that do not fill a
    block (the last ones) are dropped."""
    rows, columns = frame.shape[0] // factor, frame.shape[1] // factor
    blocks = frame[: rows * factor, : columns * factor].reshape(rows, factor, columns, factor)
    return np.asarray(blocks.mean(axis=(1, 3)), dtype=np.float64)


def check_field_of_view(field: Sequence[float], *, low: bool = True) -> None:
    """Refuse a field of view (mm along i, j, k) no brain series has (wrong spacing attributes): above
    ``FIELD_OF_VIEW_RANGE_MM``, and below it unless ``low`` is False."""
    minimum, maximum = FIELD_OF_VIEW_RANGE_MM
    if not all((minimum <= extent or not low) and extent <= maximum for extent in field):
        raise SeriesGeometryError(
            "the field of view is {:.0f} x {:.0f} x {:.0f} mm (columns, rows and slices times their "
            "spacing); a brain series covers between {:g} and {:g} mm along each axis. Check PixelSpacing "
            "and ImagePositionPatient".format(*field, minimum, maximum)
        )


def _check_matrix(rows: int, columns: int, where: str, limits: VolumeLimits) -> None:
    """Rows and Columns from the attributes, before anything is decoded."""
    if rows < 1 or columns < 1:
        raise SeriesGeometryError(
            f"{where} has a matrix of {rows}x{columns}; Rows and Columns must be positive"
        )
    if rows > limits.max_matrix or columns > limits.max_matrix:
        raise SeriesTooLargeError(
            f"{where} has a matrix of {rows}x{columns} (Rows x Columns); at most {limits.max_matrix} "
            "rows and columns per slice are analysed (ENCLAVE_ANALYSIS_MAX_MATRIX)"
        )


def _patient_identity(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _check_one_patient(datasets: Sequence[Dataset]) -> None:
    """The series' instances must carry one patient identity: their PatientID (a pseudonym per
    patient once de-identified), or their PatientName if none carries a PatientID. Instances without
    either are not compared. The identities are never quoted (PHI when the policy keeps them)."""
    for keyword in ("PatientID", "PatientName"):
        identities = {_patient_identity(ds, keyword) for ds in datasets} - {""}
        if len(identities) > 1:
            raise MixedPatientsError(
                f"the instances of this series belong to {len(identities)} different patients (their "
                f"{keyword} differs); one patient per series is allowed. Series of different patients "
                "probably share a SeriesInstanceUID: each series needs its own"
            )
        if identities:
            return


def _float_list(value: object, count: int, name: str) -> npt.NDArray[np.float64]:
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise SeriesGeometryError(f"{name} is not numeric; {count} decimal values are required") from None
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise SeriesGeometryError(f"{name} must have {count} finite values")
    return array


def _orientation(value: object) -> npt.NDArray[np.float64]:
    orientation = _float_list(value, 6, "ImageOrientationPatient")
    row_dir, col_dir = orientation[:3], orientation[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1, atol=1e-3)
        and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-3)
    ):
        raise SeriesGeometryError("ImageOrientationPatient direction cosines must be unit vectors")
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise SeriesGeometryError("ImageOrientationPatient row and column directions must be orthogonal")
    return orientation


def _slice_normal(orientation: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    normal = np.cross(orientation[:3], orientation[3:])
    return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data this installation decodes (pydicom's decoders with
    their plugins present, plus the uncompressed ones), by name."""
    return sorted(UID(uid).name for uid in AllTransferSyntaxes if _decodable(UID(uid)))


def _decodable(syntax: UID) -> bool:
    if syntax in UncompressedTransferSyntaxes:
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # pydicom knows no decoder for it at all (MPEG, for instance)
        return False


def _pixel_array(ds: Dataset, where: str) -> npt.NDArray[np.generic]:
    """``ds.pixel_array``, or :class:`PixelDataError` saying why it cannot be had and what can. The
    decoder's own message is not repeated (it may quote the data)."""
    _check_rle_sizes(ds, where)
    try:
        return ds.pixel_array
    except Exception as exc:
        syntax = UID(str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
        if not _decodable(syntax):
            problem = f"no decoder for {syntax.name} is installed"
        else:
            problem = f"it is not valid {syntax.name} data for its Rows, Columns and Bits Allocated"
        raise PixelDataError(
            f"the pixel data of {where} cannot be decoded: {problem}; decodable here: "
            + ", ".join(decodable_transfer_syntaxes())
        ) from exc


def _check_rle_sizes(ds: Dataset, where: str) -> None:
    """Refuse RLE Lossless pixel data whose segments decode to more than their frame's Rows x Columns
    bytes, before it is decoded: pydicom decodes each segment whole and then cuts it to the frame
    (a 64x64 frame of 24 MiB segments decoded to 256 MiB each). The run headers (PS3.5 G.3.1) give a
    segment's decoded length without decoding it; counting stops once the bound is passed. Anything
    else that is wrong is left to pydicom's decoder (``pixel_data_unreadable`` too)."""
    meta = ds.get("file_meta")
    if meta is None or getattr(meta, "TransferSyntaxUID", None) != RLELossless or "PixelData" not in ds:
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        frames = generate_frames(ds.PixelData, number_of_frames=count)
        bound = rows * columns + RLE_SEGMENT_SLACK
        for frame_number, frame in enumerate(frames):
            segments, *offsets = struct.unpack("<16L", frame[:64])
            ends = [*offsets[:segments], len(frame)][1:]
            for segment_number, (start, end) in enumerate(zip(offsets[:segments], ends, strict=True)):
                if rle_decoded_length(frame[start:end], bound) > bound:
                    raise PixelDataError(
                        f"the pixel data of {where} cannot be decoded: RLE segment {segment_number} of "
                        f"frame {frame_number} decodes to more than the {rows * columns} bytes its Rows and "
                        "Columns allow; it is not valid RLE Lossless data for its Rows and Columns"
                    )
    except PixelDataError:
        raise
    except Exception:  # not parseable here: pydicom's decoder says so (and is refused as unreadable)
        return


def rle_decoded_length(segment: bytes, bound: int) -> int:
    """The number of bytes an RLE segment (PS3.5 G.3.1) decodes to, as pydicom's decoder does it,
    counted without decoding; counting stops once it exceeds ``bound``."""
    total, position, size = 0, 0, len(segment)
    while position < size and total <= bound:
        header = segment[position]
        if header < 128:  # a literal run of header + 1 bytes
            run = min(header + 1, size - position - 1)
            position += header + 2
        elif header > 128:  # the next byte 257 - header times
            run = 257 - header if position + 1 < size else 0
            position += 2
        else:  # 128: no operation
            run = 0
            position += 1
        total += run
    return total


def _require(ds: Dataset, keyword: str, where: str) -> object:
    if keyword not in ds:
        raise SeriesGeometryError(f"{where} lacks {keyword}, which is required to build a volume")
    return ds[keyword].value


def _voxel_size_allowed(size: float) -> bool:
    low, high = VOXEL_SIZE_RANGE_MM
    return bool(low <= size <= high)  # also false for NaN


def _voxel_size_range() -> str:
    return f"{VOXEL_SIZE_RANGE_MM[0]:g} and {VOXEL_SIZE_RANGE_MM[1]:g} mm"


def _pixel_spacing(value: object, where: str) -> tuple[float, float]:
    spacing = _float_list(value, 2, "PixelSpacing")
    if not all(_voxel_size_allowed(float(v)) for v in spacing):
        raise SeriesGeometryError(
            f"PixelSpacing of {where} is {float(spacing[0]):g}\\{float(spacing[1]):g} mm; each value "
            f"must be between {_voxel_size_range()}"
        )
    return float(spacing[0]), float(spacing[1])


def _rescale_value(ds: Dataset, keyword: str, default: float, where: str) -> float:
    """One rescale attribute as a finite number; absent or empty, its identity value (PS3.3
    C.11.1.1.2). Its text is never quoted: it need not be a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PixelValueError(
            f"{keyword} of {where} is not a number; one decimal value is required"
        ) from None
    if not np.isfinite(number):
        raise PixelValueError(f"{keyword} of {where} is not finite; a finite decimal value is required")
    return number


def _rescale(ds: Dataset, where: str) -> tuple[float, float]:
    """``RescaleSlope`` and ``RescaleIntercept``. A slope of 0 would make every voxel the intercept:
    refused (it was taken as 1 before, and the analysis ran on intensities the data does not state)."""
    slope = _rescale_value(ds, "RescaleSlope", 1.0, where)
    intercept = _rescale_value(ds, "RescaleIntercept", 0.0, where)
    if slope == 0.0:
        raise PixelValueError(
            f"RescaleSlope of {where} is 0, which gives every voxel the value of RescaleIntercept; a "
            "non-zero slope is required (without RescaleSlope, 1 is used)"
        )
    return slope, intercept


def _is_enhanced(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _instance_where(ds: Dataset, number: int) -> str:
    """How a reason names the ``number``-th instance of the series (never by a UID)."""
    return f"enhanced instance {number}" if _is_enhanced(ds) else f"instance {number}"


def _planes_of(ds: Dataset, number: int, limits: VolumeLimits) -> list[_Plane]:
    if _is_enhanced(ds):
        return _frames_of_enhanced(ds, number, limits)
    where = _instance_where(ds, number)
    rows, columns = int(_require(ds, "Rows", where)), int(_require(ds, "Columns", where))  # type: ignore[call-overload]
    _check_matrix(rows, columns, where, limits)
    spacing = _pixel_spacing(_require(ds, "PixelSpacing", where), where)
    slope, intercept = _rescale(ds, where)
    return [
        _Plane(
            key=str(ds.get("SOPInstanceUID", f"instance-{number}")),
            position=_float_list(_require(ds, "ImagePositionPatient", where), 3, "ImagePositionPatient"),
            orientation=_orientation(_require(ds, "ImageOrientationPatient", where)),
            pixel_spacing=spacing,
            rows=rows,
            columns=columns,
            slope=slope,
            intercept=intercept,
            pixels=lambda ds=ds, where=where: _pixel_array(ds, where),
        )
    ]


def _functional_group(ds: Dataset, frame: Dataset | None, sequence: str) -> Dataset | None:
    """The per-frame item of a functional group, else the shared one (PS3.3 C.7.6.16)."""
    if frame is not None and sequence in frame and len(frame[sequence].value) > 0:
        item: Dataset = frame[sequence].value[0]
        return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0] and len(shared[0][sequence].value) > 0:
        item = shared[0][sequence].value[0]
        return item
    return None


def _frames_of_enhanced(ds: Dataset, number: int, limits: VolumeLimits) -> list[_Plane]:
    where = _instance_where(ds, number)
    frames = _require(ds, "PerFrameFunctionalGroupsSequence", where)
    rows, columns = int(_require(ds, "Rows", where)), int(_require(ds, "Columns", where))  # type: ignore[call-overload]
    _check_matrix(rows, columns, where, limits)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if len(frames) != count:  # type: ignore[arg-type]
        raise SeriesGeometryError(
            f"{where} has {len(frames)} per-frame groups for {count} frames; one per frame is required"  # type: ignore[arg-type]
        )
    cache: dict[str, npt.NDArray[np.generic]] = {}

    def frame_pixels(index: int) -> npt.NDArray[np.generic]:
        if "all" not in cache:
            array = _pixel_array(ds, where)
            cache["all"] = array if array.ndim == 3 else array[np.newaxis]
        return cache["all"][index]

    planes = []
    sop_uid = str(ds.get("SOPInstanceUID", f"instance-{number}"))
    for index, frame in enumerate(frames):  # type: ignore[arg-type]
        position = _functional_group(ds, frame, "PlanePositionSequence")
        orientation = _functional_group(ds, frame, "PlaneOrientationSequence")
        measures = _functional_group(ds, frame, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise SeriesGeometryError(
                f"frame {index} of {where} lacks plane position, plane orientation or pixel measures; "
                "all three functional groups are required"
            )
        transform = _functional_group(ds, frame, "PixelValueTransformationSequence")
        frame_where = f"frame {index} of {where}"
        slope, intercept = _rescale(transform if transform is not None else ds, frame_where)
        spacing = _pixel_spacing(_require(measures, "PixelSpacing", f"frame {index}"), frame_where)
        planes.append(
            _Plane(
                key=f"{sop_uid}#{index}",
                position=_float_list(
                    _require(position, "ImagePositionPatient", f"frame {index}"), 3, "ImagePositionPatient"
                ),
                orientation=_orientation(_require(orientation, "ImageOrientationPatient", f"frame {index}")),
                pixel_spacing=spacing,
                rows=rows,
                columns=columns,
                slope=slope,
                intercept=intercept,
                pixels=lambda index=index: frame_pixels(index),
            )
        )
    return planes


def _without_duplicates(planes: list[_Plane]) -> list[_Plane]:
    """Drop repeated deliveries of the same instance (at-least-once delivery upstream)."""
    seen: set[str] = set()
    unique = []
    for plane in planes:
        if plane.key not in seen:
            seen.add(plane.key)
            unique.append(plane)
    return unique


def _check_same_in_plane_geometry(planes: list[_Plane]) -> None:
    first = planes[0]
    for plane in planes[1:]:
        if not np.allclose(plane.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise SeriesGeometryError(
                "slices have mixed orientations (ImageOrientationPatient differs); "
                "one orientation per series is allowed"
            )
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise SeriesGeometryError(
                f"slices have different matrix sizes ({first.rows}x{first.columns} and "
                f"{plane.rows}x{plane.columns}); one matrix size per series is allowed"
            )
        if not np.allclose(plane.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
            raise SeriesGeometryError(
                f"slices have different pixel spacings ({first.pixel_spacing[0]:g}x{first.pixel_spacing[1]:g}"
                f" and {plane.pixel_spacing[0]:g}x{plane.pixel_spacing[1]:g} mm); one is allowed"
            )


def _check_positions_distinct(heights: npt.NDArray[np.float64]) -> None:
    gaps = np.diff(heights)
    if np.any(gaps < 1e-3):
        at = float(heights[int(np.argmax(gaps < 1e-3))])
        raise SeriesGeometryError(
            f"two different slices at position {at:.1f} mm along the slice normal "
            "(several echoes, phases or repeats?); one slice per position is allowed"
        )


def _check_no_tilt(planes: list[_Plane], normal: npt.NDArray[np.float64]) -> None:
    origin = planes[0].position
    for plane in planes[1:]:
        offset = plane.position - origin
        in_plane = offset - (offset @ normal) * normal
        if float(np.linalg.norm(in_plane)) > TILT_TOLERANCE_MM:
            step = offset / np.linalg.norm(offset)
            angle = float(np.degrees(np.arccos(min(1.0, abs(float(step @ normal))))))
            raise SeriesGeometryError(
                f"slice origins drift in-plane by {float(np.linalg.norm(in_plane)):.2f} mm "
                f"(gantry tilt or shear of {angle:.1f} degrees); slices must stack along their normal"
            )


def _check_finite_gaps(heights: npt.NDArray[np.float64]) -> None:
    """Positions such as z = -1e308 and 1e308 are finite, their distance is not (an OverflowError in
    ``round`` below, an internal error three times over, before)."""
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below, with a reason
        gaps = np.diff(heights)
    if not (np.all(np.isfinite(heights)) and np.all(np.isfinite(gaps))):
        raise SeriesGeometryError(
            "slice positions (ImagePositionPatient) are so far apart that their distances are not finite "
            f"numbers; a brain series spans at most {FIELD_OF_VIEW_RANGE_MM[1]:g} mm"
        )


def _check_uniform_spacing(heights: npt.NDArray[np.float64]) -> float:
    _check_finite_gaps(heights)
    gaps = np.diff(heights)
    spacing = float(np.median(gaps))
    tolerance = SPACING_RELATIVE_TOLERANCE * spacing + 0.01
    for n, gap in enumerate(gaps):
        if abs(gap - spacing) <= tolerance:
            continue
        low, high = float(heights[n]), float(heights[n + 1])
        missing = round(gap / spacing) - 1
        if missing >= 1 and abs(gap - (missing + 1) * spacing) <= tolerance * (missing + 1):
            what = "missing slice" if missing == 1 else f"{missing} missing slices"
            raise SeriesGeometryError(
                f"{what} between positions {low:.1f} and {high:.1f} mm (spacing {spacing:.1f} mm)"
            )
        raise SeriesGeometryError(
            f"non-uniform slice spacing: gap of {gap:.2f} mm between positions {low:.1f} and "
            f"{high:.1f} mm where the series spacing is {spacing:.2f} mm (tolerance {tolerance:.2f} mm)"
        )
    return spacing
