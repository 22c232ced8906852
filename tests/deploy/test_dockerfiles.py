# ruff: noqa: E501 -- kubeconform templates, ACL literals and mutation tables read best on one line
"""Each service's Dockerfile, checked at parser level (dockerfile-parse): no Docker engine runs here."""

from __future__ import annotations

import pytest

from .conftest import REPO_ROOT, SERVICES

MEMBERS = sorted(
    str(p.parent.relative_to(REPO_ROOT))
    for p in REPO_ROOT.glob("*/*/pyproject.toml")
    if p.parts[-3] in {"libs", "services"}
)


def dockerfile(service: str) -> str:
    return (REPO_ROOT / "services" / service / "Dockerfile").read_text()


def test_workspace_members_are_found():
    assert "libs/common" in MEMBERS
    assert all(f"services/{s}" in MEMBERS for s in SERVICES)


@pytest.mark.parametrize(("service", "port"), SERVICES.items())
def test_service_dockerfile_is_locked_multistage_and_non_root(lint, service, port):
    assert lint.dockerfile_problems(dockerfile(service), f"enclave-{service}", port, MEMBERS) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("USER 10001:10001", "USER root", "non-root"),
        ("USER 10001:10001\n", "", "must set USER"),
        ("python:3.11.14-slim-bookworm", "python", "pinned"),
        ("python:3.11.14-slim-bookworm", "python:latest", "'latest' is not a pin"),
        ("--no-dev --no-editable --package", "--no-editable --package", "--no-dev"),
        ("--frozen --no-dev", "--no-dev", "--frozen"),
        ("COPY services/audit/pyproject.toml services/audit/\n", "", "services/audit is missing"),
        ("COPY --from=build /app/.venv /app/.venv", "COPY . /app", "copies from the build context"),
        ('ENTRYPOINT ["enclave-ingest"]', "ENTRYPOINT enclave-ingest", "exec form"),
        ("EXPOSE 8081", "EXPOSE 9999", "EXPOSE 8081"),
    ],
)
def test_lint_catches_a_broken_dockerfile(lint, old, new, expected):
    text = dockerfile("ingest")
    assert old in text
    problems = lint.dockerfile_problems(text.replace(old, new), "enclave-ingest", 8081, MEMBERS)
    assert any(expected in p for p in problems), problems


def test_dockerignore_keeps_tests_state_and_venv_out():
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    first_allow = next(i for i, line in enumerate(ignore) if line.startswith("!"))
    assert "**" in ignore[:first_allow], "everything is excluded first, then only what the build needs"
    allowed = [line for line in ignore if line.startswith("!")]
    assert not any(
        word in line for line in allowed for word in ("tests", ".venv", ".state", ".git", "deploy")
    )
