"""The gateway's own metrics, besides every service's request, Kafka and consumer metrics: what its
uploads in progress hold against the limits that bound them, and the uploads refused for want of
room. The gauges are read when Prometheus scrapes; the upload path only counts refusals. They name
no tenant, patient or request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from enclave_gateway.uploads import UploadProcessor

#: Why an upload was refused for want of room in this replica (the ``reason`` label).
ROOM_REFUSALS = ("too_many_uploads", "spool_unavailable")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, uploads: UploadProcessor) -> None:
        memory, disk, slots = uploads.spool_memory, uploads.spool_disk, uploads.slots
        Gauge(
            "enclave_gateway_spool_memory_bytes",
            "Sealed bytes the uploads in progress keep in memory, all together (past "
            "enclave_gateway_spool_memory_capacity_bytes they spill to the disk spool)",
            registry=registry,
        ).set_function(lambda: memory.used)
        Gauge(
            "enclave_gateway_spool_memory_capacity_bytes",
            "Sealed bytes all uploads together may keep in memory (ENCLAVE_GATEWAY_SPOOL_MEMORY_TOTAL_BYTES)",
            registry=registry,
        ).set(memory.limit)
        Gauge(
            "enclave_gateway_spool_disk_bytes",
            "Sealed bytes the uploads in progress keep in the spool directory (ENCLAVE_GATEWAY_SPOOL_DIR)",
            registry=registry,
        ).set_function(lambda: disk.used)
        if disk.limit is not None:
            Gauge(
                "enclave_gateway_spool_disk_capacity_bytes",
                "Sealed bytes all uploads together may keep in the spool directory, past which an upload "
                "answers 503 spool_unavailable (ENCLAVE_GATEWAY_SPOOL_DISK_BYTES; absent: no limit but the disk's)",
                registry=registry,
            ).set(disk.limit)
        Gauge(
            "enclave_gateway_uploads_in_progress",
            "Upload requests (STOW-RS and the form upload) being received or handed off",
            registry=registry,
        ).set_function(lambda: slots.in_use)
        Gauge(
            "enclave_gateway_max_concurrent_uploads",
            "Upload requests the process takes at once, past which an upload answers 503 "
            "too_many_uploads (ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS)",
            registry=registry,
        ).set(slots.limit)
        self.uploads_refused = Counter(
            "enclave_gateway_uploads_refused",
            "Uploads answered 503 for want of room in this replica, by reason: too_many_uploads (every "
            "upload slot held), spool_unavailable (the spool could not hold them)",
            ["reason"],
            registry=registry,
        )
        for reason in ROOM_REFUSALS:  # present at 0, so a rule on their increase sees the first one
            self.uploads_refused.labels(reason)

    def refused(self, reason: str) -> None:
        self.uploads_refused.labels(reason).inc()
