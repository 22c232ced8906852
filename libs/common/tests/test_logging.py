"""Planted PHI never reaches the log output, whatever key or shape it is passed under."""

from __future__ import annotations

import io
import json
import logging

import pydicom
import structlog
from enclave_common.errors import PermanentError
from enclave_common.logging import configure_logging, get_logger

PHI = [
    "DOE^JANE",
    "MRN-4417-XYZ",
    "19620314",
    "1.2.826.0.1.3680043.8.498.1234567",
    "eyJhbGciOiJSUzI1NiJ9.secret",
]


def _capture() -> io.StringIO:
    out = io.StringIO()
    configure_logging("test", "DEBUG", stream=out)
    return out


def test_phi_under_sensitive_keys_is_redacted():
    out = _capture()
    log = get_logger("t")
    log.info(
        "upload",
        patient_name=PHI[0],
        PatientID=PHI[1],
        birth_date=PHI[2],
        study_instance_uid=PHI[3],
        authorization=f"Bearer {PHI[4]}",
        nested={"patient-id": PHI[1], "ok": "visible"},
        items=[{"PatientName": PHI[0]}],
    )
    text = out.getvalue()
    for value in PHI:
        assert value not in text
    record = json.loads(text.strip().splitlines()[-1])
    assert record["nested"]["ok"] == "visible"
    assert record["patient_name"] == "[REDACTED]"


def test_raw_bytes_and_pydicom_objects_are_not_rendered():
    out = _capture()
    ds = pydicom.Dataset()
    ds.PatientName = PHI[0]
    get_logger("t").info("parsed", header=ds, blob=PHI[1].encode(), element=ds["PatientName"])
    text = out.getvalue()
    assert PHI[0] not in text and PHI[1] not in text
    assert "bytes>" in text


def test_foreign_exception_text_is_dropped_but_enclave_errors_keep_their_message():
    out = _capture()
    log = get_logger("t")
    try:
        raise ValueError(f"cannot parse value {PHI[0]}")
    except ValueError:
        log.exception("parse failed")
    try:
        raise PermanentError("transfer syntax 1.2.3 is not accepted")
    except PermanentError:
        log.exception("rejected")
    lines = [json.loads(x) for x in out.getvalue().strip().splitlines()]
    assert PHI[0] not in out.getvalue()
    assert lines[-2]["error_type"] == "ValueError"
    assert lines[-1]["error"] == "transfer syntax 1.2.3 is not accepted"


def test_stdlib_loggers_are_rendered_as_json_and_redacted():
    out = _capture()
    logging.getLogger("thirdparty").warning("hello", extra={"patient_id": PHI[1]})
    text = out.getvalue()
    assert PHI[1] not in text
    assert json.loads(text.strip().splitlines()[-1])["event"] == "hello"
    structlog.contextvars.clear_contextvars()


def test_a_foreign_error_is_located_by_its_causes_and_code_not_by_its_text():
    """aiokafka's fetcher logs 'KafkaError from RuntimeError': the cause's type and where it was raised
    are kept (code locations only), the texts are not."""
    out = _capture()

    def parse_inside_a_library() -> None:
        raise RuntimeError(f"set changed while reading {PHI[0]}")

    try:
        try:
            parse_inside_a_library()
        except RuntimeError as exc:
            raise ConnectionError(f"wrapped {PHI[1]}") from exc
    except ConnectionError:
        logging.getLogger("aiokafka.consumer.fetcher").exception("Unexpected error in fetcher routine")
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert PHI[0] not in out.getvalue() and PHI[1] not in out.getvalue()
    assert line["error_type"] == "ConnectionError" and line["error_cause"] == "RuntimeError"
    innermost = line["error_at"].split(" < ")[0]
    assert innermost.startswith("tests/test_logging.py:") and innermost.endswith(" parse_inside_a_library")


def test_an_error_raised_in_a_worker_process_is_located_by_its_code_lines_only():
    """An exception from a ProcessPoolExecutor (the analysis worker) arrives with its traceback as
    text: ``error_at`` is read from its ``File ..., line ..., in ...`` lines; the message and the
    source lines stay out. (Before, such a line had no location at all.)"""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out = _capture()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:  # int() of the planted value fails in the worker, quoting it in its message
            pool.submit(int, PHI[1]).result()
        except ValueError:
            get_logger("test").error("worker failed", exc_info=True)
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert PHI[1] not in out.getvalue()
    assert line["error_type"] == "ValueError" and line["error_cause"] == "_RemoteTraceback"
    assert line["error_at"].split(" < ")[0].startswith("futures/process.py:")
