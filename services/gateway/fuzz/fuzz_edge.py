"""Bounded-time, property-based fuzzing of the gateway's edge: the multipart parser and the validator.

Run: ``uv run python services/gateway/fuzz/fuzz_edge.py --seconds 60`` (``--target multipart`` or
``validation`` to fuzz one). Hypothesis mutates seed inputs built the way real clients build them
(``tests/corpus/builders.py``), in batches with fresh random seeds until the time is up. An input that
breaks an invariant is shrunk by Hypothesis and saved under ``tests/corpus/regressions/``
(``multipart-<sha>.bin``: the Content-Type line, a newline, then the body; ``dicom-<sha>.bin``: the
instance), which ``tests/test_fuzz_regressions.py`` replays through the same invariants. Exit status 1 when
anything was found.

Invariants: nothing raises but :class:`RequestBodyError` (with a 400/413/415 status); results do not
depend on how the bytes are chunked; parts come back whole and memory stays bounded; validation
always gives a verdict whose message carries no planted PHI, an accepted instance has the size and
hash of the bytes, and pydicom can read what the validator accepted.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import random
import sys
import time
import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
from enclave_gateway.multipart import (
    BodyLimits,
    PartData,
    PartEnd,
    PartStart,
    RequestBodyError,
    parse_body_format,
    parser_for,
)
from enclave_gateway.validation import InstanceInfo, InstanceInspector, ValidationFailure, ValidationPolicy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
REGRESSIONS = TESTS / "corpus" / "regressions"
FUZZ_LIMITS = BodyLimits(
    max_parts=8, max_instance_bytes=64 * 1024, max_request_bytes=256 * 1024, max_part_header_bytes=512
)
FUZZ_POLICY = ValidationPolicy(max_sequence_depth=8, header_window_bytes=16 * 1024)

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from corpus import builders as corpus  # noqa: E402 - the tests' input builders, shared with them


def _split(data: bytes, sizes: list[int]) -> list[bytes]:
    return corpus.split(data, sizes) if data else []


# --------------------------------------------------------------------------- invariants


def _parse(content_type: str, chunks: list[bytes]) -> object:
    """Parts as (fields, body) or the error type; checks framing invariants on the way."""
    try:
        parser = parser_for(parse_body_format(content_type), FUZZ_LIMITS)
        parts: list[tuple[object, bytearray]] = []
        sizes: list[int] = []
        largest_chunk = max((len(c) for c in chunks), default=0)
        bound = FUZZ_LIMITS.max_part_header_bytes + largest_chunk + 256
        for chunk in chunks:
            for event in parser.feed(chunk):
                _collect(event, parts, sizes)
            assert getattr(parser, "buffered_bytes", 0) <= bound, "parser buffered beyond its bound"
        for event in parser.close():
            _collect(event, parts, sizes)
        assert sizes == [len(body) for _, body in parts], "PartEnd.size differs from the data delivered"
        return [(fields, bytes(body)) for fields, body in parts]
    except RequestBodyError as error:
        failure: RequestBodyError = error
    assert failure.status_code in (400, 413, 415)
    assert str(failure)
    return type(failure)


def _collect(event: object, parts: list[tuple[object, bytearray]], sizes: list[int]) -> None:
    if isinstance(event, PartStart):
        assert event.index == len(parts)
        parts.append((event.headers.fields, bytearray()))
    elif isinstance(event, PartData):
        assert event.data
        parts[event.index][1].extend(event.data)
    elif isinstance(event, PartEnd):
        sizes.append(event.size)


def check_multipart(content_type: str, body: bytes, sizes: list[int]) -> None:
    whole = _parse(content_type, [body] if body else [])
    assert _parse(content_type, _split(body, sizes)) == whole, "result depends on chunking"
    assert _parse(content_type, _split(body, [1])) == whole, "result depends on chunking (1-byte)"


def _validate(data: bytes, sizes: list[int]) -> InstanceInfo | ValidationFailure:
    inspector = InstanceInspector(FUZZ_POLICY)
    for chunk in _split(data, sizes):
        inspector.feed(chunk)
    return inspector.finish()


def check_validation(data: bytes, sizes: list[int]) -> None:
    whole = _validate(data, [max(1, len(data))])
    assert isinstance(whole, InstanceInfo | ValidationFailure)
    assert _validate(data, sizes) == whole, "verdict depends on chunking"
    if isinstance(whole, ValidationFailure):
        assert whole.problem != "unparseable", "the walker let through what pydicom could not parse"
        for planted in (corpus.PLANTED_PATIENT_ID, corpus.PLANTED_PATIENT_NAME):
            assert planted not in whole.message, "planted PHI in a failure message"
        return
    assert whole.size == len(data)
    assert whole.sha256 == hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data), force=True, stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == whole.sop_instance_uid, "pydicom reads another SOPInstanceUID"


# --------------------------------------------------------------------------- inputs


@functools.cache
def multipart_seeds() -> list[tuple[str, bytes]]:
    small = [b"\x00\x01 dicom-ish", b"\r\n--x\r\n", bytes(range(40))]
    bodies = [
        corpus.python_dicomweb_client_body(small),
        corpus.npm_dicomweb_client_body(small, boundary="b0b"),
        corpus.orthanc_body(small[:2]),
        corpus.form_data_body(small[:1]),
        corpus.multipart_body(small, boundary="b", preamble=b"pre", epilogue=b"post", content_length=True),
        corpus.multipart_body([b""] * 3, boundary="b"),
    ]
    return [(body.content_type, body.data) for body in bodies] + [("application/dicom", b"DICM")]


@functools.cache
def dicom_seeds() -> list[bytes]:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

    return [
        corpus.make_instance(pixel_bytes=128),
        corpus.make_instance(ImplicitVRLittleEndian, with_meta=False, pixel_bytes=128),
        corpus.make_instance(DeflatedExplicitVRLittleEndian, pixel_bytes=128),
        corpus.nested_sequences(4),
        corpus.pydicom_file("JPEG2000-embedded-sequence-delimiter.dcm"),
        corpus.pydicom_file("UN_sequence.dcm"),
        corpus.pydicom_file("nested_priv_SQ.dcm"),
    ]


TOKENS = [
    b"\r\n",
    b"--",
    b"\r\n\r\n",
    b"\xff\xff\xff\xff",
    b"\xfe\xff\x00\xe0",
    b"\xfe\xff\xdd\xe0",
    b"SQ",
    b"UN",
]


def mutated(seed: bytes, draw: st.DrawFn) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup", "token"]))
        at = draw(st.integers(min_value=0, max_value=max(0, len(data))))
        if op == "flip" and data:
            data[at % len(data)] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=16))]
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(min_value=1, max_value=64))]
        else:
            data[at:at] = draw(st.sampled_from(TOKENS))
    if draw(st.booleans()):
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return bytes(data)


chunk_sizes = st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=6)


@st.composite
def multipart_inputs(draw: st.DrawFn) -> tuple[str, bytes, list[int]]:
    content_type, body = draw(st.sampled_from(multipart_seeds()))
    return content_type, mutated(body, draw), draw(chunk_sizes)


@st.composite
def dicom_inputs(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    return mutated(draw(st.sampled_from(dicom_seeds())), draw), draw(chunk_sizes)


# --------------------------------------------------------------------------- runner


def save_regression(kind: str, payload: bytes, folder: Path = REGRESSIONS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{hashlib.sha256(payload).hexdigest()[:16]}.bin"
    path.write_bytes(payload)
    return path


def _batch(target: str, examples: int, seed: int) -> Path | None:
    last: dict[str, bytes] = {}
    config = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    if target == "multipart":

        @config
        @given(multipart_inputs())
        def run(case: tuple[str, bytes, list[int]]) -> None:
            content_type, body, sizes = case
            last["payload"] = content_type.encode("latin-1") + b"\n" + body
            check_multipart(content_type, body, sizes)

    else:

        @config
        @given(dicom_inputs())
        def run(case: tuple[bytes, list[int]]) -> None:
            data, sizes = case
            last["payload"] = data
            check_validation(data, sizes)

    random.seed(seed)
    run_with_seed: Callable[[], None] = run
    run_with_seed._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    try:
        run_with_seed()
    except Exception as error:  # any invariant broken or unexpected exception is a finding
        path = save_regression("multipart" if target == "multipart" else "dicom", last["payload"])
        print(f"FOUND ({target}): {type(error).__name__}: {error}\n  saved {path}", flush=True)
        return path
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--target", choices=["multipart", "validation", "all"], default="all")
    parser.add_argument("--batch", type=int, default=200, help="examples per Hypothesis batch")
    args = parser.parse_args(argv)
    targets = ["multipart", "validation"] if args.target == "all" else [args.target]
    deadline = time.monotonic() + args.seconds
    found: list[Path] = []
    batches = 0
    seed = random.SystemRandom().randrange(2**32)
    while time.monotonic() < deadline:
        for target in targets:
            path = _batch(target, args.batch, seed + batches)
            batches += 1
            if path is not None:
                found.append(path)
    print(
        f"fuzz_edge: {batches} batches of {args.batch} examples over {args.seconds:.0f}s, "
        f"{len(found)} finding(s), first seed {seed}"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
