"""Keep what native libraries write to the standard error stream out of the service's log.

ITK and ANTs report a failure by printing the C++ exception to ``std::cerr`` (file descriptor 2):
several lines, not JSON, around the structured, redacting logger (``Exception Object caught:
itk::ExceptionObject ... Description: ...``). Python warnings in the analysis (pydicom's, which may
quote a value) went the same way. In the analysis worker process the descriptor is pointed at a
temporary file for each analysis, and the text is dropped. Only where ITK raised is kept (its source
file and line, no values), attached to the analysis's exception as ``native_error_at`` for the
service to log.

Written by hand: the text comes from C++ code writing to the descriptor, which Python's
``contextlib.redirect_stderr`` (``sys.stderr`` only) does not reach.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TypeVar

Argument = TypeVar("Argument")
Result = TypeVar("Result")

#: At most this much of the captured text (its end, where the failure is) is read for locations.
READ_LIMIT = 64 * 1024
#: ITK's ``ExceptionObject`` printout: ``File: <path>`` then ``Line: <n>``.
_ITK_LOCATION = re.compile(r"^File: (\S+)\s*\r?\nLine: (\d+)", re.MULTILINE)


def native_error_locations(text: str) -> str | None:
    """Where ITK raised, as ``file.hxx:123`` (innermost last, at most 3), or None: no message text."""
    found = [f"{PurePosixPath(path).name}:{line}" for path, line in _ITK_LOCATION.findall(text)]
    unique = list(dict.fromkeys(found))[-3:]
    return ", ".join(unique) or None


def run_capturing_native_stderr(analyser: Callable[[Argument], Result], argument: Argument) -> Result:
    """``analyser(argument)`` with file descriptor 2 pointed at a temporary file, in a worker process.

    In the service's own process (no parent process: a thread runs the analysis, as in unit tests) it
    just calls ``analyser``: the descriptor is the whole process's, and the service's other threads
    write to it too."""
    if multiprocessing.parent_process() is None:
        return analyser(argument)
    _flush_stderr()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                return analyser(argument)
            except Exception as exc:
                _flush_stderr()
                sink.seek(max(0, os.fstat(sink.fileno()).st_size - READ_LIMIT))
                where = native_error_locations(sink.read().decode("utf-8", "replace"))
                if where is not None:
                    with contextlib.suppress(AttributeError):  # an exception type without a __dict__
                        exc.native_error_at = where  # type: ignore[attr-defined]
                raise
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _flush_stderr() -> None:
    """Python's buffered writes go where the descriptor points now, not after it is restored."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
