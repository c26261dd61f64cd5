"""Subprocess entry points for the durable queue tests.

Run as ``python tests/queue_helpers.py ROLE ARGS...`` (roles below), or import
:func:`mp_worker` as a ``multiprocessing`` spawn target. Every role opens a real
``DurableQueue`` in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from per_buffer.models import Activity  # noqa: E402
from per_buffer.queue import DurableQueue  # noqa: E402


def item(user: str, stamp: float = 1_000.0) -> tuple[Activity, float]:
    """One activity whose user id is ``user`` (unique ids make delivery checkable)."""
    return Activity("billing", user, "api_call"), stamp


def claim_and_exit(directory: str, count: int) -> None:
    """Claim ``count`` entries, print their ids as JSON, die without cleanup."""
    queue = DurableQueue(directory)
    claim = queue.claim(count)
    ids = [] if claim is None else [entry.id for entry in claim.entries]
    sys.stdout.write(json.dumps(ids) + "\n")
    sys.stdout.flush()
    os._exit(0)


def fill(directory: str, batches: int, size: int, close: bool) -> None:
    """Put ``batches`` x ``size`` items; close cleanly or die leaving the WAL behind."""
    queue = DurableQueue(directory)
    for number in range(batches):
        queue.put([item(f"fill-{number}-{i}") for i in range(size)])
    if close:
        queue.close()
        sys.exit(0)
    os._exit(0)


def producer(directory: str, log_path: str, tag: str) -> None:
    """Put unique ids forever; log each batch only after put returned."""
    queue = DurableQueue(directory, lock_timeout=30.0)
    rng = random.Random()
    sequence = 0
    with open(log_path, "a", encoding="ascii") as log:
        while True:
            size = rng.randint(1, 40)
            users = [f"{tag}.{sequence + i}" for i in range(size)]
            sequence += size
            stored = queue.put([item(user, time.time()) for user in users])
            if stored != len(users):
                raise SystemExit(f"put stored {stored} of {len(users)}")
            log.write("".join(f"{user}\n" for user in users))
            log.flush()


def consumer(directory: str, log_path: str) -> None:
    """Claim forever; log deliveries before acking; sometimes release or dead-letter."""
    queue = DurableQueue(directory, lock_timeout=30.0, lease_seconds=3600.0)
    rng = random.Random()
    with open(log_path, "a", encoding="ascii") as log:
        while True:
            claim = queue.claim(rng.randint(1, 64), ignore_not_before=rng.random() < 0.2)
            if claim is None:
                time.sleep(0.002)
                continue
            delivered: list[int] = []
            retry: list[int] = []
            dead: list[int] = []
            lines = []
            for entry in claim.entries:
                roll = rng.random()
                if roll < 0.08:
                    retry.append(entry.id)
                elif roll < 0.10:
                    dead.append(entry.id)
                else:
                    delivered.append(entry.id)
                    lines.append(f"{entry.activity.user_id}\n")
            log.write("".join(lines))
            log.flush()
            queue.ack(claim, delivered)
            if retry:
                queue.release(claim, retry, not_before=time.time() + 0.05, error="HTTP 503")
            if dead:
                queue.dead_letter(claim, dead, "invalid_parameter")


def mp_worker(
    directory: str, index: int, barrier: Any, out_path: str, count: int, batch: int
) -> None:
    """Multi-process test: open at the same moment, put ``count`` ids, claim and ack.

    Writes ``{"put": [...], "claims": [[t_claimed, t_acking, [user ids]], ...]}`` with
    ``time.monotonic()`` stamps (system-wide on Linux) to ``out_path``; an exception is
    written as ``{"error": ...}``.
    """
    result: dict[str, Any] = {"put": [], "claims": []}
    try:
        barrier.wait(timeout=60)
        queue = DurableQueue(directory, lock_timeout=30.0)
        rng = random.Random(index)

        def claim_some() -> bool:
            claim = queue.claim(rng.randint(1, 100))
            if claim is None:
                return False
            claimed = time.monotonic()
            users = [entry.activity.user_id for entry in claim.entries]
            acking = time.monotonic()
            queue.ack(claim, [entry.id for entry in claim.entries])
            result["claims"].append([claimed, acking, users])
            return True

        for start in range(0, count, batch):
            users = [f"w{index}.{n}" for n in range(start, min(count, start + batch))]
            stored = queue.put([item(user) for user in users])
            if stored != len(users):
                raise RuntimeError(f"put stored {stored} of {len(users)}")
            result["put"].extend(users)
            claim_some()
        while claim_some():
            pass
        queue.close()
    except BaseException as exc:  # reported to the parent, which fails the test
        result["error"] = f"{type(exc).__name__}: {exc}"
    Path(out_path).write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    """Dispatch ``ROLE ARGS...``."""
    role, args = argv[0], argv[1:]
    if role == "claim_and_exit":
        claim_and_exit(args[0], int(args[1]))
    elif role == "fill":
        fill(args[0], int(args[1]), int(args[2]), args[3] == "close")
    elif role == "producer":
        producer(args[0], args[1], args[2])
    elif role == "consumer":
        consumer(args[0], args[1])
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
