"""Synthetic head phantoms of known volumes and a writer of realistic DICOM MR series.

Used by the unit tests, the benchmark and the integration tests. The phantom is nested
ellipsoidal layers (white matter core with ventricles, a grey-matter shell of known thickness,
CSF, skull) with partial-volume edges, a smooth multiplicative bias field and Rician noise.
The writer turns any :class:`Volume` into one MR Image Storage instance per slice with the
headers a scanner would set, including PHI-bearing attributes for the de-identification service.

Written by hand: no library makes such phantoms; pydicom builds the datasets.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from enclave_analysis.volume import LPS_TO_RAS, Volume

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: T1-like intensities (relative to white matter ~0.85), as in the MNI152 template.
T1_INTENSITY = {"wm": 0.85, "gm": 0.6, "csf": 0.3, "skull": 0.08}


@dataclass(frozen=True)
class HeadPhantom:
    """A phantom volume and its ground truth (volumes in mL, cortical thickness in mm)."""

    volume: Volume
    wm_ml: float
    gm_ml: float
    csf_ml: float
    cortical_thickness_mm: float

    @property
    def intracranial_ml(self) -> float:
        return self.wm_ml + self.gm_ml + self.csf_ml


def _distance_outside_ellipsoid(
    points: npt.NDArray[np.float64], axes: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Signed distance (mm, positive outside) to an ellipsoid: exact for spheres, close for ours."""
    scaled = points / axes
    radius = np.sqrt(np.sum(scaled**2, axis=-1))
    gradient = np.sqrt(np.sum((scaled / axes) ** 2, axis=-1)) / np.maximum(radius, 1e-9)
    return np.asarray((radius - 1.0) / np.maximum(gradient, 1e-9))


def head_phantom(
    *,
    wm_axes_mm: tuple[float, float, float] = (50.0, 62.0, 46.0),
    cortex_mm: float = 3.0,
    csf_mm: float = 4.0,
    skull_mm: float = 6.0,
    ventricle_axes_mm: tuple[float, float, float] = (12.0, 22.0, 10.0),
    spacing_mm: float = 1.0,
    noise: float = 0.02,
    bias: float = 0.15,
    supersampling: int = 2,
    seed: int = 0,
) -> HeadPhantom:
    """Nested ellipsoids with partial-volume edges; volumes are exact sums of the fractions."""
    axes = np.asarray(wm_axes_mm, dtype=np.float64)
    ventricle_axes = np.asarray(ventricle_axes_mm, dtype=np.float64)
    reach = axes + cortex_mm + csf_mm + skull_mm + 4.0
    shape = tuple(int(np.ceil(2 * r / spacing_mm)) for r in reach)
    offsets = (np.arange(supersampling) + 0.5) / supersampling - 0.5
    fractions = {name: np.zeros(shape, dtype=np.float32) for name in ("wm", "gm", "csf", "skull")}
    centre = (np.asarray(shape) - 1) / 2.0
    axes_index = [np.arange(n) for n in shape]
    for dz in offsets:
        z = (axes_index[2] + dz - centre[2]) * spacing_mm
        for dy in offsets:
            y = (axes_index[1] + dy - centre[1]) * spacing_mm
            for dx in offsets:
                x = (axes_index[0] + dx - centre[0]) * spacing_mm
                points = np.stack(np.meshgrid(x, y, z, indexing="ij"), axis=-1)
                distance = _distance_outside_ellipsoid(points, axes)
                in_ventricle = _distance_outside_ellipsoid(points, ventricle_axes) < 0
                fractions["wm"] += (distance < 0) & ~in_ventricle
                fractions["gm"] += (distance >= 0) & (distance < cortex_mm)
                fractions["csf"] += ((distance >= cortex_mm) & (distance < cortex_mm + csf_mm)) | in_ventricle
                outer = cortex_mm + csf_mm
                fractions["skull"] += (distance >= outer) & (distance < outer + skull_mm)
    samples = supersampling**3
    for name in fractions:
        fractions[name] /= samples
    image = sum(T1_INTENSITY[name] * fractions[name] for name in fractions)
    grid = np.stack(
        np.meshgrid(
            *[(a - c) / (n / 2) for a, c, n in zip(axes_index, centre, shape, strict=True)], indexing="ij"
        )
    )
    field = np.exp(bias * (0.8 * grid[0] - 0.6 * grid[1] ** 2 + 0.5 * grid[2] * grid[1]))
    rng = np.random.default_rng(seed)
    real = image * field + rng.normal(0.0, noise, shape)
    imaginary = rng.normal(0.0, noise, shape)
    voxels = np.sqrt(real**2 + imaginary**2).astype(np.float32)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -centre * spacing_mm
    voxel_ml = spacing_mm**3 / 1000.0
    return HeadPhantom(
        volume=Volume(voxels=voxels, affine_ras=affine),
        wm_ml=float(fractions["wm"].sum() * voxel_ml),
        gm_ml=float(fractions["gm"].sum() * voxel_ml),
        csf_ml=float(fractions["csf"].sum() * voxel_ml),
        cortical_thickness_mm=cortex_mm,
    )


