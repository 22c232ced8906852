"""Domain errors of the analysis service.

Each error carries a ``reason``: a short, PHI-free sentence saying what was wrong and what is
allowed. The service wiring maps these to an ``analysis.failed`` event (permanent: retrying the
same series gives the same answer). ``ObjectStoreTooSlow`` is the exception: a dependency problem,
retried.
"""

from __future__ import annotations

from enclave_common.errors import TransientError


class AnalysisError(Exception):
    """A series cannot be analysed; ``reason`` is safe to publish (no PHI, no raw DICOM values)."""

    code = "analysis_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SeriesGeometryError(AnalysisError):
    """The instances do not form one regular 3D volume (missing slice, tilt, mixed geometry...)."""

    code = "series_geometry"


class NotBrainT1Error(AnalysisError):
    """The volume is not a T1-weighted brain volume the method is validated for."""

    code = "not_t1_brain"


class RepeatedFailure(AnalysisError):
    """The analysis of a series failed with an unexpected error (or its process died) on every
    attempt: it is reported as failed rather than tried forever."""

    code = "analysis_internal_error"


class AnalysisTimedOut(AnalysisError):
    """``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S`` ran out while the worker analysed the series (a native
    decoder or ANTs that does not return, on a pathological codestream, say): the worker was killed.
    Permanent: the same series would hang again, on every replica the lease handed it to. The limit
    running out while the object store is read or written is ``ObjectStoreTooSlow`` instead."""

    code = "analysis_timed_out"


class ObjectStoreTooSlow(TransientError):
    """``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S`` ran out while the series' members were read from the object
    store or its reports stored in it: a store that answers too slowly (or stalls) is a dependency
    problem, not the series', and the series is analysed again later without counting an attempt
    (``AnalysisService.attempt``), like a store that fails. Not an ``AnalysisError``: no outcome is
    published for it."""

    code = "object_store_too_slow"


class PixelDataError(AnalysisError):
    """An instance's pixel data cannot be decoded (no decoder for its transfer syntax here, or data
    that does not match its own description)."""

    code = "pixel_data_unreadable"


class SeriesIncomplete(AnalysisError):
    """Instances the series' uploads announced have had no outcome for too long (an instance
    dead-lettered upstream, for instance): reported rather than waited for in silence. The series is
    analysed again if they arrive."""

    code = "series_incomplete"


class PixelValueError(AnalysisError):
    """The stored pixel values do not give an image: an unusable ``RescaleSlope`` or
    ``RescaleIntercept`` (zero slope, not a number, not finite), rescaled values beyond 32-bit
    floating point, or the same value in every voxel."""

    code = "pixel_values_invalid"


class SeriesTooLargeError(AnalysisError):
    """The series is larger than the analysis takes, told from its attributes before anything is
    decoded: a slice matrix, the volume's voxels, or the bytes of its members (inflated, for a
    deflated instance) beyond the configured limits (``ENCLAVE_ANALYSIS_MAX_*``)."""

    code = "series_too_large"


class MixedPatientsError(AnalysisError):
    """The instances of one series carry different patient identities (after de-identification, a
    pseudonymous PatientID per patient): a volume of two people is not computed."""

    code = "series_mixed_patients"


def _codes(cls: type[AnalysisError]) -> set[str]:
    return {cls.code}.union(*(_codes(sub) for sub in cls.__subclasses__()))


#: Every ``reason_code`` an ``analysis.failed`` event can carry (what ``enclave-analysis-rerun``
#: accepts): the codes of the errors above, ``analysis_error`` for one without its own.
REASON_CODES: frozenset[str] = frozenset(_codes(AnalysisError))
