"""Scenario ``delivery``: how fast the worker drains the queue, and at what CPU cost.

For each server latency and concurrency: N unique activities are put in a fresh
queue directory (not timed), then a :class:`~per_buffer.Recorder` is built on it
(its worker starts because there is a backlog) and the clock runs until
``flush()`` returns. The server (another process) must then hold exactly N unique
activities. CPU is ``time.process_time()`` of this process, which hosts the
recorder and nothing else.

Baseline: a bare httpx loop with the same concurrency, the simplest efficient way:
asyncio, one keep-alive ``httpx.AsyncClient`` per task (built before the clock
starts), GET ``activities.add`` over pre-generated items, no queue, no disk.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from per_buffer import Recorder
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

PARAMS: dict[str, dict[str, Any]] = {
    "smoke": {"repeats": 1, "latencies_ms": (0, 50), "concurrency": (8, 64), "seconds": 0.3,
              "pairs": {(0, 8), (50, 64)}},
    "quick": {"repeats": 2, "latencies_ms": (0, 50), "concurrency": (1, 8, 64), "seconds": 0.5,
              "pairs": None},
    "full": {"repeats": 3, "latencies_ms": (0, 20, 50), "concurrency": (1, 8, 32, 64),
             "seconds": 1.0, "pairs": None},
}  # fmt: skip

MIN_ITEMS = 20
MAX_ITEMS = 6000
CLIENT_CPU_PER_REQUEST = 0.0007  # seconds, to size N so each run lasts about "seconds"
MACHINE_CEILING = 2200.0  # requests/s, same purpose
TARGET_RATIO = 0.8
TARGET_RATE_50MS_64 = 1000.0


def items_for(latency_ms: int, concurrency: int, seconds: float) -> int:
    """How many activities make a run last about ``seconds``."""
    expected = min(concurrency / (latency_ms / 1000.0 + CLIENT_CPU_PER_REQUEST), MACHINE_CEILING)
    return int(min(MAX_ITEMS, max(MIN_ITEMS, round(expected * seconds))))


def _server_cpu(server: PerServerProcess) -> float:
    """CPU seconds used so far by the server process (NaN without psutil)."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415

        times = psutil.Process(server.pid).cpu_times()
        return float(times.user + times.system)
    except Exception:
        return float("nan")


def run_recorder(
    server: PerServerProcess, directory: Path, n: int, concurrency: int, tag: str
) -> dict[str, float]:
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
    )
    done = recorder.flush(timeout=30.0 + n / 5.0)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    server_cpu = _server_cpu(server) - server_cpu0
    stats = recorder.stats()
    recorder.close(timeout=1.0)
    shutil.rmtree(directory, ignore_errors=True)
    unique = int(server.stats()["unique"])
    return {
        "n": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "cpu_per_1k": cpu / n * 1000.0,
        "server_cpu_per_1k": server_cpu / n * 1000.0,
        "unique": unique,
        "lost": max(0, n - unique),
        "flushed": float(done),
        "retried": stats.retried,
    }


