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
