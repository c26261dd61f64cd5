"""The verdict of ``per-buffer demo``: Per's report against the users counted locally."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..models import format_timestamp
from ..recorder import RecorderStats
from ._common import EXIT_FAILURE, EXIT_OK, count, key_values, one_line, out, print_json, table

Key = tuple[str, str]  # (activity type, billing ID)


@dataclass
class DemoResult:
    """What the demo measured, for the verdict."""

    seed: int
    report_start: datetime
    expected: dict[Key, int]
    reported: dict[Key, int]
    final: RecorderStats
    flushed: bool
    errors: list[str]
    server: Mapping[str, Any]
    timings: dict[str, float]


@dataclass
class _Summary:
    """The comparison, computed once for both the text and the JSON output."""

    keys: list[Key]
    mismatches: list[Key]
    totals: dict[str, dict[str, int]]
    requests: int
    reduction: float
    dropped: int
    match: bool
    message: str


def verdict(args: argparse.Namespace, result: DemoResult) -> int:
    """Print the comparison (tables, or ``--json``); 0 on MATCH, 1 on MISMATCH."""
    summary = _summarize(args, result)
    if args.json:
        _print_verdict_json(args, result, summary)
    else:
        _print_verdict_text(args, result, summary)
    return EXIT_OK if summary.match else EXIT_FAILURE


def _summarize(args: argparse.Namespace, result: DemoResult) -> _Summary:
    expected, reported, final = result.expected, result.reported, result.final
    keys = sorted(
        set(expected) | set(reported),
        key=lambda k: (-expected.get(k, 0), -reported.get(k, 0), k),
    )
    mismatches = [k for k in keys if expected.get(k, 0) != reported.get(k, 0)]
    requests = final.delivered + final.retried + final.dead_lettered
    totals = {
        t: {
            "expected": sum(v for k, v in expected.items() if k[0] == t),
            "reported": sum(v for k, v in reported.items() if k[0] == t),
        }
        for t in sorted({k[0] for k in keys})
    }
    outage = args.seconds_outage
    match = not mismatches and not result.errors and bool(expected)
    if match:
        message = (
            f"MATCH: Per's report equals the unique users counted locally in all {len(keys):,} "
            f"(activity type, billing ID) rows ({sum(expected.values()):,} in total)"
            + (f", despite a {outage:g} s outage and random HTTP 503s" if outage else "")
        )
    elif result.errors:
        message = f"MISMATCH: recording failed: {one_line(result.errors[0])}"
    elif not expected:
        message = "MISMATCH: nothing was recorded"
    else:
        k = mismatches[0]
        left = final.pending + final.in_flight
        message = (
            f"MISMATCH: {len(mismatches):,} of {len(keys):,} rows differ, e.g. {k[0]}/{k[1]}: "
            f"{expected.get(k, 0):,} users counted locally, Per reported {reported.get(k, 0):,}"
            + ("" if result.flushed else f"; delivery did not finish ({left:,} left)")
        )
    return _Summary(
        keys=keys,
        mismatches=mismatches,
        totals=totals,
        requests=requests,
        reduction=final.recorded / requests if requests else 0.0,
        dropped=sum(final.dropped.values()),
        match=match,
        message=message,
    )


def _print_verdict_json(args: argparse.Namespace, result: DemoResult, s: _Summary) -> None:
    final = result.final
    print_json(
        {
            "verdict": "MATCH" if s.match else "MISMATCH",
            "match": s.match,
            "message": s.message,
            "settings": {
                "activities": args.activities,
                "threads": args.threads,
                "users": args.users,
                "billing_ids": args.billing_ids,
                "seconds_outage": args.seconds_outage,
                "concurrency": args.concurrency,
                "coalesce_window": args.coalesce_window,
                "seed": result.seed,
            },
            "report_start": format_timestamp(result.report_start),
            "rows": [
                {
                    "activity_type_id": k[0],
                    "billing_id": k[1],
                    "expected": result.expected.get(k, 0),
                    "reported": result.reported.get(k, 0),
                }
                for k in s.keys
            ],
            "totals": s.totals,
            "mismatches": len(s.mismatches),
            "stats": {
                "recorded": final.recorded,
                "coalesced": final.coalesced,
                "enqueued": final.enqueued,
                "requests_sent": s.requests,
                "reduction_factor": round(s.reduction, 2),
                "retried": final.retried,
                "delivered": final.delivered,
                "dead_lettered": final.dead_lettered,
                "dropped": s.dropped,
                "left_undelivered": final.pending + final.in_flight,
                "late_deliveries": final.late_deliveries,
                "time_s": round(result.timings["total_s"], 2),
            },
            "server": result.server,
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
        }
    )


def _print_verdict_text(args: argparse.Namespace, result: DemoResult, s: _Summary) -> None:
    expected, reported = result.expected, result.reported
    top = s.keys[: args.top]
    shown = sorted(set(top) | set(s.mismatches[: args.top]), key=s.keys.index)
    out(
        f"Unique users per (activity type, billing ID): top {len(top)} of {len(s.keys):,} rows"
        + (f", plus mismatching ones ({len(s.mismatches):,} in all)" if s.mismatches else "")
    )
    rows = [
        (
            k[0],
            k[1],
            count(expected.get(k, 0)),
            count(reported.get(k, 0)),
            "ok" if expected.get(k, 0) == reported.get(k, 0) else "DIFFERS",
        )
        for k in shown
    ]
    for line in table(
        ("ACTIVITY TYPE", "BILLING ID", "COUNTED LOCALLY", "PER REPORT", ""), rows, "llrrl"
    ):
        out(line)
    out()
    out("Totals per activity type:")
    totals = [(t, count(v["expected"]), count(v["reported"])) for t, v in s.totals.items()]
    totals.append(
        (
            "(all)",
            count(sum(v["expected"] for v in s.totals.values())),
            count(sum(v["reported"] for v in s.totals.values())),
        )
    )
    for line in table(("ACTIVITY TYPE", "COUNTED LOCALLY", "PER REPORT"), totals, "lrr"):
        out(line)
    out()
    out("Recorder:")
    for line in key_values(_recorder_lines(result, s)):
        out(f"  {line}")
    out()
    out(s.message)


def _recorder_lines(result: DemoResult, s: _Summary) -> list[tuple[str, str]]:
    final, timings = result.final, result.timings
    lines = [
        ("recorded", count(final.recorded)),
        ("coalesced", f"{final.coalesced:,} (repeats in the window, never sent)"),
        (
            "requests sent",
            f"{s.requests:,} (delivered {final.delivered:,} + retried {final.retried:,}"
            f" + dead-lettered {final.dead_lettered:,})",
        ),
        ("reduction factor", f"{s.reduction:.1f}x (record() calls per request)"),
        ("retried", count(final.retried)),
        ("delivered", count(final.delivered)),
        ("dropped", count(s.dropped)),
        (
            "time",
            f"{timings['total_s']:.1f} s (recording {timings['record_s']:.1f} s, "
            f"final flush {timings['flush_s']:.1f} s, report {timings['report_s']:.2f} s)",
        ),
    ]
    counters = result.server.get("counters")
    if isinstance(counters, Mapping) and isinstance(counters.get("requests"), int):
        accepted = int(counters.get("ok", 0))
        lines.append(
            (
                "Per server saw",
                f"{counters['requests']:,} requests: {accepted:,} accepted "
                f"({max(0, accepted - final.delivered):,} duplicates, harmless), "
                f"{int(counters.get('fault_503', 0)):,} answered HTTP 503",
            )
        )
    return lines
