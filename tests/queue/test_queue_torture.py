"""SIGKILL torture: real producer and consumer processes killed at random moments.

Producers log an id only after ``put`` returned; consumers log an id before acking it.
After many rounds of kills and restarts, a final drain must show every logged id
delivered at least once. Seed with ``PER_TORTURE_SEED`` to replay a run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from per_buffer.queue import DurableQueue

HELPERS = Path(__file__).with_name("queue_helpers.py")
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = int(os.environ.get("PER_TORTURE_ROUNDS", "22"))
ROLES = {"p0": "producer", "p1": "producer", "c0": "consumer", "c1": "consumer"}


def read_ids(paths: list[Path]) -> list[str]:
    """Complete lines only: a kill may cut the last one short."""
    out: list[str] = []
    for path in paths:
        text = path.read_text(encoding="ascii", errors="replace")
        lines = text.split("\n")
        out += [line for line in lines[:-1] if line]
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_torture(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    seed = int(os.environ.get("PER_TORTURE_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    qdir, logs = tmp_path / "queue", tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    incarnation: Counter[str] = Counter()
    errs: dict[str, Path] = {}

    def start(name: str) -> None:
        incarnation[name] += 1
        tag = f"{name}-{incarnation[name]}"
        log = logs / f"{tag}.log"
        errs[name] = logs / f"{tag}.err"
        args = [sys.executable, str(HELPERS), ROLES[name], str(qdir), str(log)]
        if ROLES[name] == "producer":
            args.append(tag)
        with open(errs[name], "wb") as err:
            procs[name] = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def check_alive() -> None:
        for name, proc in procs.items():
            code = proc.poll()
            if code is not None:
                pytest.fail(f"{name} exited by itself ({code}): {errs[name].read_text()[-3000:]}")

    kills = 0
    started = time.monotonic()
    try:
        for name in ROLES:
            start(name)
        for _ in range(ROUNDS):
            time.sleep(rng.uniform(0.05, 0.6))
            check_alive()
            for name in rng.sample(sorted(ROLES), rng.randint(1, 2)):
                procs[name].send_signal(signal.SIGKILL)
                assert procs[name].wait(10) == -signal.SIGKILL
                kills += 1
                start(name)
        time.sleep(0.3)
        check_alive()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    torture_seconds = time.monotonic() - started

    produced = read_ids(sorted(logs.glob("p*.log")))
    delivered = Counter(read_ids(sorted(logs.glob("c*.log"))))
    with DurableQueue(qdir) as queue:  # reclaims the dead consumers' leases
        requeued = queue.requeue_dead_letters()
        drained: list[str] = []
        while (claim := queue.claim(1000, ignore_not_before=True)) is not None:
            drained += [entry.activity.user_id for entry in claim.entries]
            queue.ack(claim, [entry.id for entry in claim.entries])
        stats = queue.stats()
    delivered.update(drained)

    missing = [user for user in produced if user not in delivered]
    duplicates = sum(count - 1 for count in delivered.values() if count > 1)
    report = {
        "seed": seed,
        "rounds": ROUNDS,
        "kills": kills,
        "seconds": round(torture_seconds, 1),
        "produced": len(produced),
        "delivered_by_consumers": sum(delivered.values()) - len(drained),
        "drained_at_end": len(drained),
        "dead_letters_requeued": requeued,
        "duplicates": duplicates,
        "duplicate_rate": round(duplicates / max(1, len(produced)), 5),
        "missing": len(missing),
    }
    for key, value in report.items():
        record_property(key, value)
    print("\nSIGKILL torture:", ", ".join(f"{k}={v}" for k, v in report.items()))

    assert not missing, f"{len(missing)} acknowledged puts never delivered, e.g. {missing[:5]}"
    assert len(produced) > 500, "the producers hardly ran: the test proves nothing"
    assert (stats.pending, stats.in_flight, stats.dead_lettered) == (0, 0, 0)
    assert stats.quarantined == 0 and not list(qdir.glob("quarantine-*"))