async def _bare_httpx(url: str, token: str, items: list[tuple[str, str]], concurrency: int) -> int:
    """The baseline loop; returns how many answers were not ``ok``."""
    context = ssl.create_default_context()  # one context: building one per client costs ms
    clients = [
        httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
            verify=context,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        for _ in range(concurrency)
    ]
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

    try:
        await asyncio.gather(*(sender(c) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return failures


def run_baseline(server: PerServerProcess, n: int, concurrency: int, tag: str) -> dict[str, float]:
    """One timed run of the bare httpx loop over ``n`` activities."""
    server.reset()
    items = list(unique_pairs(n, tag))
    timing: dict[str, float] = {}

    async def main() -> int:
        # clients are built inside _bare_httpx; start the clock once the loop runs
        timing["cpu0"] = time.process_time()
        timing["start"] = time.perf_counter()
        return await _bare_httpx(server.url, server.activity_token, items, concurrency)

    server_cpu0 = _server_cpu(server)
    failures = asyncio.run(main())
    elapsed = time.perf_counter() - timing["start"]
    cpu = time.process_time() - timing["cpu0"]
    server_cpu = _server_cpu(server) - server_cpu0
    unique = int(server.stats()["unique"])
    return {
        "n": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "cpu_per_1k": cpu / n * 1000.0,
        "server_cpu_per_1k": server_cpu / n * 1000.0,
        "unique": unique,
        "lost": max(0, n - unique),
        "failures": failures,
    }


def run(mode: str) -> ScenarioResult:
    """Measure delivery throughput and CPU against the baseline."""
    p = PARAMS[mode]
    result = ScenarioResult("delivery", mode)
    configs = [
        (lat, conc)
        for lat in p["latencies_ms"]
        for conc in p["concurrency"]
        if p["pairs"] is None or (lat, conc) in p["pairs"]
    ]
    runs: dict[tuple[int, int], dict[str, list[dict[str, float]]]] = {
        c: {"per_buffer": [], "httpx": []} for c in configs
    }
    lost = 0
    load_before = loadavg()
    serial = 0
    with scratch_dir("delivery") as tmp, PerServerProcess(keep_activities=False) as server:
        for rep in range(p["repeats"]):
            for index, (lat, conc) in enumerate(configs):
                server.set_latency(lat / 1000.0)
                n = items_for(lat, conc, p["seconds"])
                order = (
                    ("per_buffer", "httpx") if (rep + index) % 2 == 0 else ("httpx", "per_buffer")
                )
                for subject in order:
                    serial += 1
                    tag = f"r{serial}"
                    if subject == "per_buffer":
                        one = run_recorder(server, tmp / f"q{serial}", n, conc, tag)
                        lost += int(one["lost"])
                    else:
                        one = run_baseline(server, n, conc, tag)
                    runs[(lat, conc)][subject].append(one)
            log(f"delivery: repeat {rep + 1}/{p['repeats']} done")

    table = Table(
        "delivery: activities/s delivered and client CPU per 1,000 (recorder vs bare httpx)",
        [
            "server latency",
            "concurrency",
            "activities/run",
            "per_buffer act/s",
            "bare httpx act/s",
            "ratio",
            "per_buffer CPU s/1k",
            "httpx CPU s/1k",
            "target",
            "met?",
        ],
    )
    figures: dict[str, Any] = {}
    for lat, conc in configs:
        mine, base = runs[(lat, conc)]["per_buffer"], runs[(lat, conc)]["httpx"]
        rate, base_rate = spread([r["rate"] for r in mine]), spread([r["rate"] for r in base])
        cpu, base_cpu = (
            spread([r["cpu_per_1k"] for r in mine]),
            spread([r["cpu_per_1k"] for r in base]),
        )
        ratio = rate.median / base_rate.median
        ok = ratio >= TARGET_RATIO
        goal = f">= {TARGET_RATIO:.0%} of httpx"
        if (lat, conc) == (50, 64):
            goal += f" and >= {TARGET_RATE_50MS_64:,.0f}/s"
            fast = rate.median >= TARGET_RATE_50MS_64
            result.targets.append(
                Target(
                    "delivery at 50 ms latency, concurrency 64",
                    f">= {TARGET_RATE_50MS_64:,.0f} activities/s",
                    f"{num(rate.median)}/s",
                    fast,
                )
            )
            ok_all = ok and fast
        else:
            ok_all = ok
        result.targets.append(
            Target(
                f"delivery >= 80% of bare httpx ({lat} ms, concurrency {conc})",
                goal.split(" and ")[0],
                f"{ratio:.0%} ({num(rate.median)} vs {num(base_rate.median)}/s)",
                ok,
            )
        )
        table.add(
            f"{lat} ms",
            conc,
            num(mine[0]["n"]),
            fmt(rate),
            fmt(base_rate),
            f"{ratio:.0%}",
            fmt(cpu),
            fmt(base_cpu),
            goal,
            met_text(ok_all),
        )
        figures[f"{lat}ms/c{conc}"] = {
            "per_buffer": {
                "rate": rate.as_dict(),
                "cpu_per_1k": cpu.as_dict(),
                "server_cpu_per_1k": spread([r["server_cpu_per_1k"] for r in mine]).as_dict(),
                "runs": mine,
            },
            "httpx": {
                "rate": base_rate.as_dict(),
                "cpu_per_1k": base_cpu.as_dict(),
                "server_cpu_per_1k": spread([r["server_cpu_per_1k"] for r in base]).as_dict(),
                "runs": base,
            },
            "ratio": ratio,
        }
    server_note = []
    for key, fig in figures.items():
        mine_cpu = fig["per_buffer"]["server_cpu_per_1k"]["median"]
        if mine_cpu == mine_cpu:  # not NaN
            server_note.append(f"{key} {num(mine_cpu)}")
    table.notes += [
        f"Medians of {p['repeats']} runs, [min-max]; recorder and baseline alternate. "
        "The recorder's clock starts before Recorder() is built (thread start and first "
        "connections included); the baseline's once its clients exist.",
        "Each run: a fresh queue directory pre-filled with N unique activities, "
        "coalesce_window=0; success means the server's unique count equals N.",
        "CPU: time.process_time() of the benchmark process (recorder threads, flush polling); "
        "the server runs in its own process.",
    ]
    if server_note:
        table.notes.append("Server CPU s/1k during per_buffer runs: " + ", ".join(server_note))
    result.tables.append(table)
    result.figures["configs"] = figures
    result.figures["load_average"] = {"before": load_before, "after": loadavg()}
    result.lost = lost
    result.checks["lost_per_config"] = {
        f"{lat}ms/c{conc}": sum(int(r["lost"]) for r in runs[(lat, conc)]["per_buffer"])
        for lat, conc in configs
    }
    return result
