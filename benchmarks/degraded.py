"""Scenario ``degraded``: delivery while Per, or what stands in front of it, partly fails.

The local Per server runs in its own process with a 5 ms latency. For every case, N
unique activities are put in a fresh queue directory (not timed, ``DurableQueue.put``),
the fault is set on the server, and a :class:`~per_buffer.Recorder` is built on the
directory (concurrency 16, ``coalesce_window=0``, so every activity is one request;
its worker starts because there is a backlog). Nobody calls ``flush()`` or ``drain()``
while the clock runs: both put the worker in flush mode, which skips the retry delays
of failed entries, and an application in production does not flush. Instead the
benchmark polls the directory's ``(pending, in_flight)`` counts through its own
``DurableQueue`` handle: the clock starts at the first poll that sees a claim (the
first request follows it within a millisecond) and stops at the first poll that finds
nothing pending or in flight (the last acknowledgement, within 10 ms).

Cases: a healthy server (the baseline, interleaved with the others); 10 %, 30 % and
50 % of requests answered 503 at random; a rate limit (token bucket) of 400 and of 40
requests/s answered 429 with ``Retry-After`` in delta seconds; a burst of HTML 403s
(a WAF) for the first 3 s of delivery, then healthy; a latency spike from 5 ms to 2 s
for the first 5 s of delivery, then 5 ms again.

Reported per case: goodput (activities acknowledged per second, first request to last
acknowledgement), the ideal (see :func:`ideal`), their ratio, the time to drain, the
time until 99 % were delivered, the share of requests answered 429 after the first
2 s (server counters), activities lost (expected - server unique - left on disk) and
dead-lettered.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from per_buffer import Recorder
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServerProcess

from ._common import (
    ACTIVITY_TYPE,
    ScenarioResult,
    Table,
    Target,
    fmt,
    loadavg,
    log,
    met_text,
    num,
    prefill,
    scratch_dir,
    spread,
    unique_pairs,
)
from ._procs import end_drainers

CONCURRENCY = 16
BASE_LATENCY = 0.005  # seconds, every case; the spike returns to it
TARGET_RATIO = 0.8
TARGET_429_SHARE = 0.2
TARGET_DRAIN_30 = 10.0  # seconds for 3,000 activities at 30 % 503s
SHARE_AFTER = 2.0  # seconds after the first request from which 429s are counted
SEED = 20261

PARAMS: dict[str, dict[str, Any]] = {
    # n: activities per case; n_slow: for the 40 requests/s limit; n_400: for 400/s;
    # burst: seconds of 403s; spike: (latency, seconds); rounds: repeats of every case;
    # healthy: healthy runs per round; cap: seconds a case may run; cases: None for all
    "smoke": {"n": 300, "n_slow": 80, "n_400": 600, "burst": 0.5, "spike": (0.3, 0.6),
              "rounds": 1, "healthy": 1, "cap": 20.0,
              "cases": ("503_30", "rate_400", "waf_403", "spike")},
    "quick": {"n": 3000, "n_slow": 400, "n_400": 3000, "burst": 3.0, "spike": (2.0, 5.0),
              "rounds": 1, "healthy": 3, "cap": 40.0, "cases": None},
    "full": {"n": 3000, "n_slow": 600, "n_400": 3000, "burst": 3.0, "spike": (2.0, 5.0),
             "rounds": 3, "healthy": 3, "cap": 60.0, "cases": None},
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One degraded condition: its name, fault and how its ideal is computed."""

    key: str
    label: str
    kind: str  # healthy, 503, rate, burst, spike
    value: float = 0.0  # the 503 share, or the rate limit


CASES: tuple[Case, ...] = (
    Case("503_10", "10 % 503s", "503", 0.10),
    Case("503_30", "30 % 503s", "503", 0.30),
    Case("503_50", "50 % 503s", "503", 0.50),
    Case("rate_400", "rate limit 400/s, Retry-After", "rate", 400.0),
    Case("rate_40", "rate limit 40/s, Retry-After", "rate", 40.0),
    Case("waf_403", "HTML 403 burst (WAF)", "burst"),
    Case("spike", "latency spike", "spike"),
)
HEALTHY = Case("healthy", "healthy (baseline)", "healthy")


