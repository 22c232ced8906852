"""`enclave-analysis-rerun` refuses to re-run every series at once: a filter is required."""

from __future__ import annotations

import pytest
from enclave_analysis.cli import rerun_main


def test_a_rerun_without_a_reason_code_or_series_key_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        rerun_main(["--actor", "user:sre", "--tenant", "t"])
    assert exit_.value.code == 2
    assert "give --reason-code or --series-key" in capsys.readouterr().err


def test_an_actor_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        rerun_main(["--reason-code", "analysis_internal_error"])
    assert exit_.value.code == 2
    assert "--actor" in capsys.readouterr().err


def test_an_unknown_reason_code_is_refused_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """A typo matched no series and reported 0, exit 0, as if nothing had failed that way."""
    with pytest.raises(SystemExit) as exit_:
        rerun_main(["--actor", "user:sre", "--reason-code", "series_incomplet", "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'series_incomplet'" in err
    assert "series_incomplete" in err and "unrecorded" in err


def test_the_known_reason_codes_are_the_documented_ones() -> None:
    """docs/analysis.md's table of failure reasons is what the command accepts, no more, no less."""
    import re
    from pathlib import Path

    from enclave_analysis.errors import REASON_CODES

    docs = (Path(__file__).resolve().parents[3] / "docs" / "analysis.md").read_text()
    table = docs.split("### Failure reasons", 1)[1].split("\n\n", 2)[1]
    assert set(re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.M)) - {"reason_code"} == REASON_CODES
