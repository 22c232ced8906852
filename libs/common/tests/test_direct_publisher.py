"""DirectPublisher without a broker: refuses to queue before start (the real path is exercised by
every gateway integration test, including the one-trace test that checks its create spans)."""

from __future__ import annotations

import pytest
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.kafka import DirectPublisher
from enclave_common.settings import BaseServiceSettings
from enclave_common.telemetry import build_tracer_provider


async def test_sending_before_start_is_a_connection_error() -> None:
    settings = BaseServiceSettings()
    provider, _ = build_tracer_provider(settings)
    publisher = DirectPublisher(settings, tracer_provider=provider)
    envelope = Envelope.model_validate(
        {"id": new_event_id(), "type": "enclave.test", "source": "t", "tenant": "t", "actor": "t", "data": {}}
        | {"correlation_id": "upload"}
    )
    with pytest.raises(ConnectionError):
        await publisher.send("enclave.test.v1", envelope, key="k")
    await publisher.stop()  # stopping what never started is a no-op
