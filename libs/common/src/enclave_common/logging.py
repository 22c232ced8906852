"""structlog JSON logging, configured by services only (never at import time).

A redaction processor refuses to emit values under keys that carry PHI, secrets or raw DICOM,
whatever the caller passed, and drops the text of exceptions that are not Enclave's own (third-party
messages such as a parser's may quote a DICOM value). Correlation and event ids are bound through
``structlog.contextvars`` by the Kafka plumbing and the HTTP middleware.
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from enclave_common.errors import EnclaveError

REDACTED = "[REDACTED]"

#: Key fragments whose values are never logged (matched case-insensitively after removing _ and -).
PHI_KEY_FRAGMENTS = (
    "patientname",
    "patientid",
    "patientbirth",
    "birthdate",
    "dateofbirth",
    "patientaddress",
    "patientsex",
    "patientage",
    "othernames",
    "mrn",
    "accessionnumber",
    "referringphysician",
    "institution",
    "studyinstanceuid",
    "seriesinstanceuid",
    "sopinstanceuid",
    "dicom",
    "dataset",
    "pixel",
    "token",
    "authorization",
    "password",
    "secret",
    "privatekey",
    "dek",
    "kek",
    "keymaterial",
    "plaintext",
    "sealed",
    "cookie",
)
_NORMALISE = re.compile(r"[_\-\s]")


def is_sensitive_key(key: str) -> bool:
    """True when a log key names something that may carry PHI, a secret or raw DICOM."""
    flat = _NORMALISE.sub("", key).lower()
    return any(fragment in flat for fragment in PHI_KEY_FRAGMENTS)


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_sensitive_key(k) else _redact(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(v, depth + 1) for v in value]
    if type(value).__module__.startswith("pydicom"):
        return f"<{type(value).__name__} redacted>"
    return value


def redact_phi(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace values of sensitive keys, raw bytes and pydicom objects."""
    for key in list(event_dict):
        if key in ("event", "level", "timestamp", "logger"):
            continue
        if is_sensitive_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


#: How many exceptions of a chain (``raise ... from ...``) and frames of its innermost one are named.
MAX_CHAIN = 4
MAX_FRAMES = 3


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < MAX_CHAIN:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def code_location(filename: str, line: int | None, function: str) -> str:
    """Where code is, without any value: ``package/module.py:12 function``."""
    return f"{'/'.join(Path(filename).parts[-2:])}:{line} {function}"


def _where(exc: BaseException) -> str:
    """The innermost frames of ``exc``'s traceback as code locations only, innermost first."""
    frames = traceback.extract_tb(exc.__traceback__)[-MAX_FRAMES:]
    return " < ".join(code_location(f.filename, f.lineno, f.name) for f in reversed(frames))


_REMOTE_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)\s*$', re.MULTILINE)


def _remote_where(exc: BaseException) -> str | None:
    """The code locations of an exception raised in a worker process (``concurrent.futures``): its
    traceback crosses only as text (``_RemoteTraceback.tb``); the ``File ..., line ..., in ...`` lines
    are read from it, never the source lines or the message."""
    text = getattr(exc, "tb", None)
    if not isinstance(text, str):
        return None
    frames = _REMOTE_FRAME.findall(text)[-MAX_FRAMES:]
    return " < ".join(code_location(f, int(line), fn) for f, line, fn in reversed(frames)) or None


def safe_exception(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Keep an exception's type and, for Enclave's own errors, its message; drop foreign text and locals.

    What a foreign exception says may hold the data it failed on, so only where it was raised is
    kept: the types of its causes (``error_cause``) and the code locations of the innermost one
    (``error_at``: file, line, function; no values), and the ``errno`` name of a failed system call
    (``error_errno``). An error inside a library, such as aiokafka's
    fetcher dying, can then be traced to its line without a debugger."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = None
    if exc is not None:
        event_dict["error_type"] = type(exc).__name__
        chain = _chain(exc)
        if len(chain) > 1:
            event_dict["error_cause"] = " < ".join(type(e).__name__ for e in chain[1:])
        if chain[-1].__traceback__ is not None:
            event_dict["error_at"] = _where(chain[-1])
        elif (remote := _remote_where(chain[-1])) is not None:
            event_dict["error_at"] = remote
        failed_call = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
        if failed_call is not None:  # "ENOSPC" says more than "OSError", and quotes no data
            event_dict["error_errno"] = errno.errorcode.get(failed_call.errno or 0, str(failed_call.errno))
        if isinstance(exc, EnclaveError):
            event_dict["error"] = str(exc)
            event_dict["error_code"] = exc.code
    return event_dict


#: A quoted span of a log message: where libraries put the value they warn about.
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def redact_foreign_text(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor for records of loggers not Enclave's own (pydicom, highdicom, Python
    warnings): their message quotes what they warn about, and that can be PHI (pydicom: "Invalid value
    for VR AS: 'BADAGE-JONES'."). Every quoted span is replaced; the rest of the message, which says
    what kind of problem it is, is kept. Enclave's own messages never hold values (their fields are
    redacted by key)."""
    logger = str(event_dict.get("logger") or "")
    event = event_dict.get("event")
    if isinstance(event, str) and not logger.startswith("enclave"):
        event_dict["event"] = _QUOTED.sub(f"'{REDACTED}'", event)
    return event_dict


def configure_logging(service: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger to emit one JSON object per line."""
    out = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        safe_exception,
        redact_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[
                *shared[:-2],
                structlog.stdlib.add_logger_name,
                safe_exception,
                redact_phi,
                redact_foreign_text,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "botocore", "urllib3", "pymongo", "faststream", "enclave.faststream"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Python warnings (pydicom's and highdicom's about a file's values) went to stderr as raw text,
    # around the redaction; as log records of "py.warnings" they are JSON lines redacted as above.
    logging.captureWarnings(True)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
