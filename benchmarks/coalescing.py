"""Scenario ``coalescing``: a day-shaped hour of traffic, and what reaches Per.

One simulated hour (a controlled clock passed as ``clock=``, aligned to UTC hours
so it holds exactly four 15-minute coalescing windows): 1,000,000 ``record()``
calls (quick: 200,000) from 20,000 users in 200 billing IDs, users drawn from a
Zipf law (a few very active users, a long tail), times spread evenly over the
hour. The recorder delivers to the local server as it goes, then flushes.

Delivery mode: thread. A recorder with an injected ``clock=`` always delivers from a
thread of its own process (a drainer process cannot share the test's clock).

Reported: the requests actually sent, the reduction factor, and the server's
report compared, billing ID by billing ID, with the ground truth computed locally
from every call (uncoalesced). The server stamps activities with its own (real)
clock, so the report covers the whole run; per-window counts are checked on the
client side: requests sent must equal the distinct (billing, user) pairs of each
window, summed.
"""

from __future__ import annotations

import itertools
import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from per_buffer import Recorder
from per_buffer.testing import PerServerProcess

from ._common import (
    ACTIVITY_TYPE,
    ScenarioResult,
    Table,
    Target,
    loadavg,
    log,
    met_text,
    scratch_dir,
)
from ._procs import end_drainers

PARAMS: dict[str, dict[str, int]] = {
    "smoke": {"calls": 20_000, "users": 500, "billing_ids": 20},
    "quick": {"calls": 200_000, "users": 2_000, "billing_ids": 50},
    "full": {"calls": 1_000_000, "users": 20_000, "billing_ids": 200},
}

HOUR = 3600.0
WINDOW = 900.0
ZIPF_S = 1.0


class SimClock:
    """A clock the benchmark moves by hand (``clock=`` of the recorder)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def workload(p: dict[str, int], seed: int = 7) -> tuple[list[int], list[str], list[str]]:
    """Zipf-drawn user indices per call, and each user's ID and billing ID."""
    rng = random.Random(seed)
    users, billing_ids = p["users"], p["billing_ids"]
    ranks = list(range(users))
    rng.shuffle(ranks)  # popularity independent of the billing ID
    weights = [1.0 / ((ranks[u] + 1) ** ZIPF_S) for u in range(users)]
    picks = rng.choices(range(users), cum_weights=list(itertools.accumulate(weights)), k=p["calls"])
    user_ids = [f"user-{u}" for u in range(users)]
    billing = [f"org-{rng.randrange(billing_ids)}" for _ in range(users)]
    return picks, user_ids, billing


