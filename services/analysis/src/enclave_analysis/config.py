"""Settings of the analysis service: environment variables prefixed ``ENCLAVE_ANALYSIS_`` (shared
connection settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pathlib import Path

from enclave_common.settings import BaseServiceSettings
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

#: The reports stored by an analysis its time limit stopped are deleted within this long, or left to
#: the purge of the series' next completed analysis (the object store may be what stalled). The one
#: bounded step after the limit: ``max_analysis_s`` plus this must end before ``lease_s``.
DISCARD_TIMEOUT_S = 10.0


class AnalysisSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_ANALYSIS_", extra="ignore", frozen=True)

    service_name: str = "analysis"
    http_port: int = 8083

    #: The de-identification key domain (analysis reads de-identified data only).
    keyring_file: Path | None = None
    kms_key_id: str | None = None
    #: Where the de-identified instances are, and where reports (SR, SEG, PNG) are written.
    deidentified_bucket: str = "enclave-deidentified"
    results_bucket: str = "enclave-results"

    #: A series is analysed once every instance its uploads announced has an outcome and nothing new
    #: arrived for this long.
    quiet_period_s: float = Field(default=10.0, ge=0)
    #: A series still incomplete this long after its last change (an instance its uploads announced
    #: has had no outcome: neither de-identified, quarantined nor rejected) is reported failed
    #: (``series_incomplete``) instead of waiting for good; it is analysed if the missing arrive.
    incomplete_after_s: float = Field(default=21600.0, gt=0)
    #: How often the assembler looks for series that became complete.
    scan_interval_s: float = Field(default=5.0, gt=0)
    #: An analysis claimed by a replica that died is taken over after this lease (a replica stopped
    #: in order, SIGTERM, releases its claim at once instead: ``AnalysisService._release``).
    lease_s: float = Field(default=900.0, gt=0)
    #: A series whose analysis fails with an unexpected error (or whose process dies) is tried again
    #: after ``retry_delay_s`` (after the lease, for a process that died), at most this many times in
    #: all; then it is reported failed (``analysis_internal_error``). A dependency outage (the object
    #: store, Kafka, the database) does not count as an attempt.
    max_attempts: int = Field(default=3, ge=1)
    #: One analysis of a series (reading its members from the object store, the worker's decoding,
    #: ANTs and reports, storing the reports) is stopped after this long. Run out in the worker: the
    #: worker is killed and the series reported failed (``analysis_timed_out``), not tried again
    #: unless it changes. Run out while the object store is read or written (a store that answers too
    #: slowly): the reports stored by then are deleted and the series is tried again after
    #: ``retry_delay_s``, its attempt not counted, as in a store outage. The 1 mm MNI brain takes 24 s
    #: on a quiet 2-core machine and 60-69 s under load (docs/analysis.md). With the deletion of the
    #: reports after it (``DISCARD_TIMEOUT_S``) it must end below ``lease_s``, so a hung analysis or a
    #: stalled object store does not hand the series to another replica while this one holds it.
    max_analysis_s: float = Field(default=600.0, gt=0)
    retry_delay_s: float = Field(default=60.0, ge=0)
    #: Series with fewer de-identified instances fail at once (a volume needs slices).
    min_instances: int = Field(default=3, ge=1)
    #: Size bounds, checked before anything is decoded or allocated (``series_too_large``): Rows and
    #: Columns of each slice, the voxels of the volume (24 Mi, a 0.8 mm 320x320x240 T1; past it the volume is
    #: reduced in-plane by 2 to 4, refused only beyond that; the worker needs ~0.5 GiB
    #: plus ~160 bytes per voxel, ~4.3 GiB here, in a pod limited to 6 GiB), and the bytes of a series'
    #: members as read (a deflated member counts inflated), all of which are held in memory at once.
    max_matrix: int = Field(default=1024, ge=1)
    max_series_voxels: int = Field(default=24 * 2**20, ge=1)
    max_series_bytes: int = Field(default=256 * 2**20, ge=1)

    @model_validator(mode="after")
    def _analysis_ends_within_its_lease(self) -> AnalysisSettings:
        latest = self.max_analysis_s + DISCARD_TIMEOUT_S
        if latest >= self.lease_s:
            raise ValueError(
                f"ENCLAVE_ANALYSIS_MAX_ANALYSIS_S ({self.max_analysis_s:g}) must be below "
                f"ENCLAVE_ANALYSIS_LEASE_S ({self.lease_s:g}) minus {DISCARD_TIMEOUT_S:g} s (the deletion of "
                "the reports of an analysis stopped at its limit), i.e. below "
                f"{self.lease_s - DISCARD_TIMEOUT_S:g}: a longer analysis would be handed to another replica "
                "before it is stopped"
            )
        return self
