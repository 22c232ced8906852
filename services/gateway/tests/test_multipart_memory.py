"""Memory stays bounded while a large instance streams through the parser and the validator."""

from __future__ import annotations

import struct
import tracemalloc

from corpus import builders as corpus  # tests/conftest.py puts this directory on sys.path
from enclave_gateway.multipart import MultipartParser, PartData, PartEnd, PartStart
from enclave_gateway.validation import InstanceInfo, InstanceInspector

MIB = 1024 * 1024


def large_instance_chunks(pixel_bytes: int, chunk: int = MIB):
    """A valid instance whose PixelData is ``pixel_bytes`` long, framed as Orthanc sends it, in chunks."""
    small = corpus.make_instance(pixel_bytes=2)
    at = corpus.pixel_data_offset(small)
    header = small[:at] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    boundary = b"memory-test-boundary"
    yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + header
    block = bytes(range(256)) * (chunk // 256)
    remaining = pixel_bytes
    while remaining:
        piece = block[: min(chunk, remaining)]
        remaining -= len(piece)
        yield piece
    yield b"\r\n--" + boundary + b"--\r\n"


def test_half_gibibyte_instance_streams_in_bounded_memory() -> None:
    size = 512 * MIB
    parser = MultipartParser(b"memory-test-boundary")
    tracemalloc.start()
    try:
        results = []
        for chunk in large_instance_chunks(size):
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    inspector = InstanceInspector()
                elif isinstance(event, PartData):
                    assert inspector.feed(event.data) is None
                elif isinstance(event, PartEnd):
                    results.append(inspector.finish())
            del chunk
        parser.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [info] = results
    assert isinstance(info, InstanceInfo)
    assert info.size > size
    assert peak < 8 * MIB, f"peak traced memory {peak / MIB:.1f} MiB for a {size // MIB} MiB instance"
