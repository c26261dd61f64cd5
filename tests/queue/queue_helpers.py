"""Shared helpers of the durable queue tests, and their subprocess entry points.

Run as ``python tests/queue/queue_helpers.py ROLE ARGS...`` (roles below), or import
:func:`mp_worker` as a ``multiprocessing`` spawn target. Every role opens a real
``DurableQueue`` in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from per_buffer.models import Activity  # noqa: E402
from per_buffer.queue import Claim, DurableQueue, Entry  # noqa: E402
from per_buffer.queue._rows import Counters  # noqa: E402


class FakeClock:
    """An injectable unix clock."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def items(n: int, prefix: str = "u", stamp: float = 1_000.0) -> list[tuple[Activity, float]]:
    """``n`` activities with user ids ``prefix0..``, recorded at ``stamp``, ``stamp + 1``..."""
    return [(Activity("billing", f"{prefix}{i}", "api_call"), stamp + i) for i in range(n)]


def users(claim: Claim | None) -> list[str]:
    """User ids of a claim's entries."""
    assert claim is not None
    return [entry.activity.user_id for entry in claim.entries]


def ids(claim: Claim | None) -> list[int]:
    """Ids of a claim's entries."""
    assert claim is not None
    return [entry.id for entry in claim.entries]


def drain(queue: DurableQueue, size: int = 500) -> list[Entry]:
    """Claim and ack everything, waiting retries included."""
    out: list[Entry] = []
    while (claim := queue.claim(size, ignore_not_before=True)) is not None:
        out.extend(claim.entries)
        queue.ack(claim, [entry.id for entry in claim.entries])
    return out


def generation(directory: Path) -> Path:
    """The one live database folder of a queue directory."""
    (gen,) = sorted(directory.glob("db-*"))
    return gen


def counters(queue: DurableQueue) -> Counters:
    """The stored counters row of a queue's live database."""
    return Counters.load(queue._storage.cache)


def run_helper(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a role of this module in a fresh interpreter; assert it succeeded."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(HELPERS), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result


def item(user: str, stamp: float = 1_000.0) -> tuple[Activity, float]:
    """One activity whose user id is ``user`` (unique ids make delivery checkable)."""
    return Activity("billing", user, "api_call"), stamp


def claim_and_exit(directory: str, count: int, close: bool = False) -> None:
    """Claim ``count`` entries, print their ids as JSON, exit without releasing them.

    Without ``close`` the process dies without cleanup (leaving the WAL behind).
    """
    queue = DurableQueue(directory)
    claim = queue.claim(count)
    claimed = [] if claim is None else [entry.id for entry in claim.entries]
    sys.stdout.write(json.dumps(claimed) + "\n")
    sys.stdout.flush()
    if close:
        queue.close()
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
            stored = queue.put([item(user, time.time()) for user in users]).stored
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
            queue.ack(claim, delivered, coalesced=rng.random() < 0.1)
            if retry:
                queue.release(
                    claim,
                    retry,
                    not_before=time.time() + 0.05,
                    error="HTTP 503",
                    refused=rng.random() < 0.3,
                )
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
            stored = queue.put([item(user) for user in users]).stored
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
        claim_and_exit(args[0], int(args[1]), args[2:] == ["close"])
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
