"""CPU per request of the delivery HTTP layer: the wire channel against httpx, same run.

Usage::

    python benchmarks/wire_cpu.py [--requests N] [--concurrency 1 8 64] [--runs 3]

The local Per server runs in its own process (``PerServerProcess``, no added
latency). For each concurrency C, every client below sends N ``activities.add``
requests with C in flight, on keep-alive connections opened (and warmed by one
request each) before the clock starts; the variants alternate within each run.
Reported: CPU seconds of this process (``time.process_time``) per 1,000
requests, as microseconds per request (split into user and system time by
``os.times``; system time is mostly the send, recv and epoll calls), and
requests per second, as medians of the runs. Other processes on the machine
(the server's included) compete for the cores: read the figures with the load
average printed under the table.

- ``channel``: :mod:`per_buffer._wire` lean channels, C of them, driven by a
  minimal callback loop that sends the next request from ``done`` (the target is
  encoded per request with ``RequestTarget.activity``); on asyncio's default loop
  and, when installed, on uvloop.
- ``httpx``: bare ``httpx.AsyncClient``, one per concurrent task.
- ``lean transport``: the previous worker's ``LeanTransport`` inside httpx
  (skipped once that module is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx

from per_buffer._wire import Answer, RequestTarget, WireError, accelerator, new_event_loop
from per_buffer._wire._lean import LeanChannel
from per_buffer.testing import PerServerProcess

ACTIVITY_TYPE = "api_call"
USER_AGENT = "per-buffer-bench/1"


@dataclass
class Sample:
    """Medians are taken over these."""

    cpu_us: list[float] = field(default_factory=list)
    user_us: list[float] = field(default_factory=list)
    sys_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    failures: int = 0


Runner = Callable[[str, str, int, int], Awaitable[int]]


def _users(n: int, salt: str) -> list[str]:
    return [f"user-{salt}-{i}" for i in range(n)]


async def run_channel(base_url: str, token: str, n: int, concurrency: int) -> int:
    """N requests over C lean channels; returns the number of failures."""
    loop = asyncio.get_running_loop()
    target = RequestTarget(base_url, token, USER_AGENT)
    channels = [
        LeanChannel(loop, target, timeout=10.0, max_body=1 << 20) for _ in range(concurrency)
    ]
    for channel in channels:  # connect and warm up outside the clock
        await channel.request(target.activity("bench", "warm-up", ACTIVITY_TYPE))
    users = _users(n, os.urandom(3).hex())
    finished = loop.create_future()
    state = {"next": 0, "left": n, "failures": 0}

    def make_done(channel: LeanChannel) -> Callable[[Answer | WireError], None]:
        activity = target.activity

        def done(result: Answer | WireError) -> None:
            if isinstance(result, WireError) or result.status != 200:
                state["failures"] += 1
            state["left"] -= 1
            i = state["next"]
            if i < n:
                state["next"] = i + 1
                channel.send(activity("bench", users[i], ACTIVITY_TYPE), done)
            elif state["left"] == 0 and not finished.done():
                finished.set_result(None)

        return done

    start = _clock()
    for channel in channels:
        i = state["next"]
        if i < n:
            state["next"] = i + 1
            channel.send(target.activity("bench", users[i], ACTIVITY_TYPE), make_done(channel))
    await finished
    _record(start, n)
    for channel in channels:
        await channel.aclose()
    return state["failures"]


async def _run_httpx(
    base_url: str, token: str, n: int, concurrency: int, transport: Callable[[], Any] | None
) -> int:
    headers = {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}
    clients = [
        httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=10.0,
            transport=transport() if transport is not None else None,
        )
        for _ in range(concurrency)
    ]
    for client in clients:
        await client.get(
            "/activities.add",
            params={"billingId": "bench", "userId": "warm-up", "activityTypeId": ACTIVITY_TYPE},
        )
    users = _users(n, os.urandom(3).hex())
    state = {"next": 0, "failures": 0}

    async def worker(client: httpx.AsyncClient) -> None:
        while state["next"] < n:
            i = state["next"]
            state["next"] = i + 1
            params = {"billingId": "bench", "userId": users[i], "activityTypeId": ACTIVITY_TYPE}
            try:
                response = await client.get("/activities.add", params=params)
                if response.status_code != 200:
                    state["failures"] += 1
            except httpx.HTTPError:
                state["failures"] += 1

    start = _clock()
    await asyncio.gather(*(worker(client) for client in clients))
    _record(start, n)
    for client in clients:
        await client.aclose()
    return state["failures"]


async def run_httpx(base_url: str, token: str, n: int, concurrency: int) -> int:
    """N requests over C bare httpx clients."""
    return await _run_httpx(base_url, token, n, concurrency, None)


def _lean_transport_factory() -> Callable[[], Any] | None:
    try:
        module = importlib.import_module("per_buffer._transport")
    except ImportError:
        return None
    factory: Callable[[], Any] = module.LeanTransport
    return factory


async def run_lean_transport(base_url: str, token: str, n: int, concurrency: int) -> int:
    """N requests over C httpx clients on the old LeanTransport."""
    return await _run_httpx(base_url, token, n, concurrency, _lean_transport_factory())


_LAST: dict[str, float] = {}
Clock = tuple[float, float, float, float]


def _clock() -> Clock:
    times = os.times()
    return time.process_time(), time.perf_counter(), times.user, times.system


def _record(start: Clock, n: int) -> None:
    end = _clock()
    wall = end[1] - start[1]
    _LAST["cpu_us"] = (end[0] - start[0]) / n * 1e6
    _LAST["user_us"] = (end[2] - start[2]) / n * 1e6
    _LAST["sys_us"] = (end[3] - start[3]) / n * 1e6
    _LAST["rps"] = n / wall if wall > 0 else float("inf")


def measure(runner: Runner, uvloop: bool, base_url: str, token: str, n: int, c: int) -> int:
    """Run one measurement on a fresh event loop; leaves its figures in ``_LAST``."""
    loop = new_event_loop(accelerate=uvloop)
    gc.collect()
    try:
        return loop.run_until_complete(runner(base_url, token, n, c))
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--runs", type=int, default=3, help="runs (medians are reported)")
    args = parser.parse_args(argv)

    variants: list[tuple[str, Runner, bool]] = [("channel (asyncio)", run_channel, False)]
    if accelerator() == "uvloop":
        variants.append(("channel (uvloop)", run_channel, True))
    variants.append(("httpx.AsyncClient", run_httpx, False))
    if _lean_transport_factory() is not None:
        variants.append(("LeanTransport via httpx", run_lean_transport, False))

    samples: dict[tuple[str, int], Sample] = {}
    with PerServerProcess(keep_activities=False) as server:
        for _, runner, uv in variants:  # warm-up pass, not reported
            measure(runner, uv, server.url, server.activity_token, 1000, max(args.concurrency))
        for run in range(args.runs):
            for c in args.concurrency:
                for name, runner, uv in variants:
                    n = args.requests if "channel" in name else max(args.requests // 4, 1000)
                    failures = measure(runner, uv, server.url, server.activity_token, n, c)
                    sample = samples.setdefault((name, c), Sample())
                    sample.cpu_us.append(_LAST["cpu_us"])
                    sample.user_us.append(_LAST["user_us"])
                    sample.sys_us.append(_LAST["sys_us"])
                    sample.rps.append(_LAST["rps"])
                    sample.failures += failures
                    print(
                        f"run {run + 1}/{args.runs} c={c:<3} {name:<24} "
                        f"{_LAST['cpu_us']:8.1f} us/req (user {_LAST['user_us']:.1f} "
                        f"sys {_LAST['sys_us']:.1f}) {_LAST['rps']:9.0f} req/s",
                        file=sys.stderr,
                    )

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print("**Wire CPU per request** (server in its own process, no latency; ", end="")
    print(f"{os.cpu_count()} CPUs, load average {load} at the end)")
    print()
    print(
        "| client | concurrency | CPU µs per request | (user + sys) | CPU s per 1,000 "
        "| requests/s | failures |"
    )
    print("|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        for name, _, _ in variants:
            sample = samples[(name, c)]
            cpu = statistics.median(sample.cpu_us)
            user = statistics.median(sample.user_us)
            system = statistics.median(sample.sys_us)
            rps = statistics.median(sample.rps)
            print(
                f"| {name} | {c} | {cpu:.1f} | ({user:.0f} + {system:.0f}) | {cpu / 1000:.4f} "
                f"| {rps:,.0f} | {sample.failures} |"
            )
    failures = sum(sample.failures for sample in samples.values())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
