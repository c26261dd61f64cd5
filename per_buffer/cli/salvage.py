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

from ..queue import (
    AlreadySalvagedError,
    DurableQueue,
    SalvageResult,
    is_queue_directory,
    quarantined_folders,
    salvage,
)
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

EPILOG = f"""\
examples:
  {PROG} status --dir /var/lib/myapp/per-buffer     # lists quarantined databases
  {PROG} salvage /var/lib/myapp/per-buffer/quarantine-20240501T101500.123456Z-db-0003
  {PROG} salvage ./quarantine-... --dir /var/lib/myapp/per-buffer --json

The re-queued activities are sent by the next recorder on the live directory (or
'{PROG} drain'). A copy Per already has is harmless: Per counts unique users.
"""

EXIT_CODES = f"""\
  0  it ran: the line says how many entries were re-queued and what was unreadable
  1  the live queue could not be written
{EXIT_USAGE_LINE};
     QUARANTINE_DIR is not a quarantined database, or was salvaged before
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
    parser.add_argument(
        "--force", action="store_true", help="salvage a folder again (stores its entries twice)"
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
    try:
        with DurableQueue(live, reserve_bytes=0) as queue:
            result = salvage(quarantine, into=queue, force=args.force)
    except AlreadySalvagedError as exc:
        raise UsageError(
            f"{quarantine} was salvaged before (see {exc.marker}); --force stores its "
            "entries again (duplicates are harmless to Per's counts, not to your backlog)"
        ) from None
    except ValueError as exc:  # not a database folder, or a live one
        raise UsageError(str(exc)) from None
    found = result.requeued + result.dead_letters + result.refused
    if found == 0 and (result.unreadable or result.missing):
        raise CLIError(
            f"nothing was readable in {quarantine}: {_unreadable(result)}; nothing was re-queued",
            EXIT_LOST,
        )
    if args.json:
        print_json({**dataclasses.asdict(result), "quarantine": quarantine, "directory": live})
        return EXIT_OK
    line = f"re-queued {result.requeued:,} entries"
    if result.dead_letters:
        line += f" and {result.dead_letters:,} dead letters"
    out(f"{line} from {quarantine} into {live}; could not read: {_unreadable(result)}")
    if result.refused:
        out(f"{result.refused:,} readable entries were refused: the live queue is full")
    if result.requeued:
        out(f"the next recorder there, or '{PROG} drain --dir {live}', sends them")
    return EXIT_OK


def _unreadable(result: SalvageResult) -> str:
    """``0 entries`` / ``3 stored rows (up to 512 entries each), 1,200 entries missing``."""
    parts = []
    if result.unreadable:
        rows = "row" if result.unreadable == 1 else "rows"
        parts.append(f"{result.unreadable:,} stored {rows} (up to 512 entries each)")
    if result.missing:
        parts.append(f"{result.missing:,} entries missing")
    elif result.missing is None:
        parts.append("an unknown number of entries (the counters are unreadable too)")
    return ", ".join(parts) or "0 entries"