def schedule(p: dict[str, Any]) -> list[Case]:
    """Every run in order: the cases of each round, healthy runs spread between them."""
    runs: list[Case] = []
    chosen = [c for c in CASES if p["cases"] is None or c.key in p["cases"]]
    for round_no in range(p["rounds"]):
        cases = chosen if round_no % 2 == 0 else chosen[::-1]
        slots = p["healthy"]
        # healthy at the start, then evenly between the cases (the last one at the end)
        marks = {round(i * len(cases) / max(1, slots - 1)) for i in range(slots)}
        for index in range(len(cases) + 1):
            if index in marks:
                runs.append(HEALTHY)
            if index < len(cases):
                runs.append(cases[index])
    return runs


def activities_for(case: Case, p: dict[str, Any]) -> int:
    """How many activities a run of ``case`` delivers."""
    if case.key == "rate_40":
        return int(p["n_slow"])
    if case.key == "rate_400":
        return int(p["n_400"])
    return int(p["n"])


def arm(server: PerServerProcess, case: Case, p: dict[str, Any]) -> None:
    """Set the case's fault on the server (just before delivery starts)."""
    if case.kind == "503":
        server.inject("503", rate=case.value)
    elif case.kind == "rate":
        server.set_rate_limit(case.value, retry_after="seconds")
    elif case.kind == "burst":
        server.inject("http", seconds=p["burst"], status=403, body="html")
    elif case.kind == "spike":
        latency, seconds = p["spike"]
        server.set_latency(latency, duration=seconds)


def disarm(server: PerServerProcess) -> None:
    """Back to a healthy 5 ms server with zeroed counters."""
    server.set_rate_limit(None)
    server.set_latency(BASE_LATENCY)
    server.reset()


def run_case(
    server: PerServerProcess, directory: Path, case: Case, p: dict[str, Any], tag: str
) -> dict[str, Any]:
    """One timed drain of a pre-filled directory under ``case``; its figures."""
    n = activities_for(case, p)
    disarm(server)
    prefill(directory, unique_pairs(n, tag))
    probe = DurableQueue(directory)
    load = loadavg()
    arm(server, case, p)
    armed = time.perf_counter()
    recorder = Recorder(
        server.activity_token,
        ACTIVITY_TYPE,
        directory=directory,
        base_url=server.url,
        concurrency=CONCURRENCY,
        coalesce_window=0,
    )
    counts: Callable[[], tuple[int, int]] = probe.counts
    first = math.nan
    end = math.nan
    t99 = math.nan
    at_share: dict[str, int] | None = None
    # (seconds, delivered, in-flight limit, learned rate, probing) every 0.25 s
    timeline: list[tuple[float, int, int | None, float | None, bool | None]] = []
    next_sample = 0.0
    deadline = armed + p["cap"]
    while True:
        now = time.perf_counter()
        pending, in_flight = counts()
        left = pending + in_flight
        if math.isnan(first):
            if (pending, in_flight) != (n, 0):
                first = now
            elif now >= deadline:
                break
            else:
                time.sleep(0.001)
                continue
        elapsed = now - first
        if elapsed >= next_sample:
            state = recorder.stats().flow  # published by the worker at most once a second
            timeline.append(
                (
                    round(elapsed, 3),
                    n - left,
                    None if state is None else state.limit,
                    None if state is None else state.rate,
                    None if state is None else state.probing,
                )
            )
            next_sample += 0.25
        if math.isnan(t99) and left <= n // 100:
            t99 = elapsed
        if left == 0:
            end = now
            break
        if at_share is None and elapsed >= SHARE_AFTER:
            at_share = server.stats()["counters"]
        if now >= deadline:
            break
        time.sleep(0.01)
    stopped = time.perf_counter()
    final_counters = server.stats()["counters"]
    stats = recorder.stats()
    mode = stats.delivery
    recorder.close(timeout=1.0)
    end_drainers(directory, grace=0.0 if math.isnan(end) else 1.0)  # before the directory goes
    disk = probe.stats()
    probe.close()
    unique = int(server.stats()["unique"])
    disarm(server)
    shutil.rmtree(directory, ignore_errors=True)

    drained = not math.isnan(end)
    seconds = (end if drained else stopped) - (first if not math.isnan(first) else armed)
    left_on_disk = disk.pending + disk.in_flight + disk.dead_lettered
    delivered = n - left_on_disk
    share = math.nan
    if at_share is not None:
        requests = final_counters.get("requests", 0) - at_share.get("requests", 0)
        limited = final_counters.get("rate_limited", 0) - at_share.get("rate_limited", 0)
        share = limited / requests if requests else 0.0
    flow = stats.flow
    return {
        "case": case.key,
        "mode": mode,
        "n": n,
        "drained": drained,
        "seconds": seconds,
        "goodput": (n if drained else delivered) / seconds if seconds > 0 else math.nan,
        "t99": t99,
        "start_lag": (first - armed) if not math.isnan(first) else math.nan,
        "share_429_after_2s": share,
        "server_requests": final_counters.get("requests", 0),
        "server_counters": {k: v for k, v in final_counters.items() if v},
        "unique": unique,
        "left_on_disk": left_on_disk,
        "dead_lettered": disk.dead_lettered,
        "lost": max(0, n - unique - left_on_disk),
        "attempts": stats.attempts,
        "retried": stats.retried,
        "failures": {k: v for k, v in stats.failures.items() if v},
        "flow": None
        if flow is None
        else {
            "limit": flow.limit,
            "rate": flow.rate,
            "success_ratio": flow.success_ratio,
            "probing": flow.probing,
            "throttle": flow.throttle,
        },
        "timeline": timeline,
        "load_average": load,
    }