def mni152_volume(scale: float = 1.0) -> Volume:
    """nilearn's MNI152 2009a T1 (1 mm, 197x233x189) as a volume, optionally shrunk by ``scale`` per axis."""
    from enclave_analysis.atlas import mni_template

    template = mni_template()
    affine = template.affine_ras.copy()
    affine[:3, :] *= scale
    return Volume(voxels=template.t1 * 1000.0, affine_ras=affine)


def write_mr_series(
    volume: Volume,
    *,
    patient_name: str = "Doe^Jane",
    patient_id: str = "MRN-0042",
    series_description: str = "T1 MPRAGE SAG",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    acquired: dt.datetime | None = None,
) -> list[Dataset]:
    """One MR Image Storage dataset per k-slice of ``volume``, with realistic (PHI-bearing) headers.

    Stored values are 16-bit unsigned; RescaleSlope/Intercept map them back to the voxel values.
    """
    acquired = acquired or dt.datetime(2024, 3, 14, 9, 26, 53)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    affine_lps = LPS_TO_RAS @ volume.affine_ras
    spacing = volume.spacing_mm
    row_dir = affine_lps[:3, 0] / spacing[0]
    col_dir = affine_lps[:3, 1] / spacing[1]
    low, high = float(volume.voxels.min()), float(volume.voxels.max())
    slope = (high - low) / 65000.0 if high > low else 1.0
    stored = np.round((volume.voxels - low) / slope).clip(0, 65535).astype(np.uint16)
    normal = np.cross(row_dir, col_dir)
    datasets = []
    for k in range(volume.shape[2]):
        position = affine_lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds = _mr_header(patient_name, patient_id, series_description, acquired)
        sop_uid = generate_uid()
        ds.file_meta = _file_meta(sop_uid)
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_number(v) for v in position[:3]]
        ds.ImageOrientationPatient = [_ds_number(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = _ds_number(float(position[:3] @ normal))
        ds.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]
        ds.SliceThickness = _ds_number(spacing[2])
        ds.SpacingBetweenSlices = _ds_number(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.RescaleSlope = _ds_number(slope)
        ds.RescaleIntercept = _ds_number(low)
        ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        datasets.append(ds)
    return datasets


def _ds_number(value: float) -> str:
    """A Decimal String of at most 16 characters that keeps sub-micrometre precision."""
    text = f"{value:.10g}"
    while len(text) > 16:
        text = f"{value:.{len(text) - 9}g}"
    return text


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _mr_header(patient_name: str, patient_id: str, description: str, acquired: dt.datetime) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    ds.Modality = "MR"
    ds.Manufacturer = "Enclave Phantom Works"
    ds.ManufacturerModelName = "Synthetic 3T"
    ds.InstitutionName = "Saint Example Hospital"
    ds.InstitutionAddress = "1 Example Street, Springfield"
    ds.StationName = "MRI-3T-01"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.OperatorsName = "Tech^Terry"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19580704"
    ds.PatientSex = "F"
    ds.PatientAge = "065Y"
    ds.PatientWeight = "68"
    ds.AccessionNumber = "ACC20240314001"
    ds.StudyID = "4711"
    ds.StudyDescription = "MRI BRAIN WITHOUT CONTRAST"
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", acquired.strftime("%Y%m%d"))
        setattr(ds, f"{prefix}Time", acquired.strftime("%H%M%S"))
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = "IR"
    ds.MRAcquisitionType = "3D"
    ds.SequenceName = "*tfl3d1"
    ds.RepetitionTime = "2300"
    ds.EchoTime = "2.98"
    ds.InversionTime = "900"
    ds.FlipAngle = "9"
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "3"
    ds.EchoTrainLength = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    return ds
