"""One error hierarchy for every service.

A :class:`PermanentError` means retrying cannot help (bad input, a contract violation): the message
goes to ``<topic>.dlq`` with the reason in headers. A :class:`TransientError` means a dependency is
unavailable, or the service's machine ran out of disk space or file handles: the message is retried
with bounded exponential backoff, then redelivered.
Messages must never contain PHI: they end up in logs, DLQ headers and events.
"""

from __future__ import annotations

import errno
import re
from functools import cache
from types import CodeType
from urllib.parse import urlsplit


class EnclaveError(Exception):
    """Base of every error Enclave raises on purpose. ``code`` is stable and machine-readable."""

    code = "enclave_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def reason(self) -> str:
        return str(self)


class PermanentError(EnclaveError):
    """Retrying will not help: dead-letter the message."""

    code = "permanent"


class TransientError(EnclaveError):
    """A dependency failed in a way that may pass: retry with backoff."""

    code = "transient"


class ContractError(PermanentError):
    """An event does not match its schema (wrong payload, unknown major version)."""

    code = "contract_violation"


class ConfigurationError(EnclaveError):
    """The service was configured in a way it cannot run with."""

    code = "configuration"


class UnexpectedError(PermanentError):
    """An exception nobody classified: after the retries it is dead-lettered, named by type only."""

    code = "unexpected_error"


