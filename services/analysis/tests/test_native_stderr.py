"""What ITK and ANTs print to file descriptor 2 in the analysis worker stays out of the service's
log. Before, a failed registration wrote ``Exception Object caught: itk::ExceptionObject ...`` as
several non-JSON lines around the structured, redacting logger, on every attempt.

The analysers are builtins evaluated in the spawned worker (``eval``): a function of this test
module could not be unpickled there, as in test_worker_process."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_analysis.main import analysis_worker
from enclave_analysis.native_stderr import run_capturing_native_stderr
from prometheus_client import CollectorRegistry

#: ITK's printout of an ExceptionObject, as antsRegistration writes it to std::cerr before returning 1.
ITK_PRINTOUT = (
    'Exception Object caught: \n\nitk::ExceptionObject (0x55d54a9691b0)\nLocation: "unknown" \n'
    "File: /project/itksource/Modules/Filtering/ImageStatistics/include/itkImageMomentsCalculator.hxx\n"
    "Line: 123\nDescription: ITK ERROR: ImageMomentsCalculator(0x55d54a2d9360): Compute(): Total Mass "
    "of the image was zero. Aborting here to prevent division by zero later on.\n"
)
#: Written straight to the descriptor, as C++ code does, then a failure.
FAILING = f"__import__('os').write(2, {ITK_PRINTOUT.encode()!r}) and 1 / 0"
#: A real failing ANTs registration (a moving image of zeros), in the worker.
REAL_ANTS = (
    "(lambda ants, np: ants.registration(fixed=ants.from_numpy(np.random.default_rng(0)"
    ".uniform(0, 1, (20, 20, 20)).astype('float32')), moving=ants.from_numpy(np.zeros((20, 20, 20), "
    "'float32')), type_of_transform='Affine', verbose=False))(__import__('ants'), __import__('numpy'))"
)

#: (before, during, after) a nested capture, as the paths fd 2 points to.
WHERE_STDERR_POINTS = (
    "(lambda m, os: (os.readlink('/proc/self/fd/2'), m.run_capturing_native_stderr(eval, "
    "\"__import__('os').readlink('/proc/self/fd/2')\"), os.readlink('/proc/self/fd/2')))"
    "(__import__('enclave_analysis.native_stderr').native_stderr, __import__('os'))"
)


@pytest.fixture
def service() -> Iterator[AnalysisService]:
    analysis = AnalysisService(
        SimpleNamespace(registry=CollectorRegistry()),  # type: ignore[arg-type]
        AnalysisSettings(),
        assembly=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        analyser=eval,
        executor_factory=analysis_worker,
    )
    yield analysis
    analysis.shutdown()


async def test_native_error_text_in_the_worker_is_kept_out_of_stderr_and_its_location_kept(
    service, capfd
) -> None:
    with pytest.raises(ZeroDivisionError) as failed:
        await service._run_analyser(FAILING)  # type: ignore[arg-type]
    assert "itk::ExceptionObject" not in capfd.readouterr().err
    assert failed.value.native_error_at == "itkImageMomentsCalculator.hxx:123"  # type: ignore[attr-defined]


async def test_the_descriptor_is_restored_after_an_analysis(service) -> None:
    """Where fd 2 points before, during and after a capture, inside the worker (itself in one)."""
    before, during, after = await service._run_analyser(WHERE_STDERR_POINTS)  # type: ignore[arg-type]
    assert before == after != during


async def test_in_the_service_process_nothing_is_redirected(capfd) -> None:
    """A thread runs the analysis there (unit tests): fd 2 is the whole process's, left alone."""
    with pytest.raises(ZeroDivisionError) as failed:
        run_capturing_native_stderr(eval, FAILING)
    assert "itk::ExceptionObject" in capfd.readouterr().err
    assert not hasattr(failed.value, "native_error_at")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_failed_ants_registration_prints_nothing_to_the_service_stderr(service, capfd) -> None:
    with pytest.raises(RuntimeError) as failed:
        await service._run_analyser(REAL_ANTS)  # type: ignore[arg-type]
    err = capfd.readouterr().err
    assert "Exception Object caught" not in err and "itk::" not in err
    assert failed.value.native_error_at.startswith("itk")  # type: ignore[attr-defined]
    assert ".hxx:" in failed.value.native_error_at  # type: ignore[attr-defined]