def run(mode: str) -> ScenarioResult:
    """Record a simulated hour and compare what Per reports with the ground truth."""
    p = PARAMS[mode]
    result = ScenarioResult("coalescing", mode)
    load_before = loadavg()
    picks, user_ids, billing = workload(p)
    calls = len(picks)
    hour_start = (time.time() // HOUR) * HOUR - 24 * HOUR  # a past, aligned hour
    step = HOUR / calls

    # ground truth, from every call
    per_window: dict[int, set[int]] = {}
    for i, user in enumerate(picks):
        per_window.setdefault(int((hour_start + i * step) // WINDOW), set()).add(user)
    minimal_requests = sum(len(users) for users in per_window.values())
    truth: dict[str, int] = {}
    for user in set(picks):
        truth[billing[user]] = truth.get(billing[user], 0) + 1

    clock = SimClock(hour_start)
    with scratch_dir("coalescing") as tmp, PerServerProcess(keep_activities=False) as server:
        real_start = datetime.now(timezone.utc) - timedelta(seconds=2)
        recorder = Recorder(
            server.activity_token,
            ACTIVITY_TYPE,
            directory=tmp / "q",
            base_url=server.url,
            clock=clock,
        )
        log(f"coalescing: {calls:,} calls from {p['users']:,} users in one simulated hour")
        record = recorder.record
        started = time.perf_counter()
        for i, user in enumerate(picks):
            clock.now = hour_start + i * step
            record(billing[user], user_ids[user])
        record_seconds = time.perf_counter() - started
        flushed = recorder.flush(timeout=300.0)
        total_seconds = time.perf_counter() - started
        stats = recorder.stats()
        recorder.close(timeout=1.0)
        end_drainers(tmp)  # none expected (thread mode); never leave one behind
        server_stats = server.stats()
        real_end = datetime.now(timezone.utc) + timedelta(seconds=2)
        report = server.report(
            real_start.strftime("%Y-%m-%dT%H:%M:%SZ"), real_end.strftime("%Y-%m-%dT%H:%M:%SZ")
        )

    rows = report.get("activityTypes", {}).get(ACTIVITY_TYPE, {}).get("billingIds", {})
    reported = {b: int(v.get("unique", 0)) for b, v in rows.items()}
    mismatched = sorted(b for b in set(truth) | set(reported) if truth.get(b) != reported.get(b))
    missing_users = sum(max(0, truth.get(b, 0) - reported.get(b, 0)) for b in truth)
    sent = int(server_stats["counters"].get("ok", 0))
    reduction = calls / sent if sent else float("nan")
    matches = not mismatched and flushed

    table = Table(
        f"coalescing: {calls:,} calls, {p['users']:,} users, {p['billing_ids']} billing IDs, "
        "one simulated hour (4 windows of 15 min)",
        ["metric", "value", "target", "met?"],
    )
    table.add("record() calls", f"{calls:,}", "", "")
    table.add("distinct users active in the hour", f"{len(set(picks)):,}", "", "")
    table.add("requests sent to Per (server's accepted count)", f"{sent:,}", "", "")
    table.add("reduction factor (calls / requests)", f"{reduction:,.1f}x", "", "")
    table.add(
        "minimum that keeps every 15-min report exact (distinct pairs per window)",
        f"{minimal_requests:,}",
        "= requests sent",
        met_text(sent == minimal_requests),
    )
    table.add("recorder: coalesced / enqueued", f"{stats.coalesced:,} / {stats.enqueued:,}", "", "")
    table.add(
        "report rows (billing IDs) equal to the ground truth",
        f"{len(truth) - len(mismatched):,} of {len(truth):,}",
        "all",
        met_text(matches),
    )
    table.add(
        "users missing from the report", f"{missing_users:,}", "0", met_text(missing_users == 0)
    )
    table.add("time until flush() returned (recording included)", f"{total_seconds:.1f} s", "", "")
    table.notes.append(
        f"Users drawn from Zipf(s={ZIPF_S:g}); each user belongs to one billing ID. The server "
        "stamps arrivals with real time, so the report spans the run; the ground truth is the "
        "distinct users per billing ID over all calls. The simulated clock also drives the "
        "worker's timers (reclaim, leases, probe delays), which run ~1,000x fast here: this "
        "scenario measures what is sent, not speed.",
    )
    table.notes.append(
        f"Delivery mode: {stats.delivery}. A recorder with an injected clock= always "
        "delivers from a thread of the recording process, so this is the in-process "
        "coalescing; the drainer's host-wide coalescing follows the same rule."
    )
    result.tables.append(table)
    result.targets.append(
        Target(
            "server report equals the uncoalesced ground truth",
            "every billing ID",
            f"{len(truth) - len(mismatched)} of {len(truth)}",
            matches,
        )
    )
    result.lost = missing_users
    result.checks = {"mismatched_billing_ids": mismatched[:20], "flushed": flushed}
    figures: dict[str, Any] = {
        "calls": calls,
        "users": p["users"],
        "billing_ids": p["billing_ids"],
        "active_users": len(set(picks)),
        "requests_sent": sent,
        "server_requests": int(server_stats["counters"].get("requests", 0)),
        "minimal_requests": minimal_requests,
        "reduction": reduction,
        "coalesced": stats.coalesced,
        "enqueued": stats.enqueued,
        "record_calls_per_s": calls / record_seconds,
        "seconds_to_flush": total_seconds,
        "delivery_mode": stats.delivery,
        "mismatched_billing_ids": len(mismatched),
        "missing_users": missing_users,
        "load_average": {"before": load_before, "after": loadavg()},
    }
    result.figures.update(figures)
    return result
