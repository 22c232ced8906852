"""The dev issuer CLI (scripts/dev_issuer.py): keys on disk, tokens that the verifier accepts, rotation."""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path
from types import ModuleType

import pytest
from enclave_common.auth import AuthenticationError, Role, StaticKeySource, TokenRules, TokenVerifier
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer, jwk_thumbprint

SCRIPT = Path(__file__).resolve().parents[4] / "scripts" / "dev_issuer.py"


@pytest.fixture(scope="module")
def cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dev_issuer_cli", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verifier_for(directory: Path) -> TokenVerifier:
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    return TokenVerifier(
        rules, StaticKeySource.from_file(directory / "jwks.json", algorithms=rules.algorithms)
    )


async def test_init_then_token_verifies(
    cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert cli.main(["init", "--dir", str(keys)]) == 0
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    pems = sorted(keys.glob("*.pem"))
    assert [p.name.split("-")[0] for p in pems] == ["es256", "rs256"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in pems)
    capsys.readouterr()

    for alg in ("ES256", "RS256"):
        argv = ["token", "--dir", str(keys), "--sub", "alice", "--tenant", "hospital-a"]
        assert cli.main([*argv, "--roles", "clinician, researcher", "--ttl", "120", "--alg", alg]) == 0
        token = capsys.readouterr().out.strip()
        principal = await verifier_for(keys).verify_bearer(token)
        assert (principal.subject, principal.tenant) == ("alice", "hospital-a")
        assert principal.roles == {Role.CLINICIAN, Role.RESEARCHER}


def test_init_refuses_to_overwrite(cli: ModuleType, tmp_path: Path) -> None:
    assert cli.main(["init", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "jwks.json").read_text()
    assert cli.main(["init", "--dir", str(tmp_path)]) == 2
    assert (tmp_path / "jwks.json").read_text() == before
    assert cli.main(["init", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "jwks.json").read_text() != before


def test_token_without_init_explains(
    cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["token", "--dir", str(tmp_path), "--sub", "a", "--tenant", "t", "--roles", "admin"]
    assert cli.main(argv) == 2
    assert "init" in capsys.readouterr().err


async def test_rotate_keeps_old_tokens_valid(
    cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["token", "--dir", str(tmp_path), "--sub", "a", "--tenant", "hospital-a", "--roles", "auditor"]
    cli.main(["init", "--dir", str(tmp_path)])
    cli.main(argv)
    old = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["rotate", "--dir", str(tmp_path), "--alg", "ES256"]) == 0
    cli.main(argv)
    new = capsys.readouterr().out.strip().splitlines()[-1]
    kids = [k["kid"] for k in json.loads((tmp_path / "jwks.json").read_text())["keys"]]
    assert len(kids) == 3
    assert len(set(kids)) == 3
    verifier = verifier_for(tmp_path)
    assert (await verifier.verify_bearer(old)).roles == {Role.AUDITOR}
    assert (await verifier.verify_bearer(new)).roles == {Role.AUDITOR}


async def test_audience_override_is_enforced_by_the_verifier(
    cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(["init", "--dir", str(tmp_path)])
    argv = ["token", "--dir", str(tmp_path), "--sub", "a", "--tenant", "hospital-a", "--roles", "admin"]
    cli.main([*argv, "--audience", "someone-else"])
    with pytest.raises(AuthenticationError, match="audience"):
        await verifier_for(tmp_path).verify_bearer(capsys.readouterr().out.strip().splitlines()[-1])


def test_kid_is_the_rfc7638_thumbprint() -> None:
    """RFC 7638 section 3.1 example key and its published thumbprint."""
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQ"
        "MicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRw"
        "r3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    dev = DevIssuer.generate(["ES256"])
    public = dev.jwks()["keys"][0]
    assert public["kid"] == jwk_thumbprint(public)
