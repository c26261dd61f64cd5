"""Does DurableQueue cost the same with a large backlog as with an empty queue?

Usage::

    python benchmarks/queue_backlog.py [--items 1000000] [--rounds 200] [--json PATH]

Measures, on an empty queue and again with ``--items`` entries pending: put throughput
(batches of 512), claim+ack throughput (claims of 128), p50/p99 per call of put(512),
claim(128) and ack(128), RSS, and bytes on disk per pending item. Prints a Markdown
table with the ratio backlog/empty and whether the 1.5x target is met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from per_buffer.models import Activity
from per_buffer.queue import DurableQueue

PUT_BATCH = 512
CLAIM_SIZE = 128
TARGET_RATIO = 1.5


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def batch(start: int) -> list[tuple[Activity, float]]:
    """512 realistic items with unique user ids."""
    now = time.time()
    return [
        (Activity(f"billing-{(start + i) % 97}", f"user-{start + i}", "api_call"), now)
        for i in range(PUT_BATCH)
    ]


def pct(values: list[float], q: float) -> float:
    """Percentile ``q`` (0-100) of ``values``, in microseconds."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index] * 1e6


def measure(queue: DurableQueue, rounds: int, counter: list[int]) -> dict[str, float]:
    """Put ``rounds`` batches, then claim+ack as many items; timings of each call.

    Throughput is items divided by the summed time spent inside the queue calls (the
    batches are built outside the timed region).
    """
    put_times: list[float] = []
    for _ in range(rounds):
        items = batch(counter[0])
        counter[0] += PUT_BATCH
        t0 = time.perf_counter()
        queue.put(items)
        put_times.append(time.perf_counter() - t0)

    claim_times: list[float] = []
    ack_times: list[float] = []
    done = 0
    target = rounds * PUT_BATCH
    while done < target:
        t0 = time.perf_counter()
        claim = queue.claim(CLAIM_SIZE)
        t1 = time.perf_counter()
        assert claim is not None
        ids = [entry.id for entry in claim.entries]
        t2 = time.perf_counter()
        queue.ack(claim, ids)
        t3 = time.perf_counter()
        claim_times.append(t1 - t0)
        ack_times.append(t3 - t2)
        done += len(ids)
    return {
        "put_items_per_s": target / sum(put_times),
        "claim_ack_items_per_s": done / (sum(claim_times) + sum(ack_times)),
        "put_p50_us": pct(put_times, 50),
        "put_p99_us": pct(put_times, 99),
        "claim_p50_us": pct(claim_times, 50),
        "claim_p99_us": pct(claim_times, 99),
        "ack_p50_us": pct(ack_times, 50),
        "ack_p99_us": pct(ack_times, 99),
    }


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="backlog size")
    parser.add_argument("--rounds", type=int, default=600, help="put batches per phase")
    parser.add_argument("--dir", default=None, help="queue directory (default: a temp dir)")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = parser.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="queue-backlog-"))
    directory = base / "queue"
    shutil.rmtree(directory, ignore_errors=True)
    counter = [0]
    results: dict[str, Any] = {"items": args.items, "rounds": args.rounds}
    try:
        queue = DurableQueue(directory, max_items=args.items * 2 + 1_000_000, max_bytes=2**40)
        results["rss_start"] = rss_bytes()
        measure(queue, 20, counter)  # warm-up
        empty = measure(queue, args.rounds, counter)
        results["rss_after_empty"] = rss_bytes()

        t0 = time.perf_counter()
        filled = 0
        while filled < args.items:
            filled += queue.put(batch(counter[0])).stored
            counter[0] += PUT_BATCH
        fill_seconds = time.perf_counter() - t0
        results["fill_items_per_s"] = filled / fill_seconds
        results["rss_after_fill"] = rss_bytes()
        stats = queue.stats()
        results["backlog_pending"] = stats.pending
        results["bytes_on_disk"] = stats.bytes_on_disk
        results["bytes_per_item"] = stats.bytes_on_disk / max(1, stats.pending)

        backlog = measure(queue, args.rounds, counter)
        results["rss_after_backlog"] = rss_bytes()
        results["empty"] = empty
        results["backlog"] = backlog
        queue.close()
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    higher_is_better = {"put_items_per_s", "claim_ack_items_per_s"}
    lines = [
        f"DurableQueue with {args.items:,} pending vs empty "
        f"(put batches of {PUT_BATCH}, claims of {CLAIM_SIZE}, {args.rounds} batches per phase)",
        "",
        "| metric | empty | backlog | ratio backlog/empty | within 1.5x |",
        "|---|---:|---:|---:|:---:|",
    ]
    for key in empty:
        a, b = empty[key], backlog[key]
        # ratio expressed as "cost" ratio: >1 means the backlog is slower
        ratio = a / b if key in higher_is_better else b / a
        ok = "yes" if ratio <= TARGET_RATIO else "NO"
        lines.append(f"| {key} | {a:,.0f} | {b:,.0f} | {ratio:.2f} | {ok} |")
        results.setdefault("ratios", {})[key] = ratio
    mib = 1024 * 1024
    lines += [
        "",
        f"- fill rate: {results['fill_items_per_s']:,.0f} items/s "
        f"({args.items:,} items in {fill_seconds:.1f} s)",
        f"- RSS: start {results['rss_start'] / mib:.1f} MiB, after empty phase "
        f"{results['rss_after_empty'] / mib:.1f} MiB, after fill "
        f"{results['rss_after_fill'] / mib:.1f} MiB, after backlog phase "
        f"{results['rss_after_backlog'] / mib:.1f} MiB",
        f"- on disk with {results['backlog_pending']:,} pending: "
        f"{results['bytes_on_disk'] / mib:.1f} MiB, {results['bytes_per_item']:.0f} bytes/item",
    ]
    print("\n".join(lines))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    met = all(ratio <= TARGET_RATIO for ratio in results["ratios"].values())
    print(f"\n1.5x target {'met' if met else 'NOT met'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