def ideal(case: Case, healthy: float, p: dict[str, Any], n: int) -> float:
    """Goodput a perfect client with the same concurrency could reach in ``case``.

    ``healthy`` is the median healthy goodput of this run (same server, same machine).
    503s: ``healthy x (1 - share)``. Rate limit R with a bucket of B tokens that starts
    full: B at once, then R a second: ``n / max(n / healthy, (n - B) / R)``. 403 burst of B s:
    nothing during it, healthy after it: ``n / (B + n / healthy)``. Latency spike of S s
    at latency L: a clairvoyant client keeps 16 requests in flight for the
    ``floor(S / L)`` whole round trips that fit in the spike, then sends at the healthy
    rate from the moment it ends: ``n / (S + (n - 16 floor(S / L)) / healthy)``.
    """
    if case.kind == "healthy":
        return healthy
    if case.kind == "503":
        return healthy * (1.0 - case.value)
    if case.kind == "rate":
        seconds = max(n / healthy, (n - bucket_size(case.value)) / case.value)
        return n / seconds
    if case.kind == "burst":
        return n / (float(p["burst"]) + n / healthy)
    latency, spike = float(p["spike"][0]), float(p["spike"][1])
    during = CONCURRENCY * math.floor(spike / latency)
    return n / (spike + max(0, n - during) / healthy)


def bucket_size(rate: float) -> int:
    """The server's default bucket size for a limit of ``rate`` requests/s (it starts full)."""
    return max(1, math.ceil(rate))


