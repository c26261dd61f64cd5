"""Scenario ``delivery``: how fast a backlog is delivered, and at what CPU cost.

For each server latency and concurrency, three subjects alternate:

* **drainer** (the default ``delivery="process"``): N unique activities are put in a
  fresh queue directory with ``DurableQueue.put`` (not timed), a
  :class:`~per_buffer.Recorder` is built on it, which starts the directory's drainer
  process because there is a backlog, and ``Recorder.drain(timeout)`` waits until the
  directory holds nothing undelivered. The drainer's CPU is read from ``/proc``
  (``/proc/<pid>/task/*/schedstat``, nanoseconds, summed over its threads; the
  ``/proc/<pid>/stat`` figure is kept in the JSON as a cross-check); the recording
  process's own CPU (``time.process_time()``: building the recorder, spawning the
  drainer, ``drain()``'s polling) separately.
* **thread** (``delivery="thread"``): the same, with the delivery worker in a thread of
  the benchmark process; CPU is ``time.process_time()`` of the benchmark process.
* **bare httpx**: the simplest efficient client: asyncio, one keep-alive
  ``httpx.AsyncClient`` per concurrent task (built, and its connection opened by one
  warm-up request, before the clock starts), GET
  ``activities.add`` over pre-generated items, no queue, no disk.

The drainer's start (a fresh interpreter, about 0.2-0.3 s) is *excluded* from its
rate and CPU: both run from the worker's first claim (the directory's counts polled
every millisecond) to ``drain()`` returning; the start is reported beside them. The
thread mode is measured over the same span. The server (``PerServerProcess``) runs in
its own process; the server must then hold exactly N unique activities.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from per_buffer import Recorder
from per_buffer._wire import accelerator
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
from ._procs import cpu_seconds, drainer_pids, end_drainers, wait_for_first_claim

PARAMS: dict[str, dict[str, Any]] = {
    "smoke": {"repeats": 1, "latencies_ms": (0, 50), "concurrency": (8, 64), "seconds": 0.3,
              "pairs": {(0, 8), (50, 64)}},
    "quick": {"repeats": 2, "latencies_ms": (0, 50), "concurrency": (1, 8, 64), "seconds": 0.4,
              "pairs": None},
    "full": {"repeats": 3, "latencies_ms": (0, 20, 50), "concurrency": (1, 8, 32, 64),
             "seconds": 1.5, "pairs": None},
}  # fmt: skip

SUBJECTS = ("drainer", "thread", "httpx")
MIN_ITEMS = 10
MAX_ITEMS = 8000
#: To size N so that each run lasts about "seconds": CPU seconds per request and the
#: highest rate expected on this kind of machine, for per_buffer and for bare httpx
#: (which needs about 1 ms of CPU per request here; its runs get fewer activities).
CLIENT_CPU_PER_REQUEST = {"per_buffer": 0.0003, "httpx": 0.001}
MACHINE_CEILING = {"per_buffer": 4000.0, "httpx": 1000.0}
TARGET_RATIO = 0.8
TARGET_RATE_50MS_64 = 1000.0
TARGET_DRAINER_CPU_US = 50.0  # CPU microseconds per delivered activity, in the drainer
START_TIMEOUT = 20.0  # seconds for the first claim (a drainer is a fresh interpreter)


def items_for(latency_ms: int, concurrency: int, seconds: float, client: str = "per_buffer") -> int:
    """How many activities make a run of ``client`` last about ``seconds``."""
    expected = min(
        concurrency / (latency_ms / 1000.0 + CLIENT_CPU_PER_REQUEST[client]),
        MACHINE_CEILING[client],
    )
    return int(min(MAX_ITEMS, max(MIN_ITEMS, round(expected * seconds))))


def _server_cpu(server: PerServerProcess) -> float:
    """CPU seconds used so far by the server process (NaN when unknown)."""
    pid = server.pid
    return math.nan if pid is None else cpu_seconds(pid)


def thread_cpu_ns(pid: int) -> float:
    """CPU seconds of ``pid`` summed over its live threads, from their ``schedstat``
    (nanoseconds; NaN where the kernel has none)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan
    return total / 1e9


def _drainer_cpu(pid: int | None) -> tuple[float, float]:
    """(schedstat CPU, /proc stat CPU) of the drainer, seconds."""
    if pid is None:
        return math.nan, math.nan
    return thread_cpu_ns(pid), cpu_seconds(pid)


