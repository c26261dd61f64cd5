"""How many ``activities.add`` requests per second the local Per server sustains.

Starts ``python -m per_buffer.testing`` (via :class:`PerServerProcess`) and
hammers it from client processes that are built not to be the bottleneck:
each keeps several raw keep-alive sockets, one request in flight per socket
(no pipelining), and sends pre-built request bytes driven by a selector::

    python benchmarks/server_rps.py --seconds 5 --connections 8

Prints a Markdown table. The server must sustain >= 5,000 requests/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import selectors
import socket
import sys
import time
from multiprocessing.synchronize import Barrier
from urllib.parse import urlencode, urlsplit

from per_buffer.testing import PerServerProcess

TARGET_RPS = 5_000


def build_requests(host: str, port: int, token: str, worker: int, n: int = 1_000) -> list[bytes]:
    """Pre-built keep-alive GET requests for ``n`` distinct users."""
    requests = []
    for i in range(n):
        query = urlencode(
            {
                "billingId": f"org-{i % 10}",
                "userId": f"w{worker}-user-{i}",
                "activityTypeId": "login",
            }
        )
        requests.append(
            (
                f"GET /activities.add?{query} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\n"
                "User-Agent: server-rps-bench\r\n"
                "Accept: */*\r\n"
                f"Authorization: Bearer {token}\r\n"
                "\r\n"
            ).encode()
        )
    return requests


def _complete_response(buf: bytes) -> tuple[bytes, bytes] | None:
    """Split one complete response off ``buf``: ``(head, rest)``, or ``None`` if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end]
    marker = head.lower().find(b"content-length:")
    length = 0
    if marker >= 0:
        line_end = head.find(b"\r\n", marker)
        length = int(head[marker + 15 : line_end if line_end >= 0 else len(head)])
    total = end + 4 + length
    if len(buf) < total:
        return None
    return buf[:total], buf[total:]


def client_worker(
    url: str,
    token: str,
    worker: int,
    connections: int,
    seconds: float,
    barrier: Barrier,
    results: multiprocessing.Queue[tuple[int, int, float]],
) -> None:
    """Run ``connections`` keep-alive sockets for ``seconds``; put (ok, errors, elapsed)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = build_requests(host, port, token, worker)
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(connections):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
    buffers = dict.fromkeys(range(connections), b"")
    for index, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, index)
    ok = errors = 0
    cursor = 0
    barrier.wait()
    started = time.perf_counter()
    deadline = started + seconds
    for sock in socks:
        sock.sendall(requests[cursor % len(requests)])
        cursor += 1
    in_flight = connections
    sending = True
    while in_flight:
        for key, _ in sel.select(timeout=1.0):
            index = key.data
            sock = socks[index]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                errors += 1
                in_flight -= 1
                sel.unregister(sock)
                continue
            buf = buffers[index] + data
            split = _complete_response(buf)
            if split is None:
                buffers[index] = buf
                continue
            response, buffers[index] = split
            if response.startswith(b"HTTP/1.1 200 ") and b'"ok":true' in response:
                ok += 1
            else:
                errors += 1
            if sending and time.perf_counter() < deadline:
                sock.sendall(requests[cursor % len(requests)])
                cursor += 1
            else:
                sending = False
                in_flight -= 1
    elapsed = time.perf_counter() - started
    for sock in socks:
        sock.close()
    results.put((ok, errors, elapsed))


def run(
    seconds: float, connections: int, processes: int, keep_activities: bool
) -> dict[str, float]:
    """Benchmark one configuration; return the row's figures."""
    ctx = multiprocessing.get_context("spawn")
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    shares = [n for n in shares if n]
    with PerServerProcess(keep_activities=keep_activities) as server:
        barrier = ctx.Barrier(len(shares) + 1)
        results: multiprocessing.Queue[tuple[int, int, float]] = ctx.Queue()
        workers = [
            ctx.Process(
                target=client_worker,
                args=(server.url, server.activity_token, i, n, seconds, barrier, results),
            )
            for i, n in enumerate(shares)
        ]
        for worker in workers:
            worker.start()
        before = server.stats()["counters"]
        barrier.wait()
        outcomes = [results.get(timeout=seconds + 60) for _ in workers]
        for worker in workers:
            worker.join()
        after = server.stats()["counters"]
    ok = sum(o for o, _, _ in outcomes)
    errors = sum(e for _, e, _ in outcomes)
    elapsed = max(t for _, _, t in outcomes)
    return {
        "connections": connections,
        "requests": ok + errors,
        "seconds": elapsed,
        "rps": (ok + errors) / elapsed,
        "errors": errors,
        "server_requests": after["requests"] - before["requests"],
        "server_ok": after["ok"] - before["ok"],
    }


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the benchmark, print the table; exit 1 below the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[8], help="one or more connection counts"
    )
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument(
        "--keep-activities", action="store_true", help="keep the per-activity list server-side"
    )
    options = parser.parse_args(argv)
    rows = [
        run(options.seconds, n, min(options.processes, n), options.keep_activities)
        for n in options.connections
    ]
    print("| connections | requests | seconds | requests/s | errors |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['connections']:.0f} | {row['requests']:,.0f} | {row['seconds']:.2f} "
            f"| {row['rps']:,.0f} | {row['errors']:.0f} |"
        )
    for row in rows:
        if row["server_requests"] != row["requests"]:
            print(
                f"\nnote: with {row['connections']:.0f} connections the server counted "
                f"{row['server_requests']:,.0f} requests, the clients {row['requests']:,.0f}"
            )
    worst = min(row["rps"] for row in rows)
    verdict = "meets" if worst >= TARGET_RPS else "is BELOW"
    print(f"\nslowest configuration: {worst:,.0f} requests/s ({verdict} the {TARGET_RPS:,} target)")
    return 0 if worst >= TARGET_RPS else 1


if __name__ == "__main__":
    sys.exit(main())
