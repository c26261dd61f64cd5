"""Scenario ``outage``: Per goes away under steady recording, then comes back.

A thread records new (never seen) users at a steady rate. After a calm period the
server's API port goes dark (``outage()``: connection refused) for 30 s (quick: 5 s),
then comes back (``recover()``). Recording stops at the recovery and the clock runs
until ``flush()`` returns. Reported: ``record()`` latency before and during the
outage, the backlog at recovery, how long the worker takes to notice the recovery
and to drain the backlog, and how many activities were lost (must be 0: the set of
users recorded against the server's unique count).

Delivery mode: the default (``delivery="process"``): the directory's drainer process
notices the outage and the recovery; the recording process only records and commits.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from per_buffer import Recorder
from per_buffer.testing import PerServerProcess

from ._common import (
    ACTIVITY_TYPE,
    ScenarioResult,
    Table,
    Target,
    latency_summary,
    loadavg,
    log,
    met_text,
    num,
    scratch_dir,
)
from ._procs import end_drainers

PARAMS: dict[str, dict[str, float]] = {
    "smoke": {"rate": 1000.0, "before": 1.0, "outage": 1.5, "drain_max": 4.0},
    "quick": {"rate": 2000.0, "before": 1.5, "outage": 5.0, "drain_max": 10.0},
    "full": {"rate": 2000.0, "before": 5.0, "outage": 30.0, "drain_max": 75.0},
}

PHASES = ("before", "outage")


class SteadyCaller(threading.Thread):
    """Calls ``record()`` with a new user ``rate`` times a second, timing every call."""

    def __init__(self, recorder: Recorder, rate: float) -> None:
        super().__init__(name="bench-steady-caller", daemon=True)
        self.recorder = recorder
        self.rate = rate
        self.phase = "before"
        self.samples: dict[str, list[int]] = {phase: [] for phase in PHASES}
        self.calls = 0
        self.stop_event = threading.Event()
        self.wall: dict[str, float] = {}

    def run(self) -> None:
        record = self.recorder.record
        clock_ns = time.perf_counter_ns
        interval = 1.0 / self.rate
        due = time.perf_counter()
        phase_started = due
        phase = self.phase
        count_in_phase = 0
        while not self.stop_event.is_set():
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            if self.phase != phase:
                self.wall[phase] = count_in_phase / (time.perf_counter() - phase_started)
                phase, phase_started, count_in_phase = self.phase, time.perf_counter(), 0
            user = f"outage-user-{self.calls}"
            start = clock_ns()
            record(f"org-{self.calls % 97}", user)
            self.samples[phase].append(clock_ns() - start)
            self.calls += 1
            count_in_phase += 1
            due += interval
        self.wall[phase] = count_in_phase / max(1e-9, time.perf_counter() - phase_started)


def run(mode: str) -> ScenarioResult:
    """Record through an outage and count what arrives."""
    p = PARAMS[mode]
    result = ScenarioResult("outage", mode)
    load_before = loadavg()
    timeline: list[tuple[float, int, int]] = []  # (seconds since recovery, backlog, delivered)
    with scratch_dir("outage") as tmp, PerServerProcess(keep_activities=False) as server:
        recorder = Recorder(
            server.activity_token, ACTIVITY_TYPE, directory=tmp / "q", base_url=server.url
        )
        recorder.record("org-warm", "warm-up-user")  # threads and connections up
        recorder.flush(timeout=10.0)
        caller = SteadyCaller(recorder, p["rate"])
        log(f"outage: recording {p['rate']:,.0f}/s; outage of {p['outage']:g} s follows")
        caller.start()
        time.sleep(p["before"])
        server.outage()
        caller.phase = "outage"
        outage_started = time.perf_counter()
        peak_backlog = 0
        while time.perf_counter() - outage_started < p["outage"]:
            time.sleep(0.25)
            stats = recorder.stats()
            peak_backlog = max(peak_backlog, stats.pending + stats.in_flight)
        caller.stop_event.set()
        caller.join()
        server.recover()
        recovered = time.perf_counter()
        at_recovery = recorder.stats()
        backlog = at_recovery.pending + at_recovery.in_flight
        log(f"outage: recovered with {backlog:,} pending; draining")
        # No flush() while timing: flush() cuts the worker's probe delay short; an
        # application just keeps running.
        drained = False
        while time.perf_counter() - recovered < p["drain_max"]:
            time.sleep(0.1)
            now = recorder.stats()
            left = now.pending + now.in_flight
            timeline.append((time.perf_counter() - recovered, left, now.delivered))
            if left == 0:
                drained = True
                break
        drain_seconds = time.perf_counter() - recovered
        flush_started = time.perf_counter()
        flushed = recorder.flush(timeout=30.0)  # whatever is left (nothing, if drained)
        flush_seconds = time.perf_counter() - flush_started
        final = recorder.stats()
        mode = final.delivery
        recorder.close(timeout=1.0)
        end_drainers(tmp)
        unique = int(server.stats()["unique"])
        counters = server.stats()["counters"]

    recorded_unique = caller.calls + 1  # every call a new user, plus the warm-up
    lost = max(0, recorded_unique - unique)
    first_delivery = next(
        (t for t, _, delivered in timeline if delivered > at_recovery.delivered), float("nan")
    )
    bulk = next((t for t, left, _ in timeline if left <= backlog // 100), float("nan"))
    before = latency_summary(caller.samples["before"])
    during = latency_summary(caller.samples["outage"])

    lat = Table(
        "outage: record() latency before and during the outage (single run)",
        ["phase", "calls", "achieved calls/s", "p50 us", "p99 us", "p99.9 us", "max us"],
    )
    for phase, summary in (("before", before), ("outage", during)):
        lat.add(
            phase,
            f"{summary['n']:,.0f}",
            num(caller.wall.get(phase, float("nan"))),
            num(summary["p50"]),
            num(summary["p99"]),
            num(summary["p999"]),
            num(summary["max"]),
        )
    lat.notes.append(
        f"A thread records a new user {p['rate']:,.0f} times a second (new keys, default "
        f"batched mode, concurrency 8, default delivery mode: {mode}, i.e. a drainer "
        f"process delivers); outage = the server's API port refuses connections "
        f"for {p['outage']:g} s. p99 during / before: {during['p99'] / before['p99']:.2f}x."
    )

    table = Table(
        f"outage: recovery after a {p['outage']:g} s outage (single run)",
        ["metric", "value", "target", "met?"],
    )
    table.add("backlog at recovery (pending + in flight)", f"{backlog:,}", "", "")
    never = f"> {p['drain_max']:g} s (none while watched)"
    table.add(
        "time to the first delivery after recovery",
        never if math.isnan(first_delivery) else f"{first_delivery:.2f} s",
        "",
        "",
    )
    table.add(
        "time until 99% of the backlog was delivered",
        never if math.isnan(bulk) else f"{bulk:.2f} s",
        "",
        "",
    )
    state = "" if drained else f" (NOT drained within {p['drain_max']:g} s)"
    table.add(
        "time to drain the backlog completely (nothing pending or in flight)",
        f"{drain_seconds:.2f} s{state}",
        "",
        "",
    )
    if not drained:
        table.add(
            "then flush() (cuts the probe delay short) delivered the rest in",
            f"{flush_seconds:.2f} s" + ("" if flushed else " (flush timed out)"),
            "",
            "",
        )
    if drained and drain_seconds > 0:
        table.add(
            "effective drain rate (backlog / complete drain time)",
            f"{num(backlog / drain_seconds)}/s",
            "",
            "",
        )
    table.add("activities recorded (all distinct users)", f"{recorded_unique:,}", "", "")
    table.add("server unique count", f"{unique:,}", "", "")
    table.add("activities lost", str(lost), "0", met_text(lost == 0))
    table.add(
        "dropped by the recorder", str(dict(final.dropped) or 0), "0", met_text(not final.dropped)
    )
    table.notes.append(
        f"Server counters: {counters.get('requests', 0):,} requests, {counters.get('ok', 0):,} "
        f"accepted; the drainer retried {final.retried:,} attempts. During an outage the worker "
        "probes one request at a time with a jittered, growing delay (capped at 5 s), so the "
        "first delivery after recovery waits for the next probe; failed entries wait for their "
        "own backoff. Drain times are measured by polling stats() every 0.1 s, without "
        "calling flush() (which would cut those delays short)."
    )
    result.tables += [lat, table]
    result.targets.append(
        Target(f"activities lost through a {p['outage']:g} s outage", "0", str(lost), lost == 0)
    )
    result.lost = lost + sum(final.dropped.values())
    figures: dict[str, Any] = {
        "rate": p["rate"],
        "outage_seconds": p["outage"],
        "before": before,
        "during": during,
        "p99_ratio": during["p99"] / before["p99"],
        "backlog_at_recovery": backlog,
        "peak_backlog": peak_backlog,
        "first_delivery_after_recovery_s": first_delivery,
        "drain_seconds": drain_seconds,
        "drained": drained,
        "flushed_after": flushed,
        "flush_seconds_after": flush_seconds,
        "bulk_drain_seconds": bulk,
        "recorded_unique": recorded_unique,
        "server_unique": unique,
        "lost": lost,
        "dropped": dict(final.dropped),
        "delivery_mode": mode,
        "timeline": timeline[::5],
        "load_average": {"before": load_before, "after": loadavg()},
    }
    result.figures.update(figures)
    result.checks = {"recorded_unique": recorded_unique, "server_unique": unique}
    return result