def run_recorder(
    server: PerServerProcess, directory: Path, n: int, concurrency: int, tag: str, delivery: str
) -> dict[str, Any]:
    """One timed drain of ``n`` pre-filled activities by a Recorder; figures of the run."""
    server.reset()
    prefill(directory, unique_pairs(n, tag))
    server_cpu0 = _server_cpu(server)
    cpu0 = time.process_time()
    start = time.perf_counter()
    recorder = Recorder(
        server.activity_token,
        ACTIVITY_TYPE,
        directory=directory,
        base_url=server.url,
        concurrency=concurrency,
        coalesce_window=0,
        delivery="process" if delivery == "drainer" else "thread",
    )
    probe_cpu0 = time.process_time()
    first = wait_for_first_claim(directory, (n, 0), START_TIMEOUT)
    cpu_first = time.process_time()
    probe_cpu = cpu_first - probe_cpu0  # the benchmark's own polling, not the recorder's
    pid: int | None = None
    drainer0 = (math.nan, math.nan)
    if delivery == "drainer":
        pids = drainer_pids(directory)
        pid = pids[0] if len(pids) == 1 else None
        drainer0 = _drainer_cpu(pid)
    done = recorder.drain(timeout=30.0 + n / 5.0)
    end = time.perf_counter()
    cpu_end = time.process_time()
    drainer1 = _drainer_cpu(pid)
    server_cpu = _server_cpu(server) - server_cpu0
    stats = recorder.stats()
    recorder.close(timeout=1.0)
    signalled = end_drainers(directory)
    shutil.rmtree(directory, ignore_errors=True)
    unique = int(server.stats()["unique"])
    if first is None:
        first = start
    active = max(1e-9, end - first)
    out: dict[str, Any] = {
        "n": n,
        "mode": stats.delivery,
        "seconds": end - start,
        "start_s": first - start,
        "active_s": active,
        "rate": n / active,
        "rate_incl_start": n / (end - start),
        "process_cpu_per_1k": (cpu_end - cpu0 - probe_cpu) / n * 1000.0,
        "server_cpu_per_1k": server_cpu / n * 1000.0,
        "unique": unique,
        "lost": max(0, n - unique),
        "drained": done,
        "retried": stats.retried,
        "drainers_signalled": signalled,
    }
    if delivery == "drainer":
        out.update(
            drainer_pid=pid,
            drainer_start_cpu_s=drainer0[0],
            cpu_per_1k=(drainer1[0] - drainer0[0]) / n * 1000.0,
            cpu_per_1k_stat=(drainer1[1] - drainer0[1]) / n * 1000.0,
            drainer_cpu_incl_start_per_1k=drainer1[0] / n * 1000.0,
        )
    else:
        out["cpu_per_1k"] = (cpu_end - cpu_first) / n * 1000.0
    return out


