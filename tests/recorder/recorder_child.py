"""Subprocess entry points for recorder tests (crash, fork, atexit, multi-process).

Run as ``python tests/recorder/recorder_child.py MODE URL DIR [ARGS...]``.
"""

from __future__ import annotations

import sys
import time

from per_buffer import Recorder
from per_buffer.testing import DEFAULT_ACTIVITY_TOKEN


def _recorder(url: str, directory: str, **options: object) -> Recorder:
    return Recorder(
        DEFAULT_ACTIVITY_TOKEN,
        "login",
        directory=directory,
        base_url=url,
        backoff_initial=0.05,
        backoff_max=0.5,
        poll_interval=0.05,
        **options,  # type: ignore[arg-type]
    )


def record_until_killed(url: str, directory: str, durability: str, log_path: str) -> None:
    """Record unique users forever; log each one (with the time) after record() returned."""
    rec = _recorder(url, directory, durability=durability, coalesce_window=0)
    with open(log_path, "w", buffering=1) as log:
        i = 0
        while True:
            rec.record("acme", f"user-{i}")
            log.write(f"{i} {time.time():.6f}\n")
            i += 1
            if i % 50 == 0:
                time.sleep(0.001)


def record_and_exit(url: str, directory: str, count: str, prefix: str) -> None:
    """Record ``count`` users and leave without flush: the atexit handler must deliver."""
    rec = _recorder(url, directory, exit_timeout=10.0)
    for i in range(int(count)):
        rec.record("acme", f"{prefix}-{i}")


def record_and_flush(url: str, directory: str, count: str, prefix: str) -> None:
    """Record ``count`` users, flush, exit 0 only if the flush succeeded."""
    rec = _recorder(url, directory)
    for i in range(int(count)):
        rec.record("acme", f"{prefix}-{i}")
    ok = rec.flush(timeout=30)
    rec.close()
    sys.exit(0 if ok else 3)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "until-killed":
        record_until_killed(*args)
    elif mode == "exit":
        record_and_exit(*args)
    elif mode == "flush":
        record_and_flush(*args)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
