"""``--check-config`` names the variable to set when deid's own keys are missing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from enclave_common.crypto import LocalKeyring

KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def keyring(tmp_path):
    path = tmp_path / "keyring.json"
    LocalKeyring.generate("test-kek").save(path)
    return str(path)


def _check(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "enclave-deid"), "--check-config"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_unset_deid_pseudonym_key_is_reported_as_unset_not_as_equal_to_the_shared_one(keyring):
    """Before: "the deid pseudonym key equals ENCLAVE_PSEUDONYM_KEY", for a variable nobody set (the
    shared ENCLAVE_ prefix handed deid the gateway/ingest key)."""
    env = {
        "ENCLAVE_PSEUDONYM_KEY": KEY,
        "ENCLAVE_DEID_KEYRING_FILE": keyring,
        "ENCLAVE_DEID_ORIGINALS_KEYRING_FILE": keyring,
    }
    verdict = _check(env)
    assert verdict["reason"].startswith(
        "ENCLAVE_DEID_PSEUDONYM_KEY (or ENCLAVE_DEID_PSEUDONYM_KEY_FILE) is not set"
    )
    same = _check({**env, "ENCLAVE_DEID_PSEUDONYM_KEY": KEY})
    assert same["reason"].startswith("the deid pseudonym key equals ENCLAVE_PSEUDONYM_KEY")
    assert KEY not in json.dumps(verdict) + json.dumps(same)
