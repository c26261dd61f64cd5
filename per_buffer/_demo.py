"""The ``per-buffer demo`` command: workload, progress display and verdict.

``per-buffer demo`` starts a local Per server in its own process
(:class:`~per_buffer.testing.PerServerProcess`), records skewed activity from several
threads through a :class:`~per_buffer.Recorder` in a temporary directory, takes Per
down for a while, flushes, and compares Per's report with the unique users counted
locally (MATCH / MISMATCH).

It is a separate module only to keep ``cli.py`` small enough to read in one sitting.
:mod:`per_buffer.cli` keeps the argument parsing (the ``demo`` options included) and
imports this module when the command runs; it reuses the command line's output
helpers from there. Nothing else imports it, so ``import per_buffer`` stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .cli import (
    _TTY_INTERVAL,
    EXIT_FAILURE,
    EXIT_OK,
    CLIError,
    DeliveryState,
    Progress,
    _count,
    _key_values,
    _one_line,
    _out,
    _print_json,
    _sigterm_as_interrupt,
    _table,
)
from .client import PerClient
from .errors import PerError
from .models import format_timestamp
from .recorder import Recorder, RecorderStats
from .testing import PerServerProcess

__all__ = ["cmd_demo"]

_DEMO_TYPES = ("login", "export")
_DEMO_EXPORT_SHARE = 0.15
_DEMO_LATENCY = (0.005, 0.020)  # seconds, drawn anew about once a second
_DEMO_ERROR_RATE = 0.02
_DEMO_BUDGET = 55.0  # seconds the whole demo may take before it stops waiting for delivery
_DEMO_RATE = 20_000.0  # activities per second when --duration is not given

Key = tuple[str, str]


@dataclass
class _DemoPlan:
    """Who exists in the demo: users, the billing ID each belongs to, and their popularity."""

    users: list[str]
    billing_of: list[str]
    cum_weights: list[float]

    @classmethod
    def build(cls, users: int, billing_ids: int, rng: random.Random) -> _DemoPlan:
        """Skewed organisations (a few large, many small) and Zipf-like user activity."""
        orgs = [f"org-{i:03d}" for i in range(billing_ids)]
        org_weights = [1.0 / (i + 1) ** 0.8 for i in range(billing_ids)]
        billing_of = rng.choices(orgs, weights=org_weights, k=users)
        names = [f"user-{i:05d}" for i in range(users)]
        weights = [1.0 / (rank + 1) for rank in range(users)]
        rng.shuffle(weights)
        return cls(names, billing_of, list(itertools.accumulate(weights)))


@dataclass
class _DemoResult:
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


class _Demo:
    """Runs ``per-buffer demo``: server process, recording threads, outage, flush, report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed: int = (
            args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
        )
        self.rng = random.Random(self.seed)
        self.outage: float = args.seconds_outage
        self.duration: float = (
            args.duration
            if args.duration is not None
            else max(args.activities / _DEMO_RATE, 2.0 * self.outage + 1.0)
        )
        self.outage_at = 0.3 * self.duration
        self.progress = Progress()
        self.stop = threading.Event()
        self.recorded = [0] * args.threads
        self.seen: list[set[tuple[str, str, str]]] = [set() for _ in range(args.threads)]
        self.errors: list[str] = []
        self.started = time.monotonic()
        self.server_down = False
        self.state = DeliveryState()
        self.next_latency = 0.0

    # ------------------------------------------------------------------ the run

    def run(self) -> _DemoResult:
        """Everything, with the temporary directory and the server process always cleaned up."""
        args = self.args
        tmp = Path(tempfile.mkdtemp(prefix="per-buffer-demo-"))
        server: PerServerProcess | None = None
        recorder: Recorder | None = None
        threads: list[threading.Thread] = []
        try:
            self.progress.note(
                f"Starting a local Per server in its own process "
                f"({_DEMO_LATENCY[0] * 1000:.0f}-{_DEMO_LATENCY[1] * 1000:.0f} ms latency, "
                f"{_DEMO_ERROR_RATE:.0%} HTTP 503) ..."
            )
            server = PerServerProcess(
                latency=sum(_DEMO_LATENCY) / 2,
                error_rate=_DEMO_ERROR_RATE,
                seed=self.seed,
                keep_activities=False,
            )
            try:
                server.start()
            except RuntimeError as exc:
                raise CLIError(f"the local Per server did not start: {exc}") from None
            report_start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=5)
            recorder = self._recorder(server, tmp / "queue")
            plan = _DemoPlan.build(args.users, args.billing_ids, self.rng)
            self.progress.note(
                f"Recording {args.activities:,} activities from {args.threads} threads, "
                f"{args.users:,} users in {args.billing_ids} billing IDs, over "
                f"~{self.duration:.1f} s"
                + (
                    f"; Per goes down for {self.outage:g} s at {self.outage_at:.1f} s"
                    if self.outage
                    else ""
                )
                + f" (seed {self.seed})"
            )
            record_started = time.monotonic()
            threads = self._start_threads(recorder, plan)
            self._record_phase(server, recorder, threads, record_started)
            record_time = time.monotonic() - record_started

            flush_started = time.monotonic()
            flushed = self._flush_phase(server, recorder)
            flush_time = time.monotonic() - flush_started
            self.progress.done()
            final = recorder.stats()
            recorder.close(1.0)
            recorder = None

            expected: dict[Key, int] = {}
            for type_id, billing_id, _ in set().union(*self.seen):
                expected[(type_id, billing_id)] = expected.get((type_id, billing_id), 0) + 1
            report_started = time.monotonic()
            reported = _demo_fetch_report(server.url, server.reporting_token, report_start)
            report_time = time.monotonic() - report_started
            server_stats = _safe_server_stats(server)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(1.0)
            if recorder is not None:
                with contextlib.suppress(Exception):
                    recorder.close(0.2)
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            self.progress.done()
        return _DemoResult(
            seed=self.seed,
            report_start=report_start,
            expected=expected,
            reported=reported,
            final=final,
            flushed=flushed,
            errors=self.errors,
            server=server_stats,
            timings={
                "record_s": record_time,
                "flush_s": flush_time,
                "report_s": report_time,
                "total_s": time.monotonic() - self.started,
            },
        )

    def _recorder(self, server: Any, directory: Path) -> Recorder:
        return Recorder(
            server.activity_token,
            _DEMO_TYPES[0],
            directory=directory,
            base_url=server.url,
            coalesce_window=self.args.coalesce_window,
            enabled=True,
            durability="batched",
            concurrency=self.args.concurrency,
            timeout=2.0,
            backoff_initial=0.05,
            backoff_max=1.0,
            poll_interval=0.2,
            exit_timeout=1.0,
        )

    def _start_threads(self, recorder: Recorder, plan: _DemoPlan) -> list[threading.Thread]:
        args = self.args
        threads = []
        for slot in range(args.threads):
            count = args.activities // args.threads + (
                1 if slot < args.activities % args.threads else 0
            )
            thread = threading.Thread(
                target=self._record_share,
                args=(recorder, plan, slot, count),
                name=f"per-buffer-demo-{slot}",
                daemon=True,
            )
            threads.append(thread)
            thread.start()
        return threads

    def _record_share(self, recorder: Recorder, plan: _DemoPlan, slot: int, count: int) -> None:
        """One recording thread: ``count`` skewed activities spread over the duration."""
        try:
            rng = random.Random(self.seed * 1000 + slot)
            picks = rng.choices(range(len(plan.users)), cum_weights=plan.cum_weights, k=count)
            seen = self.seen[slot]
            rate = count / self.duration if self.duration > 0 else math.inf
            login, export = _DEMO_TYPES
            start = time.monotonic()
            for i, user in enumerate(picks):
                if i % 50 == 0:
                    if self.stop.is_set():
                        return
                    delay = start + i / rate - time.monotonic()
                    if delay > 0 and self.stop.wait(delay):
                        return
                type_id = export if rng.random() < _DEMO_EXPORT_SHARE else login
                billing_id = plan.billing_of[user]
                user_id = plan.users[user]
                recorder.record(billing_id, user_id, type_id)
                seen.add((type_id, billing_id, user_id))
                self.recorded[slot] = i + 1
        except Exception as exc:  # reported in the verdict, never as a traceback
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _record_phase(
        self, server: Any, recorder: Recorder, threads: list[threading.Thread], started: float
    ) -> None:
        outage_done = self.outage <= 0
        while True:
            elapsed = time.monotonic() - started
            recording = any(t.is_alive() for t in threads)
            if not outage_done and not self.server_down and elapsed >= self.outage_at:
                server.outage()
                self.server_down = True
                self.progress.note(
                    f"{time.monotonic() - self.started:5.1f} s Per is DOWN "
                    f"(scripted outage of {self.outage:g} s)"
                )
            if self.server_down and (elapsed >= self.outage_at + self.outage or not recording):
                server.recover()
                self.server_down, outage_done = False, True
                self.progress.note(f"{time.monotonic() - self.started:5.1f} s Per is back")
            if not recording and (outage_done or elapsed >= self.outage_at):
                return
            head = f"recording {sum(self.recorded) / max(1, self.args.activities):3.0%}"
            self._tick(server, recorder, head)
            time.sleep(_TTY_INTERVAL / 4 if self.server_down else _TTY_INTERVAL / 2)

    def _flush_phase(self, server: Any, recorder: Recorder) -> bool:
        budget = max(5.0, _DEMO_BUDGET - (time.monotonic() - self.started))
        result: dict[str, bool] = {}

        def run_flush() -> None:
            result["done"] = recorder.flush(budget)

        flusher = threading.Thread(target=run_flush, name="per-buffer-demo-flush", daemon=True)
        flusher.start()
        while flusher.is_alive():
            self._tick(server, recorder, "flushing")
            flusher.join(_TTY_INTERVAL / 2)
        self._tick(server, recorder, "flushed", force=True)
        return result.get("done", False)

    def _tick(self, server: Any, recorder: Recorder, head: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.server_down and now >= self.next_latency:
            self.next_latency = now + 1.0
            with contextlib.suppress(Exception):  # realistic, varying latency
                server.set_latency(self.rng.uniform(*_DEMO_LATENCY))
        stats = recorder.stats()
        state = self.state.update(stats, now)
        self.progress.update(
            f"{now - self.started:5.1f} s {head} | Per {'DOWN' if self.server_down else 'up'} | "
            f"{state} | recorded {stats.recorded:,}, coalesced {stats.coalesced:,}, "
            f"delivered {stats.delivered:,}, pending {stats.pending:,}, "
            f"in flight {stats.in_flight:,}, retried {stats.retried:,}",
            force=force,
        )


def _demo_fetch_report(base_url: str, token: str, start: datetime) -> dict[Key, int]:
    """Per's report over HTTP with the reporting token; retries the server's random 503s."""
    with PerClient.for_reporting(token, base_url=base_url) as client:
        attempt = 0
        while True:
            attempt += 1
            try:
                report = client.get_report(start=start)
            except PerError as exc:
                if not exc.retryable or attempt >= 10:
                    raise
                time.sleep(0.05 * attempt)
                continue
            return {(r.activity_type_id, r.billing_id): r.unique for r in report}


def _safe_server_stats(server: Any) -> Mapping[str, Any]:
    try:
        stats = server.stats()
    except Exception:
        return {}
    return stats if isinstance(stats, Mapping) else {}


def cmd_demo(args: argparse.Namespace) -> int:
    """``per-buffer demo``: many activities against a local Per with an outage; check the report."""
    with _sigterm_as_interrupt():
        result = _Demo(args).run()
    return _demo_verdict(args, result)


def _demo_verdict(args: argparse.Namespace, result: _DemoResult) -> int:
    expected, reported, final = result.expected, result.reported, result.final
    keys = sorted(
        set(expected) | set(reported),
        key=lambda k: (-expected.get(k, 0), -reported.get(k, 0), k),
    )
    mismatches = [k for k in keys if expected.get(k, 0) != reported.get(k, 0)]
    dropped = sum(final.dropped.values())
    requests = final.delivered + final.retried + final.dead_lettered
    reduction = final.recorded / requests if requests else 0.0
    type_ids = sorted({k[0] for k in keys})
    totals = {
        t: {
            "expected": sum(v for k, v in expected.items() if k[0] == t),
            "reported": sum(v for k, v in reported.items() if k[0] == t),
        }
        for t in type_ids
    }
    users = sum(expected.values())
    outage = args.seconds_outage
    match = not mismatches and not result.errors and bool(expected)
    if match:
        verdict = (
            f"MATCH: Per's report equals the unique users counted locally in all {len(keys):,} "
            f"(activity type, billing ID) rows ({users:,} in total)"
            + (f", despite a {outage:g} s outage and random HTTP 503s" if outage else "")
        )
    elif result.errors:
        verdict = f"MISMATCH: recording failed: {_one_line(result.errors[0])}"
    elif not expected:
        verdict = "MISMATCH: nothing was recorded"
    else:
        k = mismatches[0]
        verdict = (
            f"MISMATCH: {len(mismatches):,} of {len(keys):,} rows differ, e.g. {k[0]}/{k[1]}: "
            f"{expected.get(k, 0):,} users counted locally, Per reported {reported.get(k, 0):,}"
            + (
                ""
                if result.flushed
                else f"; delivery did not finish ({final.pending + final.in_flight:,} left)"
            )
        )
    stats = {
        "recorded": final.recorded,
        "coalesced": final.coalesced,
        "enqueued": final.enqueued,
        "requests_sent": requests,
        "reduction_factor": round(reduction, 2),
        "retried": final.retried,
        "delivered": final.delivered,
        "dead_lettered": final.dead_lettered,
        "dropped": dropped,
        "left_undelivered": final.pending + final.in_flight,
        "late_deliveries": final.late_deliveries,
        "time_s": round(result.timings["total_s"], 2),
    }
    code = EXIT_OK if match else EXIT_FAILURE
    if args.json:
        _print_json(
            {
                "verdict": "MATCH" if match else "MISMATCH",
                "match": match,
                "message": verdict,
                "settings": {
                    "activities": args.activities,
                    "threads": args.threads,
                    "users": args.users,
                    "billing_ids": args.billing_ids,
                    "seconds_outage": outage,
                    "concurrency": args.concurrency,
                    "coalesce_window": args.coalesce_window,
                    "seed": result.seed,
                },
                "report_start": format_timestamp(result.report_start),
                "rows": [
                    {
                        "activity_type_id": k[0],
                        "billing_id": k[1],
                        "expected": expected.get(k, 0),
                        "reported": reported.get(k, 0),
                    }
                    for k in keys
                ],
                "totals": totals,
                "mismatches": len(mismatches),
                "stats": stats,
                "server": result.server,
                "timings": {k: round(v, 3) for k, v in result.timings.items()},
            }
        )
        return code
    top = keys[: args.top]
    shown = sorted(set(top) | set(mismatches[: args.top]), key=keys.index)
    _out(
        f"Unique users per (activity type, billing ID): top {len(top)} of {len(keys):,} rows"
        + (f", plus mismatching ones ({len(mismatches):,} in all)" if mismatches else "")
    )
    for line in _table(
        ("ACTIVITY TYPE", "BILLING ID", "COUNTED LOCALLY", "PER REPORT", ""),
        [
            (
                k[0],
                k[1],
                _count(expected.get(k, 0)),
                _count(reported.get(k, 0)),
                "ok" if expected.get(k, 0) == reported.get(k, 0) else "DIFFERS",
            )
            for k in shown
        ],
        "llrrl",
    ):
        _out(line)
    _out()
    _out("Totals per activity type:")
    rows: list[tuple[str, str, str]] = [
        (t, _count(totals[t]["expected"]), _count(totals[t]["reported"])) for t in type_ids
    ]
    rows.append(
        (
            "(all)",
            _count(sum(v["expected"] for v in totals.values())),
            _count(sum(v["reported"] for v in totals.values())),
        )
    )
    for line in _table(("ACTIVITY TYPE", "COUNTED LOCALLY", "PER REPORT"), rows, "lrr"):
        _out(line)
    _out()
    _out("Recorder:")
    timings = result.timings
    counters = result.server.get("counters")
    server_line: list[tuple[str, str]] = []
    if isinstance(counters, Mapping) and isinstance(counters.get("requests"), int):
        accepted = int(counters.get("ok", 0))
        server_line.append(
            (
                "Per server saw",
                f"{counters['requests']:,} requests: {accepted:,} accepted "
                f"({max(0, accepted - final.delivered):,} duplicates, harmless), "
                f"{int(counters.get('fault_503', 0)):,} answered HTTP 503",
            )
        )
    for line in _key_values(
        [
            ("recorded", _count(final.recorded)),
            ("coalesced", f"{final.coalesced:,} (repeats in the window, never sent)"),
            (
                "requests sent",
                f"{requests:,} (delivered {final.delivered:,} + retried {final.retried:,}"
                f" + dead-lettered {final.dead_lettered:,})",
            ),
            ("reduction factor", f"{reduction:.1f}x (record() calls per request)"),
            ("retried", _count(final.retried)),
            ("delivered", _count(final.delivered)),
            ("dropped", _count(dropped)),
            (
                "time",
                f"{timings['total_s']:.1f} s (recording {timings['record_s']:.1f} s, "
                f"final flush {timings['flush_s']:.1f} s, report {timings['report_s']:.2f} s)",
            ),
            *server_line,
        ]
    ):
        _out(f"  {line}")
    _out()
    _out(verdict)
    return code