@cache  # imported and built once, not on every classification
def _transient_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
            SSLError,
        )

        found += [EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectTimeoutError]
        # TLS with the object store failed (its certificate is not trusted, or it does not speak
        # TLS): fixed outside the event, by the CA bundle or the endpoint, never a reason to
        # dead-letter it.
        found += [SSLError]
        # The service has no (complete) S3 credentials: like credentials the store refuses
        # (storage._TRANSIENT_CODES), fixed outside the event, never a reason to dead-letter it.
        found += [NoCredentialsError, PartialCredentialsError]
    except ImportError:  # pragma: no cover - botocore is a dependency of enclave-common
        pass
    try:
        from pymongo.errors import ConnectionFailure, ExecutionTimeout

        # ConnectionFailure: the server could not be reached or stopped answering. Its subclasses are
        # AutoReconnect (NetworkTimeout, ServerSelectionTimeoutError...) and WaitQueueTimeoutError: an
        # operation under ``pymongo.timeout()`` that waited for a connection while the pool's new
        # connections hung on a silent server (at most two connect at once). Until the twenty-fourth
        # session that one was a 500; CI found it. ExecutionTimeout: the server stopped an operation
        # past its time limit (``maxTimeMS``, or pymongo's ``timeout()``): the database did not answer
        # in time, not a fault of the request.
        found += [ConnectionFailure, ExecutionTimeout]
    except ImportError:  # pragma: no cover
        pass
    try:
        from aiokafka.errors import KafkaTimeoutError  # the retriable ones: _retriable_kafka_error

        found += [KafkaTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def _retriable_kafka_error(exc: BaseException) -> bool:
    """A Kafka error the client marks retriable: a broker that is starting, moving a leader or not
    answering yet (``UnknownTopicOrPartitionError`` while a restarted broker loads its topics,
    ``LeaderNotAvailableError``, ``NotLeaderForPartitionError``, ``RequestTimedOutError``...).

    Also aiokafka's bare ``KafkaError``: the client raises it when its own machinery failed
    ("Unexpected error during batch delivery" from a producer whose sender stopped, which the
    service's ``SenderWatchdog`` replaces within seconds; "Unable to get cluster metadata over all
    known brokers"). Retrying is what helps; dead-lettering would go through the same client."""
    try:
        from aiokafka.errors import KafkaError
    except ImportError:  # pragma: no cover - aiokafka is a dependency of enclave-common
        return False
    return isinstance(exc, KafkaError) and (type(exc) is KafkaError or bool(getattr(exc, "retriable", False)))


#: What did not answer, by the top-level package of the exception that said so.
_DEPENDENCY_OF_PACKAGE = {"pymongo": "the database", "botocore": "the object store", "aiokafka": "Kafka"}


@cache
def dependency_failure_types() -> tuple[type[Exception], ...]:
    """The exception types that may mean a dependency is unavailable (:func:`unavailable_dependency`
    decides for an instance: a Kafka error counts only when the client marks it retriable)."""
    found: list[type[Exception]] = [TransientError]
    found += [t for t in _transient_types() if issubclass(t, Exception)]
    try:
        from aiokafka.errors import KafkaError

        found.append(KafkaError)
    except ImportError:  # pragma: no cover - aiokafka is a dependency of enclave-common
        pass
    return tuple(found)


def unavailable_dependency(exc: BaseException) -> str | None:
    """What did not answer (``"the database"``, ``"the object store"``, ``"Kafka"``, ``"a
    dependency"``) when ``exc`` means a dependency is unavailable, else ``None``. Named from the
    exception's type only: its text may quote data."""
    if isinstance(exc, TransientError):
        return "a dependency"
    if not (isinstance(exc, _transient_types()) or _retriable_kafka_error(exc)):
        return None
    return _DEPENDENCY_OF_PACKAGE.get(type(exc).__module__.split(".", 1)[0], "a dependency")


_OPENSSL_REASON = re.compile(r"\[SSL: [A-Z0-9_]+\][^(\n]*")


def _kms_endpoint(exc: BaseException) -> bool:
    """Whether a botocore error came from AWS KMS (``kms.<region>...``, ``kms-fips.<region>...``)
    rather than the object store: botocore names the endpoint it called in the error's kwargs."""
    kwargs = getattr(exc, "kwargs", None)
    endpoint = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
    host = urlsplit(endpoint).hostname if isinstance(endpoint, str) else None
    return host is not None and host.split(".", 1)[0] in ("kms", "kms-fips")


def startup_failure(exc: BaseException) -> str:
    """Why a service could not start, for its one ``cannot start`` log line: Enclave's own message,
    or the dependency and the exception's type (a third-party message may quote data); a TLS
    failure with OpenSSL's reason, which names no data (``[SSL: CERTIFICATE_VERIFY_FAILED] ...``)."""
    if isinstance(exc, EnclaveError):
        return str(exc)
    dependency = unavailable_dependency(exc)
    tls = _OPENSSL_REASON.search(str(exc)) if dependency is not None else None
    if dependency == "the object store" and _kms_endpoint(exc):
        dependency = "AWS KMS"
    if tls is not None:
        hint = (
            " (an object store whose certificate a private CA signs: ENCLAVE_<SERVICE>_S3_CA_BUNDLE)"
            if dependency == "the object store"
            else ""
        )
        return f"TLS with {dependency} failed: {tls.group(0).strip()}{hint}"
    if dependency is not None:
        return f"{dependency} is unavailable ({type(exc).__name__})"
    return f"unexpected {type(exc).__name__}"


#: ``OSError`` numbers that mean the service's machine ran out of something, not that the input was
#: bad: retrying once space or handles are freed helps, and dead-lettering would not.
_EXHAUSTED = {
    errno.ENOSPC: "local disk space",
    errno.EDQUOT: "local disk quota",
    errno.EMFILE: "open files",
    errno.ENFILE: "open files",
}


def exhausted_resource(exc: BaseException) -> str | None:
    """What the service ran out of (``"local disk space"``, ``"open files"``...) when ``exc`` says so
    (a full disk or quota, too many open files), else ``None``."""
    if isinstance(exc, OSError):
        return _EXHAUSTED.get(exc.errno or 0)
    return None


def classify_exception(exc: BaseException) -> PermanentError | TransientError:
    """Map any exception to the hierarchy: Enclave's own as they are, infrastructure failures and a
    machine out of disk or file handles as transient, anything else as an unexpected permanent error
    (named by type, its text dropped because a third-party message may quote PHI). A new error keeps
    ``exc`` as its ``__cause__``, so a log of it still says what failed where (type and place only)."""
    if isinstance(exc, PermanentError | TransientError):
        return exc
    error: PermanentError | TransientError
    if unavailable_dependency(exc) is not None:
        error = TransientError(f"dependency unavailable ({type(exc).__name__})")
    elif (resource := exhausted_resource(exc)) is not None:
        error = TransientError(
            f"the service ran out of {resource} ({type(exc).__name__})", code="resource_exhausted"
        )
    elif isinstance(exc, EnclaveError):
        error = PermanentError(str(exc), code=exc.code)
    else:
        error = UnexpectedError(f"unexpected {type(exc).__name__} while handling the event{_raised_at(exc)}")
    error.__cause__ = exc
    return error


def _raised_at(exc: BaseException) -> str:
    """Where ``exc`` was raised (file name, line, function; no values): the innermost frame, and the
    innermost frame of Enclave's own code when that is another one."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code, tb.tb_lineno))
        tb = tb.tb_next
    if not frames:
        return ""

    def name(frame: tuple[CodeType, int]) -> str:
        code, line = frame
        return f"{code.co_filename.rsplit('/', 1)[-1]}:{line} in {code.co_name}"

    ours = [f for f in frames if "/enclave_" in f[0].co_filename]
    where = f" (raised at {name(frames[-1])}"
    if ours and ours[-1] is not frames[-1]:
        where += f", from {name(ours[-1])}"
    return where + ")"
