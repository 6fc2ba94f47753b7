"""``modelmux job``'s command line, kept apart from its actions (modelmux_common/jobcli.py) so
that building the ``modelmux`` command's parser imports no gRPC client: every other command
starts as fast as before.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:8500"
# the job statuses a listing can filter on (the client's JobStatus, without UNSPECIFIED)
STATUSES = (
    "ENQUEUING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED_WHILE_ENQUEUING",
    "COMPLETED_WITH_FAILURES",
    "WORKER_ERROR",
    "TIMED_OUT",
    "STOPPED",
)
EPILOG = """\
exit status: 0 done (with --watch: the job SUCCEEDED), 1 a watched job ended otherwise,
2 a bad command line or input file, 3 the gateway refused the call or was not reachable."""


def add_parser(sub: Any) -> None:
    """``modelmux job ACTION ...`` under the ``modelmux`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=os.environ.get("MODELMUX_ADDRESS") or DEFAULT_ADDRESS,
        help="the gateway, host:port or unix:path, plaintext (default $MODELMUX_ADDRESS, "
        f"else {DEFAULT_ADDRESS})",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    job = sub.add_parser("job", help="submit and follow batch jobs of a BatchAPI", epilog=EPILOG)
    actions = job.add_subparsers(dest="action", required=True, metavar="ACTION")
    _submit_parser(actions, common)
    get = actions.add_parser("get", parents=[common], help="a job's status", epilog=EPILOG)
    get.add_argument("job_id", metavar="JOB_ID")
    get.add_argument("--api", default="", help="the BatchAPI (default: any)")
    get.add_argument("--watch", action="store_true", help="follow the job until it ends")
    listing = actions.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument("--api", default="", help="one BatchAPI's jobs (default: every one)")
    listing.add_argument(
        "--status", action="append", default=[], choices=STATUSES, help="only these (repeatable)"
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    stop = actions.add_parser("stop", parents=[common], help="stop a job (it ends STOPPED)")
    stop.add_argument("job_id", metavar="JOB_ID")
    stop.add_argument("--api", default="", help="the BatchAPI (default: any)")
    failed = actions.add_parser(
        "failed", parents=[common], help="a job's failed batches: id, attempts, error, items"
    )
    failed.add_argument("job_id", metavar="JOB_ID")
    failed.add_argument("--api", default="", help="the BatchAPI (default: any)")


def _submit_parser(actions: Any, common: argparse.ArgumentParser) -> None:
    submit = actions.add_parser(
        "submit",
        parents=[common],
        help="submit a job (prints its id at once)",
        description="Submit a job to a BatchAPI over exactly one source. Local paths are made "
        "absolute here: they must be folders or files the gateway's machine sees at that path.",
        epilog=EPILOG,
    )
    submit.add_argument("--api", required=True, help="the BatchAPI's name")
    submit.add_argument("--workers", type=int, required=True, help="worker processes (>= 1)")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--items", metavar="FILE.json", help="a JSON array of items ('-': stdin)")
    source.add_argument(
        "--files", nargs="+", metavar="PREFIX", help="s3:// prefixes or folders: a file per item"
    )
    source.add_argument(
        "--ndjson", nargs="+", metavar="PREFIX", help="s3:// prefixes or folders of NDJSON files"
    )
    submit.add_argument("--batch-size", type=int, default=1, help="items per batch (default 1)")
    submit.add_argument("--config", metavar="FILE", help="YAML or JSON mapping: the job's config")
    submit.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files whose path or URI matches one (repeatable; * also matches /)",
    )
    submit.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave such files out"
    )
    submit.add_argument(
        "--dead-letter", type=int, metavar="N", help="runs of a failing batch before it is failed"
    )
    submit.add_argument("--timeout", help="end the job TIMED_OUT after this long (90s, 10m, 2h)")
    submit.add_argument("--dry-run", action="store_true", help="list what it would process")
    submit.add_argument("--watch", action="store_true", help="follow the job until it ends")