def run(mode: str) -> ScenarioResult:
    """Drain a backlog under each degraded condition and compare with the ideal."""
    p = PARAMS[mode]
    result = ScenarioResult("degraded", mode)
    runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in (HEALTHY, *CASES)}
    load_before = loadavg()
    plan = schedule(p)
    with (
        scratch_dir("degraded") as tmp,
        PerServerProcess(latency=BASE_LATENCY, seed=SEED, keep_activities=False) as server,
    ):
        for serial, case in enumerate(plan, 1):
            one = run_case(server, tmp / f"q{serial}", case, p, f"d{serial}")
            runs[case.key].append(one)
            state = "" if one["drained"] else " (NOT drained)"
            log(
                f"degraded: {serial}/{len(plan)} {case.label}: {one['n']:,} in "
                f"{one['seconds']:.2f} s = {num(one['goodput'])}/s{state}, "
                f"load {one['load_average']:.2f}"
            )
    load_after = loadavg()

    healthy = spread([r["goodput"] for r in runs[HEALTHY.key]])
    burst = p["burst"]
    spike_latency, spike_seconds = p["spike"]
    n_main = int(p["n"])
    table = Table(
        f"degraded: delivery when Per partly fails (concurrency {CONCURRENCY}, "
        f"{BASE_LATENCY * 1000:g} ms server latency)",
        [
            "case",
            "activities",
            "goodput act/s",
            "ideal act/s",
            "goodput / ideal",
            "drain s",
            "99% delivered s",
            "429s after 2 s",
            "requests / activity",
            "lost",
            "dead-lettered",
            "target",
            "met?",
        ],
    )
    figures: dict[str, Any] = {}
    total_lost = 0
    total_dead = 0
    all_drained = True
    for case in (HEALTHY, *CASES):
        case_runs = runs[case.key]
        if not case_runs:
            continue
        n = int(case_runs[0]["n"])
        goodput = spread([r["goodput"] for r in case_runs])
        seconds = spread([r["seconds"] for r in case_runs])
        t99 = spread([r["t99"] for r in case_runs])
        shares = [r["share_429_after_2s"] for r in case_runs]
        share = spread(shares)
        per_activity = spread([r["server_requests"] / r["n"] for r in case_runs])
        lost = sum(int(r["lost"]) for r in case_runs)
        dead = sum(int(r["dead_lettered"]) for r in case_runs)
        drained = all(r["drained"] for r in case_runs)
        all_drained = all_drained and drained
        total_lost += lost
        total_dead += dead
        goal = met = ""
        best = ideal(case, healthy.median, p, n)
        ratio = goodput.median / best if best > 0 else math.nan
        if case.kind != "healthy":
            ok = ratio >= TARGET_RATIO and drained
            goals = [f">= {TARGET_RATIO:.0%} of ideal"]
            result.targets.append(
                Target(
                    f"degraded {case.label}: goodput >= {TARGET_RATIO:.0%} of ideal",
                    f">= {num(TARGET_RATIO * best)}/s",
                    f"{num(goodput.median)}/s ({ratio:.0%})",
                    ok,
                )
            )
            if case.key == "503_30":
                in_time = drained and seconds.median <= TARGET_DRAIN_30
                goals.append(f"drain <= {TARGET_DRAIN_30:g} s")
                ok = ok and in_time
                result.targets.append(
                    Target(
                        f"degraded 30 % 503s: {n:,} activities drained",
                        f"<= {TARGET_DRAIN_30:g} s" + ("" if n == 3000 else " (for 3,000)"),
                        f"{seconds.median:.2f} s" + ("" if drained else " (not drained)"),
                        in_time,
                    )
                )
            if case.kind == "rate":
                fast = goodput.median >= TARGET_RATIO * case.value
                few = share.runs > 0 and share.median <= TARGET_429_SHARE
                goals.append(f">= {num(TARGET_RATIO * case.value)}/s")
                goals.append(f"429s <= {TARGET_429_SHARE:.0%}")
                ok = ok and fast and (few or share.runs == 0)
                result.targets.append(
                    Target(
                        f"degraded {case.label}: goodput >= {TARGET_RATIO:g} x the limit",
                        f">= {num(TARGET_RATIO * case.value)}/s",
                        f"{num(goodput.median)}/s",
                        fast,
                    )
                )
                result.targets.append(
                    Target(
                        f"degraded {case.label}: share of 429s after the first 2 s",
                        f"<= {TARGET_429_SHARE:.0%}",
                        "-" if share.runs == 0 else f"{share.median:.1%}",
                        None if share.runs == 0 else few,
                    )
                )
            goal = ", ".join(goals)
            met = met_text(ok)
        drain_text = fmt(seconds) + ("" if drained else " (NOT drained)")
        table.add(
            case.label,
            f"{n:,}",
            fmt(goodput),
            num(best),
            "-" if case.kind == "healthy" else f"{ratio:.0%}",
            drain_text,
            fmt(t99),
            "-" if share.runs == 0 else fmt(spread([v * 100.0 for v in shares])) + " %",
            fmt(per_activity),
            str(lost),
            str(dead),
            goal,
            met,
        )
        figures[case.key] = {
            "n": n,
            "goodput": goodput.as_dict(),
            "ideal": best,
            "ratio": ratio,
            "seconds": seconds.as_dict(),
            "t99": t99.as_dict(),
            "share_429_after_2s": share.as_dict(),
            "requests_per_activity": per_activity.as_dict(),
            "lost": lost,
            "dead_lettered": dead,
            "drained": drained,
            "runs": case_runs,
        }
    rounds = p["rounds"]
    healthy_runs = len(runs[HEALTHY.key])
    table.notes += [
        (f"Medians of {rounds} runs per case, [min-max]" if rounds > 1 else "One run per case")
        + f"; the healthy baseline ran {healthy_runs} times, interleaved with the cases, "
        "and its median is the healthy goodput used by the ideals.",
        "Each run: a fresh queue directory pre-filled with unique activities (not timed), "
        f"the fault set on the server (its own process), then a Recorder (concurrency "
        f"{CONCURRENCY}, coalesce_window=0: one request per activity) delivering in the "
        "background in the default delivery mode (a drainer process, niced +10; its start is "
        "excluded since the clock starts at its first claim). No flush() or drain() while "
        "timing (both skip retry delays); the directory's counts are polled every 10 ms. "
        "Goodput = activities / (last "
        "acknowledgement - first request).",
        "Ideal: 503s: healthy goodput x success ratio. Rate limit R: the server's bucket "
        "starts full (R tokens), so a perfect client gets R requests through at once and R "
        "a second after that: ideal = N / max(N / healthy, (N - R) / R), a little above R. "
        f"403 burst: a perfect client gets nothing through during the {burst:g} s burst "
        f"and the healthy goodput after it, so ideal = N / ({burst:g} s + N / healthy). "
        f"Latency spike ({BASE_LATENCY * 1000:g} ms -> {spike_latency:g} s for "
        f"{spike_seconds:g} s from the start of delivery): a clairvoyant client keeps "
        f"{CONCURRENCY} requests in flight for the floor({spike_seconds:g} / "
        f"{spike_latency:g}) round trips that fit in the spike, then sends at the healthy "
        f"rate from the moment it ends: ideal = N / ({spike_seconds:g} s + (N - "
        f"{CONCURRENCY * math.floor(spike_seconds / spike_latency)}) / healthy). A client "
        f"that cannot see the spike's end has its {CONCURRENCY} slots busy until "
        f"ceil({spike_seconds:g} / {spike_latency:g}) x {spike_latency:g} = "
        f"{math.ceil(spike_seconds / spike_latency) * spike_latency:g} s, so it cannot "
        f"reach this ideal.",
        f"Rate limits: the server's token bucket holds R tokens and answers 429 with "
        f"Retry-After in whole seconds; 429s after 2 s = the share of requests answered 429 "
        f"from {SHARE_AFTER:g} s after the first request to the end (server counters). "
        f"The 40/s case delivers {int(p['n_slow']):,} activities"
        + (f", the 400/s case {int(p['n_400']):,}" if int(p["n_400"]) != n_main else "")
        + f", the others {n_main:,}.",
        "99% delivered: seconds from the first request until 99 % of the activities were "
        "acknowledged; the rest of the drain time is spent on the few activities that "
        "failed several times in a row and wait for their retry delays. "
        "requests / activity: requests the server received per activity (1.00 = no retry). "
        "Lost = activities put - server unique count - entries left on disk (pending, in "
        "flight or dead-lettered); dead-lettered is counted separately and must be 0.",
        f"Load average (1 min): {load_before:.2f} at start, {load_after:.2f} at end.",
    ]
    diag = Table(
        "degraded: what the worker saw (last run of each case)",
        [
            "case",
            "requests (server)",
            "failed attempts by class (recorder)",
            "retried",
            "flow as last published (limit, learned rate, success ratio 1 min, throttle)",
            "server answers",
            "load avg",
        ],
    )
    for case in (HEALTHY, *CASES):
        if not runs[case.key]:
            continue
        last = runs[case.key][-1]
        flow = last["flow"]
        flow_text = "-"
        if flow is not None:
            rate = "none" if flow["rate"] is None else f"{flow['rate']:.1f}/s"
            ratio_text = "-" if flow["success_ratio"] is None else f"{flow['success_ratio']:.2f}"
            flow_text = f"{flow['limit']}, {rate}, {ratio_text}, {flow['throttle']:.2f}" + (
                ", probing" if flow["probing"] else ""
            )
        failures = ", ".join(f"{k} {v:,}" for k, v in last["failures"].items()) or "none"
        answers = ", ".join(
            f"{k} {v:,}" for k, v in last["server_counters"].items() if k != "requests"
        )
        diag.add(
            case.label,
            f"{last['server_requests']:,}",
            failures,
            f"{last['retried']:,}",
            flow_text,
            answers or "-",
            f"{last['load_average']:.2f}",
        )
    diag.notes.append(
        "Failed attempts, retried and flow: the recorder's stats() right after the drain, "
        "as the worker last published them (at most once a second, so up to 1 s old; the "
        "JSON output has the flow state every 0.25 s of each run, in timeline). Requests "
        "and answers: the server's counters."
    )
    result.tables += [table, diag]
    result.targets.append(
        Target("degraded: activities lost, all cases", "0", str(total_lost), total_lost == 0)
    )
    result.targets.append(
        Target(
            "degraded: activities dead-lettered, all cases", "0", str(total_dead), total_dead == 0
        )
    )
    result.lost = total_lost
    result.figures.update(
        {
            "concurrency": CONCURRENCY,
            "base_latency_s": BASE_LATENCY,
            "healthy_goodput": healthy.as_dict(),
            "cases": figures,
            "all_drained": all_drained,
            "load_average": {"before": load_before, "after": load_after},
        }
    )
    result.checks = {"lost": total_lost, "dead_lettered": total_dead, "all_drained": all_drained}
    return result
