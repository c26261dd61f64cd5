"""Scenario ``backlog``: does a large backlog make anything slower or bigger?

With N pending activities (1,000,000; quick: 200,000) against an empty queue:
``record()`` (both durability modes, worker idle), and the queue operations behind
it (``put`` of a 512 batch, ``claim(128)``, ``ack(128)``, measured with the
colleagues' :func:`benchmarks.queue_backlog.measure`); resident memory; bytes on
disk per activity; and the drain from start to finish against a 0 ms server at
concurrency 32 (quick mode drains for a few seconds only and accounts for every
activity: delivered + still on disk = what was put).

Delivery mode: the default (``delivery="process"``). While ``record()`` is measured,
delivery is idle (the recorders' drainer cannot reach its closed port; it is ended
before the drain); the drain is done by the directory's drainer process, whose rate
runs from its first claim (its start excluded) and whose peak resident memory is
read from ``/proc`` beside the benchmark process's own.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from per_buffer import Recorder
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServerProcess

from ._common import (
    ACTIVITY_TYPE,
    ScenarioResult,
    Spread,
    Table,
    Target,
    closed_port,
    dir_bytes,
    fmt,
    loadavg,
    log,
    met_text,
    num,
    peak_rss_mb,
    prefill,
    remaining_budget,
    rss_mb,
    scratch_dir,
    spread,
    unique_pairs,
)
from ._procs import drainer_pids, end_drainers, peak_rss_mb_of, wait_for_first_claim
from .hot_path import Workloads, _timed_pairs, run_calls
from .queue_backlog import measure as queue_measure

PARAMS: dict[str, dict[str, Any]] = {
    "smoke": {"items": 3000, "repeats": 1, "rounds": 4, "n_fast": 1000, "n_sync": 50,
              "drain_seconds": None, "drain_cap": 60.0},
    "quick": {"items": 200_000, "repeats": 3, "rounds": 30, "n_fast": 20_000, "n_sync": 500,
              "drain_seconds": 6.0, "drain_cap": 6.0},
    "full": {"items": 1_000_000, "repeats": 3, "rounds": 80, "n_fast": 10_000, "n_sync": 1000,
             "drain_seconds": None, "drain_cap": 540.0},
}  # fmt: skip

TARGET_RATIO = 1.5
TARGET_RSS_MB = 200.0
DRAIN_CONCURRENCY = 32


def _record_runs(rec: Recorder, workloads: Workloads, n: int, runs: list[dict[str, float]]) -> None:
    chunks = workloads.chunks("new", n, 1)
    runs.append(run_calls(_timed_pairs, rec.record, chunks).summary)


def _idle_recorder(directory: Path, durability: str, port: int) -> Recorder:
    """A recorder whose worker cannot reach anything (so it stays idle, backing off)."""
    return Recorder(
        "bench-token",
        ACTIVITY_TYPE,
        directory=directory,
        base_url=f"http://127.0.0.1:{port}",
        durability=durability,
    )


def run(mode: str) -> ScenarioResult:
    """Measure costs with and without a backlog, memory, disk and the drain."""
    p = PARAMS[mode]
    result = ScenarioResult("backlog", mode)
    n_items = p["items"]
    figures: dict[str, Any] = {"items": n_items, "rss_start_mb": rss_mb()}
    load_before = loadavg()
    workloads = Workloads(seed=99)
    ops: dict[str, dict[str, list[dict[str, float]]]] = {"empty": {}, "backlog": {}}
    with scratch_dir("backlog") as tmp:
        empty_dir, backlog_dir = tmp / "empty", tmp / "backlog"

        # ------------------------------------------------------------ fill
        log(f"backlog: filling {n_items:,} activities")
        start = time.perf_counter()
        stored = prefill(backlog_dir, unique_pairs(n_items, "bl"))
        figures["fill_seconds"] = time.perf_counter() - start
        figures["fill_rate"] = stored / figures["fill_seconds"]
        figures["rss_after_fill_mb"] = rss_mb()
        figures["disk_bytes"] = dir_bytes(backlog_dir)
        reserve = sum(f.stat().st_size for f in backlog_dir.rglob("reserve.bin"))
        figures["disk_reserve_bytes"] = reserve
        figures["disk_bytes_per_activity"] = (figures["disk_bytes"] - reserve) / max(1, stored)

        # ------------------------------------------------------------ queue operations
        log("backlog: queue operations, empty vs backlog")
        q_empty, q_backlog = DurableQueue(empty_dir), DurableQueue(backlog_dir)
        figures["queue_bytes_on_disk"] = q_backlog.stats().bytes_on_disk
        counter = [10**9]  # ids of measure()'s own items; far from ours
        queue_measure(q_empty, 5, counter)  # warm-up of both
        queue_measure(q_backlog, 5, counter)
        for rep in range(p["repeats"]):
            pairs = [("empty", q_empty), ("backlog", q_backlog)]
            if rep % 2:
                pairs.reverse()
            for label, q in pairs:
                for key, value in queue_measure(q, p["rounds"], counter).items():
                    ops[label].setdefault(key, []).append({"v": value})
        q_empty.close()
        q_backlog.close()

        # ------------------------------------------------------------ record()
        log("backlog: record(), empty vs backlog (worker idle)")
        port = closed_port()
        record_runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for durability in ("batched", "sync"):
            recs = {
                "empty": _idle_recorder(tmp / f"empty-{durability}", durability, port),
                "backlog": _idle_recorder(backlog_dir, durability, port),
            }
            if durability == "batched":
                figures["rss_recorder_open_mb"] = rss_mb()
            n = p["n_fast"] if durability == "batched" else p["n_sync"]
            for rep in range(p["repeats"] + 1):  # the first round warms up
                order = ["empty", "backlog"] if rep % 2 == 0 else ["backlog", "empty"]
                for label in order:
                    runs = record_runs.setdefault((durability, label), [])
                    _record_runs(recs[label], workloads, n, runs)
                    if rep == 0:
                        runs.clear()
            for rec in recs.values():
                rec.close(timeout=0.2)
        # their drainer (pointed at the closed port) would keep the directory: end it
        end_drainers(tmp, grace=0.0)

        # ------------------------------------------------------------ drain
        with DurableQueue(backlog_dir) as q:
            pending0, in_flight0 = q.counts()
        expected = pending0 + in_flight0
        log(f"backlog: draining {expected:,} at concurrency {DRAIN_CONCURRENCY}")
        with PerServerProcess(keep_activities=False) as server:
            drain = _drain(server, backlog_dir, expected, p)
            unique = int(server.stats()["unique"])
        with DurableQueue(backlog_dir) as q:
            left = sum(q.counts())
        drain["server_unique"] = unique
        drain["left_on_disk"] = left
        # every activity put is unique: delivered (server) + still on disk = expected
        lost = max(0, expected - unique - left)
        figures["drain"] = drain
        figures["peak_rss_mb"] = peak_rss_mb()

    result.lost = lost
    result.checks = {"expected": expected, "server_unique": unique, "left_on_disk": left}
    figures["load_average"] = {"before": load_before, "after": loadavg()}
    _report(result, p, ops, record_runs, figures)
    result.figures.update(figures)
    return result


def _drain(
    server: PerServerProcess, directory: Path, expected: int, p: dict[str, Any]
) -> dict[str, Any]:
    """Drain the backlog (all of it, or for ``drain_seconds``); progress samples and rates."""
    samples: list[tuple[float, int, float]] = []  # (seconds, delivered, rss MiB)
    peak = [rss_mb()]
    stop = threading.Event()

    def watch_rss() -> None:  # cheap: /proc or psutil, every 0.2 s
        while not stop.wait(0.2):
            peak[0] = max(peak[0], rss_mb())

    watcher = threading.Thread(target=watch_rss, daemon=True)
    watcher.start()
    with DurableQueue(directory) as probe:
        counts_before = probe.counts()
    built = time.perf_counter()
    recorder = Recorder(
        server.activity_token,
        ACTIVITY_TYPE,
        directory=directory,
        base_url=server.url,
        concurrency=DRAIN_CONCURRENCY,
    )
    first = wait_for_first_claim(directory, counts_before, 20.0)
    start = first if first is not None else built
    pids = drainer_pids(directory)
    drainer = pids[0] if len(pids) == 1 else None
    finished = False
    limit = p["drain_seconds"] or p["drain_cap"]
    left = remaining_budget()
    if p["drain_seconds"] is None and left is not None:
        limit = min(limit, max(5.0, left - 12.0))  # stop in time for the whole run's budget
    while True:
        time.sleep(0.1)
        elapsed = time.perf_counter() - start
        stats = recorder.stats()
        if not samples or elapsed - samples[-1][0] >= 0.5:
            samples.append((elapsed, stats.delivered, peak[0]))
        if stats.pending + stats.in_flight == 0:
            finished = recorder.drain(timeout=10.0)
            break
        if elapsed >= limit:
            break
    seconds = time.perf_counter() - start
    delivered = recorder.stats().delivered
    drainer_peak = math.nan if drainer is None else peak_rss_mb_of(drainer)
    recorder.close(timeout=0.5)
    end_drainers(directory, grace=1.0 if finished else 0.0)
    stop.set()
    watcher.join()
    out: dict[str, Any] = {
        "concurrency": DRAIN_CONCURRENCY,
        "expected": expected,
        "delivered": delivered,
        "seconds": seconds,
        "rate": delivered / seconds,
        "finished": finished,
        "capped": not finished and p["drain_seconds"] is None,
        "limit_seconds": limit,
        "peak_rss_mb": peak[0],
        "drainer_pid": drainer,
        "drainer_peak_rss_mb": drainer_peak,
        "start_s": start - built,
        "mode": recorder.stats().delivery,
        "samples": samples,
    }
    # rate over the first and the last tenth of what was delivered
    if delivered >= 10 and len(samples) >= 10:  # a tenth must span several samples
        tenth = delivered / 10
        t_first = next((t for t, d, _ in samples if d >= tenth), seconds)
        t_last = next((t for t, d, _ in samples if d >= delivered - tenth), seconds)
        out["rate_first_tenth"] = tenth / t_first if t_first else float("nan")
        out["rate_last_tenth"] = (
            tenth / max(1e-9, seconds - t_last) if seconds > t_last else (float("nan"))
        )
    return out


def _report(
    result: ScenarioResult,
    p: dict[str, Any],
    ops: dict[str, dict[str, list[dict[str, float]]]],
    record_runs: dict[tuple[str, str], list[dict[str, float]]],
    figures: dict[str, Any],
) -> None:
    n_items = p["items"]
    table = Table(
        f"backlog: cost per call with {n_items:,} pending vs an empty queue",
        [
            "operation",
            "empty p50 us",
            "backlog p50 us",
            "p50 ratio",
            "empty p99 us",
            "backlog p99 us",
            "p99 ratio",
            "target",
            "met?",
        ],
    )
    ratios: dict[str, float] = {}

    def row(name: str, empty: Spread, full: Spread, e99: Spread, f99: Spread, gated: bool) -> None:
        ratio = full.median / empty.median
        ratio99 = f99.median / e99.median
        ratios[name] = ratio
        target, met = "", ""
        if gated:
            target = f"p50 ratio <= {TARGET_RATIO:g}x"
            ok = ratio <= TARGET_RATIO
            met = met_text(ok)
            result.targets.append(
                Target(
                    f"{name} with {n_items:,} pending vs empty (p50)",
                    f"<= {TARGET_RATIO:g}x",
                    f"{ratio:.2f}x",
                    ok,
                )
            )
        table.add(
            name,
            fmt(empty),
            fmt(full),
            f"{ratio:.2f}x",
            fmt(e99),
            fmt(f99),
            f"{ratio99:.2f}x",
            target,
            met,
        )

    for durability in ("batched", "sync"):
        e = record_runs[(durability, "empty")]
        f = record_runs[(durability, "backlog")]
        row(
            f"record() ({durability})",
            spread([r["p50"] for r in e]),
            spread([r["p50"] for r in f]),
            spread([r["p99"] for r in e]),
            spread([r["p99"] for r in f]),
            True,
        )

    def op(label: str, key: str) -> Spread:
        return spread([r["v"] for r in ops[label].get(key, [])])

    for name, key, gated in (
        ("DurableQueue.put(512) (the committer's write)", "put", False),
        ("DurableQueue.claim(128)", "claim", True),
        ("DurableQueue.ack(128)", "ack", True),
    ):
        row(
            name,
            op("empty", f"{key}_p50_us"),
            op("backlog", f"{key}_p50_us"),
            op("empty", f"{key}_p99_us"),
            op("backlog", f"{key}_p99_us"),
            gated,
        )
    for name, key in (
        ("put throughput (items/s)", "put_items_per_s"),
        ("claim+ack throughput (items/s)", "claim_ack_items_per_s"),
    ):
        low, high = op("empty", key), op("backlog", key)
        table.add(
            name, fmt(low), fmt(high), f"{low.median / high.median:.2f}x (cost)", "", "", "", "", ""
        )
    table.notes += [
        f"Medians of {p['repeats']} runs (empty and backlog alternate), [min-max]. record(): "
        f"{p['n_fast']:,} (batched) / {p['n_sync']:,} (sync) new keys per run, worker idle "
        "(closed port). Queue operations: benchmarks/queue_backlog.py's measure(), "
        f"{p['rounds']} batches of 512 per run.",
    ]

    drain = figures["drain"]
    mem = Table(
        f"backlog: memory, disk and drain with {n_items:,} pending",
        ["metric", "value", "target", "met?"],
    )
    own_peak = max(figures["peak_rss_mb"], drain["peak_rss_mb"])
    drainer_peak = drain["drainer_peak_rss_mb"]
    peak = own_peak if math.isnan(drainer_peak) else max(own_peak, drainer_peak)
    rss_ok = peak <= TARGET_RSS_MB
    mem.add(
        "fill rate (DurableQueue.put, batches of 512)", f"{num(figures['fill_rate'])}/s", "", ""
    )
    mem.add("RSS after the fill", f"{num(figures['rss_after_fill_mb'])} MiB", "", "")
    mem.add(
        "RSS with a Recorder open on the backlog",
        f"{num(figures['rss_recorder_open_mb'])} MiB",
        "",
        "",
    )
    mem.add(
        "peak RSS of the benchmark process (VmHWM; fill, measurements, recorder open)",
        f"{num(own_peak)} MiB",
        f"<= {TARGET_RSS_MB:g} MiB",
        met_text(own_peak <= TARGET_RSS_MB),
    )
    mem.add(
        "peak RSS of the drainer process during the drain (VmHWM)",
        f"{num(drainer_peak)} MiB",
        f"<= {TARGET_RSS_MB:g} MiB",
        met_text(None if math.isnan(drainer_peak) else drainer_peak <= TARGET_RSS_MB),
    )
    mem.add(
        "bytes on disk per activity ((directory - reserve.bin) / pending)",
        f"{num(figures['disk_bytes_per_activity'])} B (directory "
        f"{num(figures['disk_bytes'] / 2**20)} MiB, of which reserve.bin "
        f"{num(figures['disk_reserve_bytes'] / 2**20)} MiB)",
        "",
        "",
    )
    result.targets.append(
        Target(
            f"resident memory with {n_items:,} pending (peak RSS, either process)",
            f"<= {TARGET_RSS_MB:g} MiB",
            f"{num(peak)} MiB",
            rss_ok,
        )
    )
    what = (
        "drained completely"
        if drain["finished"]
        else (
            f"stopped after {drain['seconds']:.0f} s (subset)"
            if not drain["capped"]
            else f"CAPPED at {drain['seconds']:.0f} s (time budget) before the end"
        )
    )
    if drain["capped"] and drain["rate"] > 0:
        rest = (drain["expected"] - drain["delivered"]) / drain["rate"]
        what += f"; the rest would take about {rest:.0f} s more at this rate"
    mem.add(
        f"drain at concurrency {DRAIN_CONCURRENCY}, 0 ms server: {what}",
        f"{drain['delivered']:,} of {drain['expected']:,} in {drain['seconds']:.1f} s = "
        f"{num(drain['rate'])}/s",
        "",
        "",
    )
    if "rate_first_tenth" in drain:
        mem.add(
            "drain rate over the first / last tenth delivered",
            f"{num(drain['rate_first_tenth'])}/s / {num(drain['rate_last_tenth'])}/s",
            "",
            "",
        )
    mem.add(
        "activities lost (expected - server unique - left on disk)",
        str(result.lost),
        "0",
        met_text(result.lost == 0),
    )
    mem.notes.append(
        f"Server unique count {drain['server_unique']:,}; left on disk "
        f"{drain['left_on_disk']:,}; RSS sampled every 0.2 s during the drain."
    )
    mem.notes.append(
        f"Drain: default delivery mode ({drain['mode']}): the directory's drainer process "
        f"delivers; the clock starts at its first claim (its start, "
        f"{drain['start_s']:.2f} s after Recorder(), excluded) and stops when "
        "stats() shows nothing pending or in flight (polled every 0.1 s) and drain() "
        "returned."
    )
    result.tables += [table, mem]
    result.figures["ratios"] = ratios
    result.figures["operations"] = {
        label: {key: spread([r["v"] for r in runs]).as_dict() for key, runs in d.items()}
        for label, d in ops.items()
    }
    result.figures["record"] = {
        f"{dur}/{label}": {
            "p50": spread([r["p50"] for r in runs]).as_dict(),
            "p99": spread([r["p99"] for r in runs]).as_dict(),
        }
        for (dur, label), runs in record_runs.items()
    }
