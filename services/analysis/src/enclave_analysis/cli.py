"""Operator command of the analysis service (same settings as the service, ``ENCLAVE_ANALYSIS_*``).

``enclave-analysis-rerun``: analyse finished series again, e.g. those that failed with
``analysis_internal_error`` once the bug is fixed, or with ``pixel_data_unreadable`` once a decoder is
installed. The series are marked changed in the analysis database; the running service picks them up
after its quiet period and publishes a new outcome (a new event, which replaces the old one in the
gateway's status). A re-run (not a dry run) is audited: an ``access.recorded`` event naming the
actor, the selection and the reason is acknowledged by Kafka before any series is marked, and a
second one says how many were (``enclave_common.operator_actions``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from enclave_common.logging import configure_logging
from enclave_common.mongo import mongo_client
from enclave_common.operator_actions import OperatorAction, record_end, record_start

from enclave_analysis.assembly import UNRECORDED, SeriesAssembly
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.errors import REASON_CODES

log = structlog.get_logger("enclave.analysis.rerun")

#: Series ids listed in the command's answer (the count is always complete).
LISTED = 100


def _selection(args: argparse.Namespace) -> str:
    """The access target: ``series:K/reason_code:C/status:S`` (the audit record names the series)."""
    chosen = {"series": args.series_key, "reason_code": args.reason_code, "status": args.status}
    return "/".join(f"{name}:{value}" for name, value in chosen.items() if value is not None)


async def _rerun(
    args: argparse.Namespace, settings: AnalysisSettings, audited: OperatorAction | None
) -> dict[str, Any]:
    if audited is not None:
        await record_start(settings, audited, "started")
    mongo = mongo_client(settings)
    reopened: list[str] = []
    try:
        assembly = SeriesAssembly(mongo[settings.mongo_database])
        await assembly.reopen(
            status=args.status,
            reason_code=args.reason_code,
            tenant=args.tenant,
            series_key=args.series_key,
            dry_run=args.dry_run,
            into=reopened,
        )
    except BaseException as exc:
        if audited is not None:
            stopped = f"stopped after re-opening {len(reopened)} series: {type(exc).__name__}"
            await record_end(settings, audited.event(outcome="error", status_code=500, detail=stopped))
        raise
    finally:
        await mongo.close()
    if audited is not None:
        await record_end(settings, audited.event(detail=f"re-opened {len(reopened)} series"))
    log.info(
        "series re-run requested" if not args.dry_run else "series that a re-run would take",
        actor=args.actor,
        status=args.status,
        reason_code=args.reason_code,
        tenant=args.tenant,
        series=len(reopened),
    )
    return {
        "dry_run": args.dry_run,
        "series": len(reopened),
        "series_ids": reopened[:LISTED],
    }


def rerun_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-analysis-rerun",
        description="Analyse finished series again (the running analysis service does it after its quiet "
        "period and publishes a new outcome). Give a reason code or a series key: a re-run of every series "
        "is not offered.",
    )
    parser.add_argument(
        "--status", choices=("failed", "completed"), default="failed", help="which finished series (failed)"
    )
    parser.add_argument(
        "--reason-code",
        choices=sorted(REASON_CODES | {UNRECORDED}),
        metavar="REASON_CODE",
        help="only series that failed with this reason_code (one of: "
        + ", ".join(sorted(REASON_CODES))
        + "); 'unrecorded' for series that finished before reason codes were recorded",
    )
    parser.add_argument("--tenant", help="only this tenant's series")
    parser.add_argument("--series-key", help="one series, by its pseudonymous key (in its analysis events)")
    parser.add_argument("--actor", required=True, help="who asks (e.g. user:sre-jane), for the audit trail")
    parser.add_argument(
        "--reason",
        default="",
        help="why (10 to 500 characters), for the audit trail; required unless --dry-run",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the series, change nothing")
    args = parser.parse_args(argv)
    if args.reason_code is None and args.series_key is None:
        parser.error("give --reason-code or --series-key (or both)")
    audited = OperatorAction.from_command_line(
        parser, args, source="enclave-analysis-rerun", action="analysis_rerun", target=_selection(args)
    )
    settings = AnalysisSettings()
    configure_logging("analysis-rerun", settings.log_level, stream=sys.stderr)
    print(json.dumps(asyncio.run(_rerun(args, settings, audited)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(rerun_main())