async def _bare_httpx(clients: list[httpx.AsyncClient], items: list[tuple[str, str]]) -> int:
    """The baseline loop over ready clients; returns how many answers were not ``ok``."""
    work: Iterator[tuple[str, str]] = iter(items)
    failures = 0

    async def sender(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for billing, user in work:  # one shared iterator: each item is sent once
            response = await client.get(
                "/activities.add",
                params={"billingId": billing, "userId": user, "activityTypeId": ACTIVITY_TYPE},
            )
            if not response.json().get("ok"):
                failures += 1

    await asyncio.gather(*(sender(c) for c in clients))
    return failures


def run_baseline(server: PerServerProcess, n: int, concurrency: int, tag: str) -> dict[str, Any]:
    """One timed run of the bare httpx loop over ``n`` activities."""
    server.reset()
    items = list(unique_pairs(n, tag))
    timing: dict[str, float] = {}

    async def main() -> int:
        context = ssl.create_default_context()  # one context: building one per client costs ms
        clients = [
            httpx.AsyncClient(
                base_url=server.url,
                headers={"Authorization": f"Bearer {server.activity_token}"},
                timeout=30.0,
                verify=context,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            for _ in range(concurrency)
        ]
        try:
            # open and warm every connection outside the clock (the best case for httpx)
            await asyncio.gather(
                *(
                    c.get(
                        "/activities.add",
                        params={
                            "billingId": "org-warm",
                            "userId": "warm-up",
                            "activityTypeId": ACTIVITY_TYPE,
                        },
                    )
                    for c in clients
                )
            )
            timing["cpu0"] = time.process_time()
            timing["start"] = time.perf_counter()
            failures = await _bare_httpx(clients, items)
            timing["cpu1"] = time.process_time()
            timing["end"] = time.perf_counter()
            return failures
        finally:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(c.aclose() for c in clients))

    server_cpu0 = _server_cpu(server)
    failures = asyncio.run(main())
    elapsed = timing["end"] - timing["start"]
    server_cpu = _server_cpu(server) - server_cpu0
    unique = int(server.stats()["unique"]) - 1  # the warm-up user
    return {
        "n": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "cpu_per_1k": (timing["cpu1"] - timing["cpu0"]) / n * 1000.0,
        "server_cpu_per_1k": server_cpu / n * 1000.0,
        "unique": unique,
        "lost": max(0, n - unique),
        "failures": failures,
    }


def run(mode: str) -> ScenarioResult:
    """Measure delivery throughput and CPU in both delivery modes against the baseline."""
    p = PARAMS[mode]
    result = ScenarioResult("delivery", mode)
    configs = [
        (lat, conc)
        for lat in p["latencies_ms"]
        for conc in p["concurrency"]
        if p["pairs"] is None or (lat, conc) in p["pairs"]
    ]
    runs: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {
        c: {s: [] for s in SUBJECTS} for c in configs
    }
    lost = 0
    load_before = loadavg()
    serial = 0
    with scratch_dir("delivery") as tmp, PerServerProcess(keep_activities=False) as server:
        for rep in range(p["repeats"]):
            for index, (lat, conc) in enumerate(configs):
                server.set_latency(lat / 1000.0)
                n = items_for(lat, conc, p["seconds"])
                n_httpx = min(n, items_for(lat, conc, p["seconds"], "httpx"))
                shift = (rep + index) % len(SUBJECTS)
                for subject in SUBJECTS[shift:] + SUBJECTS[:shift]:
                    serial += 1
                    tag = f"r{serial}"
                    if subject == "httpx":
                        one = run_baseline(server, n_httpx, conc, tag)
                    else:
                        one = run_recorder(server, tmp / f"q{serial}", n, conc, tag, subject)
                        lost += int(one["lost"])
                    runs[(lat, conc)][subject].append(one)
            log(f"delivery: repeat {rep + 1}/{p['repeats']} done")
        end_drainers(tmp, grace=0.0)
    _report(result, p, configs, runs)
    result.figures["load_average"] = {"before": load_before, "after": loadavg()}
    result.lost = lost
    result.checks["lost_per_config"] = {
        f"{lat}ms/c{conc}": sum(
            int(r["lost"]) for s in ("drainer", "thread") for r in runs[(lat, conc)][s]
        )
        for lat, conc in configs
    }
    result.checks["modes"] = sorted(
        {str(r["mode"]) for c in configs for s in ("drainer", "thread") for r in runs[c][s]}
    )
    return result


def _report(
    result: ScenarioResult,
    p: dict[str, Any],
    configs: list[tuple[int, int]],
    runs: dict[tuple[int, int], dict[str, list[dict[str, Any]]]],
) -> None:
    loop = accelerator() or "asyncio"
    table = Table(
        "delivery: activities/s delivered and CPU s per 1,000 delivered: drainer process "
        "(default mode), delivery thread, bare httpx",
        [
            "server latency",
            "concurrency",
            "activities/run (httpx)",
            "drainer act/s",
            "thread act/s",
            "httpx act/s",
            "drainer / httpx",
            "drainer CPU s/1k",
            "recording process CPU s/1k",
            "thread mode CPU s/1k",
            "httpx CPU s/1k",
            "target",
            "met?",
        ],
    )
    figures: dict[str, Any] = {}
    starts: list[float] = []
    start_cpus: list[float] = []
    for lat, conc in configs:
        cell = runs[(lat, conc)]
        mine, thread, base = cell["drainer"], cell["thread"], cell["httpx"]

        def sp(rows: list[dict[str, Any]], key: str) -> Any:
            return spread([float(r[key]) for r in rows])

        rate, thread_rate, base_rate = sp(mine, "rate"), sp(thread, "rate"), sp(base, "rate")
        cpu, rec_cpu = sp(mine, "cpu_per_1k"), sp(mine, "process_cpu_per_1k")
        thread_cpu, base_cpu = sp(thread, "cpu_per_1k"), sp(base, "cpu_per_1k")
        starts += [float(r["start_s"]) for r in mine]
        start_cpus += [float(r["drainer_start_cpu_s"]) for r in mine]
        ratio = rate.median / base_rate.median
        goals: list[str] = [f">= {TARGET_RATIO:.0%} of httpx"]
        oks: list[bool] = [ratio >= TARGET_RATIO]
        result.targets.append(
            Target(
                f"delivery >= 80% of bare httpx ({lat} ms, concurrency {conc}), drainer",
                f">= {TARGET_RATIO:.0%} of httpx",
                f"{ratio:.0%} ({num(rate.median)} vs {num(base_rate.median)}/s)",
                oks[-1],
            )
        )
        if (lat, conc) == (50, 64):
            goals.append(f">= {TARGET_RATE_50MS_64:,.0f}/s")
            oks.append(rate.median >= TARGET_RATE_50MS_64)
            result.targets.append(
                Target(
                    "delivery at 50 ms latency, concurrency 64, drainer",
                    f">= {TARGET_RATE_50MS_64:,.0f} activities/s",
                    f"{num(rate.median)}/s",
                    oks[-1],
                )
            )
        per_item_us = cpu.median * 1000.0  # s per 1,000 -> us per activity
        goals.append(f"drainer CPU <= {TARGET_DRAINER_CPU_US:g} us/act")
        oks.append(per_item_us <= TARGET_DRAINER_CPU_US)
        result.targets.append(
            Target(
                f"drainer CPU per delivered ({lat} ms, concurrency {conc})",
                f"<= {TARGET_DRAINER_CPU_US:g} us",
                f"{num(per_item_us)} us",
                oks[-1],
            )
        )
        table.add(
            f"{lat} ms",
            conc,
            f"{num(mine[0]['n'])} ({num(base[0]['n'])})",
            fmt(rate),
            fmt(thread_rate),
            fmt(base_rate),
            f"{ratio:.0%}",
            fmt(cpu),
            fmt(rec_cpu),
            fmt(thread_cpu),
            fmt(base_cpu),
            ", ".join(goals),
            met_text(all(oks)),
        )
        figures[f"{lat}ms/c{conc}"] = {
            subject: {
                "rate": sp(rows, "rate").as_dict(),
                "cpu_per_1k": sp(rows, "cpu_per_1k").as_dict(),
                "server_cpu_per_1k": sp(rows, "server_cpu_per_1k").as_dict(),
                "runs": rows,
            }
            for subject, rows in cell.items()
        }
        figures[f"{lat}ms/c{conc}"]["drainer"].update(
            rate_incl_start=sp(mine, "rate_incl_start").as_dict(),
            process_cpu_per_1k=rec_cpu.as_dict(),
            cpu_per_1k_stat=sp(mine, "cpu_per_1k_stat").as_dict(),
        )
        figures[f"{lat}ms/c{conc}"]["ratio"] = ratio
        figures[f"{lat}ms/c{conc}"]["thread_ratio"] = thread_rate.median / base_rate.median
    start = spread([s * 1000.0 for s in starts])
    start_cpu = spread([c * 1000.0 for c in start_cpus])
    server_note = []
    for key, fig in figures.items():
        value = fig["drainer"]["server_cpu_per_1k"]["median"]
        if value == value:  # not NaN
            server_note.append(f"{key} {num(value)}")
    table.notes += [
        f"Medians of {p['repeats']} runs, [min-max]; the three subjects alternate. Each "
        "recorder run: a fresh queue directory pre-filled with N unique activities "
        "(DurableQueue.put), then Recorder(coalesce_window=0, concurrency=C) and "
        "drain(); success means the server's unique count equals N.",
        'drainer: the default delivery mode (delivery="process"): the recorder spawns the '
        "directory's drainer process (niced +10 by default, drainer_nice). Its start is "
        f"EXCLUDED from its act/s and CPU: Recorder() to the first claim took "
        f"{fmt(start)} ms and {fmt(start_cpu)} ms of the drainer's CPU (interpreter, "
        "imports, queue); rates with the start included are in the JSON (rate_incl_start).",
        "drainer CPU: the drainer process's threads (/proc/<pid>/task/*/schedstat, ns) from "
        "its first claim to drain() returning. recording process CPU: time.process_time() of "
        "the benchmark process from Recorder() to drain() returning (building the recorder, "
        "spawning the drainer, drain()'s polling every 20 ms; not the benchmark's own "
        "first-claim polling); it runs no delivery worker. Its fixed costs make it large "
        "per activity when N is small.",
        'thread: delivery="thread", the delivery worker in a thread of the benchmark process; '
        "act/s and CPU (time.process_time()) from the first claim to drain() returning.",
        "httpx: one keep-alive httpx.AsyncClient per concurrent task on asyncio's default "
        "loop, clients built and their connections opened (one warm-up request each) before "
        "the clock starts; CPU is time.process_time().",
        f"Event loop of the delivery worker (both modes): {loop} "
        "(per_buffer._wire.accelerator()). drain() polls the directory every 20 ms in the "
        "process mode, so its end is late by up to 20 ms.",
    ]
    if server_note:
        table.notes.append("Server CPU s/1k during drainer runs: " + ", ".join(server_note))
    result.tables.append(table)
    result.figures["configs"] = figures
    result.figures["event_loop"] = loop
    result.figures["drainer_start_ms"] = start.as_dict()
    result.figures["drainer_start_cpu_ms"] = start_cpu.as_dict()
