"""``per-buffer report``: Per's unique-user report; by default this month up to now."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from ..client import PerClient
from ..models import format_timestamp, parse_timestamp
from ._common import (
    EXIT_OK,
    EXIT_USAGE_LINE,
    PROG,
    REPORTING_TOKEN_ENV,
    UsageError,
    add_command,
    base_url,
    call_per,
    out,
    positive_seconds,
    print_json,
    reporting_token,
    table,
)

EPILOG = f"""\
examples:
  {PROG} report                                   # this month (UTC) up to now
  {PROG} report --start today                     # since midnight UTC
  {PROG} report --start -7d                       # the last 7 days
  {PROG} report --start yesterday --end today     # yesterday, midnight to midnight UTC
  {PROG} report --start 2024-05-01 --end 2024-05-31T23:59:59Z --json

TIME is an ISO 8601 date (midnight UTC) or time with Z or an offset; 'now';
'today' or 'yesterday' (midnight UTC); or relative to now: -30m, -12h, -7d, -2w
(also -90s). --start defaults to the first day of this month (UTC), --end to now.
Needs $PER_REPORTING_TOKEN. Per counts an activity when it arrives.
"""

EXIT_CODES = f"""\
  0  the report was printed (also when it is empty)
  1  Per refused the reporting token, was unreachable, or failed
{EXIT_USAGE_LINE}
"""

_RELATIVE = re.compile(r"^-\s*(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer report``."""
    parser = add_command(
        commands,
        "report",
        "print Per's unique-user report",
        cmd_report,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    parser.add_argument(
        "--start",
        type=moment,
        default=None,
        metavar="TIME",
        help="first instant covered (default: the 1st of this month, 00:00 UTC)",
    )
    parser.add_argument(
        "--end", type=moment, default=None, metavar="TIME", help="last instant (default: now)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds(3600.0),
        default=10.0,
        metavar="S",
        help="HTTP timeout in seconds (default 10)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout")


def join_relative_times(argv: list[str]) -> list[str]:
    """``--start -7d`` as ``--start=-7d``: argparse would take ``-7d`` for an option."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else ""
        if arg in ("--start", "--end") and _RELATIVE.match(value.strip().lower()):
            joined.append(f"{arg}={value}")
            index += 2
        else:
            joined.append(arg)
            index += 1
    return joined


class Moment:
    """A report bound as typed, resolved against the time the command runs."""

    def __init__(self, text: str, resolve: Callable[[datetime], datetime]) -> None:
        self.text = text
        self.resolve = resolve

    def __repr__(self) -> str:
        return f"Moment({self.text!r})"


def _midnight(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def moment(text: str) -> Moment:
    """An argument type: ISO 8601, ``now``, ``today``, ``yesterday`` or ``-7d``-like."""
    word = text.strip().lower()
    if word == "now":
        return Moment(text, lambda now: now)
    if word == "today":
        return Moment(text, _midnight)
    if word == "yesterday":
        return Moment(text, lambda now: _midnight(now) - timedelta(days=1))
    relative = _RELATIVE.match(word)
    if relative:
        seconds = float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
        if not math.isfinite(seconds) or seconds > 100 * 366 * 86400:
            raise argparse.ArgumentTypeError(f"{text!r} reaches too far back")
        return Moment(text, lambda now: now - timedelta(seconds=seconds))
    try:
        fixed = parse_timestamp(text, "time")
    except ValueError as exc:
        if "time zone" in str(exc):
            raise argparse.ArgumentTypeError(
                f"{text!r} has no time zone: add Z (UTC) or an offset, e.g. {text}Z"
            ) from None
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use an ISO 8601 date or time such as 2024-05-01 "
            "or 2024-05-01T00:00:00Z, now, today, yesterday, or -30m, -12h, -7d"
        ) from None
    return Moment(text, lambda now: fixed)


def period(
    start: Moment | None, end: Moment | None, now: datetime
) -> tuple[datetime, datetime, str]:
    """The bounds asked for (whole seconds, UTC) and how to describe them."""
    # Per's bounds have whole seconds: round "now" up so that nothing recorded is left out.
    ceiling = now.replace(microsecond=0) + (
        timedelta(seconds=1) if now.microsecond else timedelta()
    )
    if start is None:
        first = _midnight(ceiling).replace(day=1)
        described = "this month (UTC) up to now" if end is None else f"this month to {end.text}"
    else:
        first = start.resolve(ceiling).replace(microsecond=0)
        described = f"from {start.text}" + (f" to {end.text}" if end is not None else " to now")
    last = ceiling if end is None else end.resolve(ceiling).replace(microsecond=0)
    if first > last:
        raise UsageError(
            f"the period is empty: it starts at {format_timestamp(first)}, after its end "
            f"{format_timestamp(last)} (check --start and --end)"
        )
    return first, last, described


def cmd_report(args: argparse.Namespace) -> int:
    """``per-buffer report``: Per's unique-user report as a table or JSON."""
    start, end, described = period(args.start, args.end, datetime.now(timezone.utc))
    token = reporting_token()
    url = base_url()
    with PerClient.for_reporting(token, base_url=url, timeout=args.timeout) as client:
        report = call_per(
            lambda: client.get_report(start, end), base_url=url, token_env=REPORTING_TOKEN_ENV
        )
    totals = report.totals()
    if args.json:
        print_json(
            {
                "start": start,
                "end": end,
                "period": described,
                "result": report.raw,
                "totals": totals,
            }
        )
        return EXIT_OK
    out(f"Per report {format_timestamp(start)} .. {format_timestamp(end)} ({described})")
    out()
    rows = list(report)
    if not rows:
        out("No activity in this period.")
        return EXIT_OK
    for line in table(
        ("ACTIVITY TYPE", "BILLING ID", "UNIQUE USERS"),
        [(r.activity_type_id, r.billing_id, r.unique) for r in rows],
        "llr",
    ):
        out(line)
    out()
    out("Totals per activity type:")
    for line in table(
        ("ACTIVITY TYPE", "BILLING IDS", "UNIQUE USERS"),
        [
            (type_id, sum(1 for r in rows if r.activity_type_id == type_id), totals[type_id])
            for type_id in sorted(totals)
        ],
        "lrr",
    ):
        out(line)
    return EXIT_OK
