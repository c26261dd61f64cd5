"""``per-buffer dead-letters``: list, requeue or purge the activities Per refused for good."""

from __future__ import annotations

import argparse
from typing import Any

from ..queue import DurableQueue
from ._common import (
    EXIT_OK,
    EXIT_USAGE_LINE,
    PROG,
    UsageError,
    add_command,
    iso,
    one_line,
    out,
    positive_int,
    print_json,
    queue_directory,
    table,
)

EPILOG = f"""\
examples:
  {PROG} dead-letters list --dir /var/lib/myapp/per-buffer --limit 20
  {PROG} dead-letters list --json
  {PROG} dead-letters requeue      # send them again (then: {PROG} drain)
  {PROG} dead-letters purge        # delete them for good
"""

EXIT_CODES = f"""\
  0  listed, requeued or purged
  1  the queue could not be read or changed
{EXIT_USAGE_LINE}
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer dead-letters``."""
    parser = add_command(
        commands,
        "dead-letters",
        "list, requeue or purge activities Per refused for good",
        cmd_dead_letters,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    parser.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=("list", "requeue", "purge"),
        help="what to do (default: list)",
    )
    parser.add_argument("--dir", metavar="DIR", help="queue directory")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    parser.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="list at most N"
    )


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """``per-buffer dead-letters``: list, requeue or purge what Per refused for good."""
    if args.limit is not None and args.action != "list":
        raise UsageError(f"--limit applies to 'dead-letters list' only, not {args.action!r}")
    path = queue_directory(args.dir)
    with DurableQueue(path, reserve_bytes=0) as queue:  # no ballast file for a look
        if args.action == "requeue":
            moved = queue.requeue_dead_letters()
            if args.json:
                print_json({"directory": path, "requeued": moved})
            else:
                out(f"requeued {moved:,} dead letters in {path}")
                if moved:
                    out(f"the next recorder there, or '{PROG} drain --dir {path}', sends them")
            return EXIT_OK
        if args.action == "purge":
            purged = queue.purge_dead_letters()
            if args.json:
                print_json({"directory": path, "purged": purged})
            else:
                out(f"purged {purged:,} dead letters from {path}")
            return EXIT_OK
        limit = args.limit if args.limit is not None else (None if args.json else 100)
        letters = queue.dead_letters(limit=limit)
        total = queue.stats().dead_lettered
    records = [
        {
            "id": letter.entry.id,
            "billing_id": letter.entry.activity.billing_id,
            "user_id": letter.entry.activity.user_id,
            "activity_type_id": letter.entry.activity.activity_type_id,
            "recorded_at": iso(letter.entry.recorded_at),
            "attempts": letter.entry.attempts,
            "last_error": letter.entry.last_error,
            "reason": letter.reason,
            "dead_at": iso(letter.dead_at),
        }
        for letter in letters
    ]
    if args.json:
        print_json({"directory": path, "total": total, "dead_letters": records})
        return EXIT_OK
    _print_letters(records, total, path)
    return EXIT_OK


def _print_letters(records: list[dict[str, Any]], total: int, path: object) -> None:
    if not records:
        out(f"No dead letters in {path}.")
        return
    for line in table(
        ("ID", "BILLING ID", "USER ID", "ACTIVITY TYPE", "ATTEMPTS", "DEAD AT", "REASON"),
        [
            (
                r["id"],
                r["billing_id"],
                r["user_id"],
                r["activity_type_id"],
                r["attempts"],
                r["dead_at"] or "-",
                one_line(r["reason"] or "-"),
            )
            for r in records
        ],
        "lllllll",
    ):
        out(line)
    if total > len(records):
        out(f"... showing {len(records):,} of {total:,}; use --limit N or --json for more")
