"""Wiring of the analysis service: the only place that builds clients."""

from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial

from enclave_common import topics
from enclave_common.keys_config import kek_provider
from enclave_common.service import ServiceRuntime, load_settings, run_service
from enclave_common.storage import S3ObjectStore
from fastapi import FastAPI

from enclave_analysis import workdir
from enclave_analysis.assembly import SeriesAssembly
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_analysis.segmentation import warm_up
from enclave_analysis.series_analysis import run_volumetrics
from enclave_analysis.volume import VolumeLimits


def analysis_worker() -> ProcessPoolExecutor:
    """One worker process for the analyses (spawned: no state inherited from the service's threads).
    It is replaced after 50 analyses, so memory that ANTs and ITK do not give back stays bounded.
    Each worker writes its temporary files to a directory of its own, which the next worker removes
    if the process died (``workdir``)."""
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        max_tasks_per_child=50,
        initializer=workdir.claim,
    )


def create_app(settings: AnalysisSettings | None = None) -> FastAPI:
    settings = settings or AnalysisSettings()
    runtime = ServiceRuntime(settings)
    runtime.publishes(topics.ANALYSIS_COMPLETED, topics.ANALYSIS_FAILED)
    # Published by the re-run command (`enclave-analysis-rerun`, its audit record), run in the
    # service's pod with its Kafka identity: declared so the AsyncAPI document and the ACLs list it.
    runtime.publishes(topics.ACCESS_RECORDED)
    store = S3ObjectStore(settings)
    assembly = SeriesAssembly(runtime.db)
    limits = VolumeLimits(max_matrix=settings.max_matrix, max_voxels=settings.max_series_voxels)
    analyser = functools.partial(run_volumetrics, limits=limits)  # picklable: runs in the worker
    service = AnalysisService(runtime, settings, assembly, store, analyser, analysis_worker)
    service.register()
    runtime.readiness["object_store"] = partial(store.ping, settings.deidentified_bucket)

    def load_keys() -> None:
        service.kek = kek_provider(settings, settings.keyring_file, settings.kms_key_id)

    async def prepare() -> None:
        await store.ensure_bucket(settings.deidentified_bucket)
        if settings.results_bucket != settings.deidentified_bucket:
            await store.ensure_bucket(settings.results_bucket)
        await assembly.ensure_indexes()
        service.warm_up(warm_up)
        runtime.spawn(service.run_assembler(), "series-assembler")

    async def stop_worker() -> None:
        service.shutdown()

    runtime.preflight(load_keys)
    runtime.on_startup(prepare)
    runtime.on_shutdown(stop_worker)
    return runtime.http_app(title="Enclave analysis")


def run() -> None:
    run_service(create_app, load_settings(AnalysisSettings))


if __name__ == "__main__":
    run()
