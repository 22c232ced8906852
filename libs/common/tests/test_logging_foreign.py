"""Records of libraries' loggers and Python warnings are JSON lines with the quoted values redacted:
pydicom and highdicom quote the value they warn about, and it can be PHI (found by a pipeline hunt:
their warnings went to stderr as raw text, around the redaction)."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
from enclave_common.logging import REDACTED, configure_logging

PLANTED = "BADAGE-JONES"


@pytest.fixture
def out():
    stream = io.StringIO()
    configure_logging("test", "INFO", stream=stream)
    yield stream
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_library_log_record_keeps_what_it_says_but_not_the_quoted_value(out) -> None:
    logging.getLogger("pydicom").warning(f"Invalid value for VR AS: '{PLANTED}'.")
    logging.getLogger("highdicom.base").warning(f'The string "{PLANTED}" is unlikely to be a person name')
    records = lines(out)
    assert [r["event"] for r in records] == [
        f"Invalid value for VR AS: '{REDACTED}'.",
        f"The string '{REDACTED}' is unlikely to be a person name",
    ]
    assert PLANTED not in out.getvalue()


def test_a_python_warning_is_a_redacted_log_record_not_raw_stderr(out, capsys) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"Invalid value for VR DA: '{PLANTED}'.", UserWarning, stacklevel=1)
    assert PLANTED not in capsys.readouterr().err
    (record,) = lines(out)
    assert record["logger"] == "py.warnings" and "Invalid value for VR DA" in record["event"]
    assert PLANTED not in out.getvalue()


def test_enclave_messages_are_left_as_written(out) -> None:
    logging.getLogger("enclave.gateway").warning("refused: 'not_dicom'")
    assert lines(out)[0]["event"] == "refused: 'not_dicom'"
