"""``per-buffer demo``: record through an outage of a local Per, then check its report.

It starts a local Per server in its own process
(:class:`~per_buffer.testing.PerServerProcess`, imported only when the command runs),
records skewed activity from several threads through a :class:`~per_buffer.Recorder`
in a temporary directory, takes Per down for a while, flushes, and compares Per's
report with the unique users counted locally (:mod:`._demo_verdict`: MATCH / MISMATCH).
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
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..client import PerClient
from ..errors import PerError
from ..recorder import Recorder
from ._common import (
    EXIT_SIGNAL_LINES,
    EXIT_USAGE_LINE,
    PROG,
    CLIError,
    add_command,
    interruptible,
    number,
    positive_int,
)
from ._demo_verdict import DemoResult, Key, verdict
from ._progress import TTY_INTERVAL, DeliveryState, Progress

if TYPE_CHECKING:
    from ..testing import PerServerProcess

_DEMO_TYPES = ("login", "export")
_DEMO_EXPORT_SHARE = 0.15
_DEMO_LATENCY = (0.005, 0.020)  # seconds, drawn anew about once a second
_DEMO_ERROR_RATE = 0.02
_DEMO_BUDGET = 55.0  # seconds the whole demo may take before it stops waiting for delivery
_DEMO_RATE = 20_000.0  # activities per second when --duration is not given

EPILOG = f"""\
examples:
  {PROG} demo                                   # 200,000 activities, a 3 s outage
  {PROG} demo --activities 3000 --seconds-outage 0.5
  {PROG} demo --json > demo.json                # progress on stderr, JSON on stdout

