"""The streams `enclave-deid-keys rotate` writes a re-wrapped object through (never the whole
object in memory); the command itself is tested on the real stack (tests/integration/test_deid.py)."""

from __future__ import annotations

import io

import pytest
from enclave_common.crypto.streaming import read_up_to
from enclave_deid.cli import _Prepended


class _Trickle(io.RawIOBase):
    """A network body that returns at most 3 bytes a read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._data.read(min(3, len(buffer)))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_the_header_prefix_is_read_whole_from_a_body_that_trickles():
    data = bytes(range(256)) * 20  # 5,120 bytes
    body = _Trickle(data)
    assert read_up_to(body, 4096) == data[:4096]
    assert read_up_to(body, 4096) == data[4096:]  # fewer only at the end
    assert read_up_to(body, 10) == b""


def test_the_new_header_then_the_rest_of_the_body_come_out_as_one_stream():
    rest = bytes(range(256)) * 1000
    stream = io.BufferedReader(_Prepended(b"NEW-HEADER", _Trickle(rest)), buffer_size=7)
    out = b"".join(iter(lambda: stream.read(1000), b""))
    assert out == b"NEW-HEADER" + rest
    assert io.BufferedReader(_Prepended(b"", io.BytesIO(b""))).read() == b""


async def test_a_rotation_stopped_part_way_still_publishes_key_rotated_with_its_count(tmp_path, monkeypatch):
    """The new keyring version exists once the walk starts: ``key.rotated`` names it, the actor and
    how many keys were re-wrapped before the failure, and the failure is raised."""
    from enclave_common.crypto import LocalKeyring
    from enclave_deid import cli
    from enclave_deid.config import DeidSettings

    path = tmp_path / "deid-keyring.json"
    LocalKeyring.generate("deid-kek").save(path)
    published = []

    class _FakeClients:
        def __init__(self, settings) -> None:
            self.publisher = self
            self.db = None

        async def __aenter__(self):
            return self

        async def __aexit__(self, *_):
            return None

        async def publish(self, topic, envelope, *, key):
            published.append((topic, envelope))

    async def _stops_after_two(settings, clients, keyring):
        yield
        yield
        raise ConnectionError("object store went away")

    monkeypatch.setattr(cli, "_Clients", _FakeClients)
    monkeypatch.setattr(cli, "_rewrap_all", _stops_after_two)
    with pytest.raises(ConnectionError):
        await cli._rotate(DeidSettings(keyring_file=path), "user:sre-jane")
    [(topic, envelope)] = published
    assert topic == "enclave.key.rotated.v1" and (envelope.actor, envelope.tenant) == ("user:sre-jane", "*")
    assert envelope.data["rewrapped"] == 2 and envelope.data["key_version"] == 2
    assert LocalKeyring.load(path).current_version == 2
