"""``per-buffer salvage``: re-queue the readable entries of a quarantined database.

A queue moves a database it cannot read aside, into a ``quarantine-*`` folder of its
directory, and carries on with a fresh one. This command reads what it still can from
such a folder and puts it back into the live queue (by default the directory holding
the folder), wrapping :func:`per_buffer.queue.salvage`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..queue import DurableQueue
from ._common import (
    EXIT_LOST,
    EXIT_OK,
    EXIT_USAGE_LINE,
    PROG,
    CLIError,
    UsageError,
    add_command,
    out,
    print_json,
)
from ._queues import is_queue_directory, quarantined_folders, salvage

EPILOG = f"""\
examples:
  {PROG} status --dir /var/lib/myapp/per-buffer     # lists quarantined databases
  {PROG} salvage /var/lib/myapp/per-buffer/quarantine-20240501T101500Z-gen-3
  {PROG} salvage ./quarantine-... --dir /var/lib/myapp/per-buffer --json

The re-queued activities are sent by the next recorder on the live directory (or
'{PROG} drain'). A copy Per already has is harmless: Per counts unique users.
"""

EXIT_CODES = f"""\
  0  salvage ran (the line says how many were re-queued and how many were unreadable)
  1  the live queue could not be written
{EXIT_USAGE_LINE}, or QUARANTINE_DIR is not a quarantined database
  3  nothing in it was readable
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer salvage``."""
    parser = add_command(
        commands,
        "salvage",
        "re-queue the readable entries of a quarantined database",
        cmd_salvage,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    parser.add_argument(
        "quarantine_dir", metavar="QUARANTINE_DIR", help="a quarantine-* folder of a queue"
    )
    parser.add_argument(
        "--dir",
        metavar="LIVE_DIR",
        help="the live queue directory to re-queue into (default: the one holding it)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout")


def _quarantine_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist; '{PROG} status' lists quarantined databases")
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory; pass a quarantine-* folder of a queue")
    known = {p.resolve() for p in quarantined_folders(path.parent)}
    if path.resolve() not in known:
        raise UsageError(
            f"{path} is not a quarantined database (a quarantine-* folder of a queue "
            f"directory); '{PROG} status --dir DIR' lists them"
        )
    return path


def _live_dir(arg: str | None, quarantine: Path) -> Path:
    if arg is None:
        live = quarantine.resolve().parent
        source = "the directory holding it"
    else:
        live, source = Path(arg).expanduser(), "--dir"
    if not live.is_dir() or not is_queue_directory(live):
        raise UsageError(f"{live} (from {source}) is not a per_buffer queue directory")
    return live


def cmd_salvage(args: argparse.Namespace) -> int:
    """``per-buffer salvage``: re-queue what a quarantined database still holds."""
    quarantine = _quarantine_dir(args.quarantine_dir)
    live = _live_dir(args.dir, quarantine)
    with DurableQueue(live, reserve_bytes=0) as queue:
        result = salvage(quarantine, into=queue)
    if result is None:
        raise CLIError("this per_buffer cannot salvage yet: per_buffer.queue has no salvage()")
    requeued, unreadable = int(result.requeued), int(result.unreadable)
    if requeued == 0 and unreadable > 0:
        raise CLIError(
            f"nothing was readable in {quarantine}: {unreadable:,} entries could not be read "
            "and nothing was re-queued",
            EXIT_LOST,
        )
    if args.json:
        fields: dict[str, Any] = {}
        if dataclasses.is_dataclass(result) and not isinstance(result, type):
            fields = dataclasses.asdict(result)
        print_json({**fields, "quarantine": quarantine, "directory": live})
        return EXIT_OK
    out(
        f"re-queued {requeued:,} entries from {quarantine} into {live}; "
        f"{unreadable:,} could not be read"
    )
    if requeued:
        out(f"the next recorder there, or '{PROG} drain --dir {live}', sends them")
    return EXIT_OK