Starts a local Per server in its own process (5-20 ms latency, 2% HTTP 503),
records skewed activity from several threads through a Recorder in a temporary
directory, takes Per down for a while, flushes, and compares Per's report with
the unique users counted locally.
"""

EXIT_CODES = f"""\
  0  MATCH: Per's report equals the users counted locally
  1  MISMATCH, or the local server did not start
{EXIT_USAGE_LINE}
{EXIT_SIGNAL_LINES}
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer demo`` and its options."""
    parser = add_command(
        commands,
        "demo",
        "record through an outage of a local Per, then check its report",
        cmd_demo,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    count = positive_int
    seconds = number(0.0, 86400.0, "seconds")
    for flag, kind, default, help_text in (
        ("--activities", count, 200_000, "activities to record (default 200000)"),
        ("--threads", count, 8, "recording threads (default 8)"),
        ("--users", count, 5000, "distinct users (default 5000)"),
        ("--billing-ids", count, 40, "billing IDs the users belong to (default 40)"),
        (
            "--seconds-outage",
            number(0.0, 20.0, "seconds"),
            3.0,
            "how long Per is down during recording (0: no outage; default 3)",
        ),
        (
            "--duration",
            number(0.0, 40.0, "seconds"),
            None,
            "spread recording over S seconds (default: activities/20000, at least 2*outage+1)",
        ),
        ("--concurrency", count, 32, "recorder requests in flight (default 32)"),
        ("--coalesce-window", seconds, 900.0, "recorder coalescing window (default 900)"),
        ("--top", count, 10, "table rows shown (default 10)"),
    ):
        metavar = "N" if kind is count else "S"
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=help_text)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")


def cmd_demo(args: argparse.Namespace) -> int:
    """``per-buffer demo``: many activities against a local Per with an outage; check the report."""
    with interruptible():
        result = _Demo(args).run()
    return verdict(args, result)


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
class _Resources:
    """What a run must clean up, whatever happens."""

    tmp: Path
    server: PerServerProcess | None = None
    recorder: Recorder | None = None
    threads: list[threading.Thread] = field(default_factory=list)


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
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ the run

    def run(self) -> DemoResult:
        """Everything, with the temporary directory and the server process always cleaned up."""
        res = _Resources(Path(tempfile.mkdtemp(prefix="per-buffer-demo-")))
        try:
            server = res.server = self._start_server()
            report_start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=5)
            recorder = res.recorder = self._recorder(server, res.tmp / "queue")
            self._announce()
            started = time.monotonic()
            res.threads = self._start_threads(recorder, self._plan())
            self._record_phase(server, recorder, res.threads, started)
            self.timings["record_s"] = time.monotonic() - started
            started = time.monotonic()
            flushed = self._flush_phase(server, recorder)
            self.timings["flush_s"] = time.monotonic() - started
            self.progress.done()
            final = recorder.stats()
            recorder.close(1.0)
            res.recorder = None
            started = time.monotonic()
            reported = _fetch_report(server.url, server.reporting_token, report_start)
            self.timings["report_s"] = time.monotonic() - started
            server_stats = _safe_server_stats(server)
        finally:
            self._clean_up(res)
        self.timings["total_s"] = time.monotonic() - self.started
        return DemoResult(
            seed=self.seed,
            report_start=report_start,
            expected=self._expected(),
            reported=reported,
            final=final,
            flushed=flushed,
            errors=self.errors,
            server=server_stats,
            timings=self.timings,
        )

    def _start_server(self) -> PerServerProcess:
        from ..testing import PerServerProcess  # noqa: PLC0415  (only the demo needs it)

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
        return server

    def _plan(self) -> _DemoPlan:
        return _DemoPlan.build(self.args.users, self.args.billing_ids, self.rng)

    def _announce(self) -> None:
        args = self.args
        outage = (
            f"; Per goes down for {self.outage:g} s at {self.outage_at:.1f} s"
            if self.outage
            else ""
        )
        self.progress.note(
            f"Recording {args.activities:,} activities from {args.threads} threads, "
            f"{args.users:,} users in {args.billing_ids} billing IDs, over "
            f"~{self.duration:.1f} s{outage} (seed {self.seed})"
        )

    def _expected(self) -> dict[Key, int]:
        expected: dict[Key, int] = {}
        for type_id, billing_id, _ in set().union(*self.seen):
            expected[(type_id, billing_id)] = expected.get((type_id, billing_id), 0) + 1
        return expected

    def _clean_up(self, res: _Resources) -> None:
        self.stop.set()
        for thread in res.threads:
            thread.join(1.0)
        if res.recorder is not None:
            with contextlib.suppress(Exception):
                res.recorder.close(0.2)
        if res.server is not None:
            with contextlib.suppress(Exception):
                res.server.stop()
        shutil.rmtree(res.tmp, ignore_errors=True)
        self.progress.done()

    def _recorder(self, server: PerServerProcess, directory: Path) -> Recorder:
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

    # ------------------------------------------------------------------ recording

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
        self,
        server: PerServerProcess,
        recorder: Recorder,
        threads: list[threading.Thread],
        started: float,
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
            time.sleep(TTY_INTERVAL / 4 if self.server_down else TTY_INTERVAL / 2)

    def _flush_phase(self, server: PerServerProcess, recorder: Recorder) -> bool:
        budget = max(5.0, _DEMO_BUDGET - (time.monotonic() - self.started))
        result: dict[str, bool] = {}

        def run_flush() -> None:
            result["done"] = recorder.flush(budget)

        flusher = threading.Thread(target=run_flush, name="per-buffer-demo-flush", daemon=True)
        flusher.start()
        while flusher.is_alive():
            self._tick(server, recorder, "flushing")
            flusher.join(TTY_INTERVAL / 2)
        self._tick(server, recorder, "flushed", force=True)
        return result.get("done", False)

    def _tick(
        self, server: PerServerProcess, recorder: Recorder, head: str, *, force: bool = False
    ) -> None:
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


def _fetch_report(base_url: str, token: str, start: datetime) -> dict[Key, int]:
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


def _safe_server_stats(server: PerServerProcess) -> dict[str, Any]:
    try:
        stats = server.stats()
    except Exception:
        return {}
    return dict(stats) if isinstance(stats, dict) else {}
