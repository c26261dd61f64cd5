"""Drainer processes the benchmarks start (through a Recorder in the default mode).

A recorder in the ``process`` delivery mode spawns ``python -m per_buffer.drainer``
with the queue directory as its working directory. The helpers here find those
processes by that working directory (always one of the benchmark's own scratch
directories, so nothing else is ever touched), read their CPU time and memory from
``/proc``, and end them by pid when a scenario leaves them behind (a drainer with
work left lingers for a minute after its last recorder closes).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

__all__ = [
    "cpu_seconds",
    "drainer_pids",
    "end_drainers",
    "peak_rss_mb_of",
    "wait_for_first_claim",
]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_MODULE = b"per_buffer.drainer"


def drainer_pids(under: Path) -> list[int]:
    """Pids of drainer processes whose working directory is ``under`` or below it."""
    root = str(Path(under).resolve())
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            if _MODULE not in argv:
                continue
            cwd = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            found.append(pid)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), or NaN.

    From ``/proc/<pid>/stat`` (fields 14 and 15, in clock ticks: 10 ms resolution).
    """
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return math.nan
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_mb_of(pid: int) -> float:
    """The resident set's high-water mark of process ``pid`` (``VmHWM``), in MiB, or NaN."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def wait_for_first_claim(directory: Path, before: tuple[int, int], timeout: float) -> float | None:
    """``perf_counter()`` when the directory's counts first differ from ``before``, or None.

    Polls ``(pending, in_flight)`` every millisecond through a read-only handle: the first
    change is the delivery worker's first claim, i.e. the moment delivery started. (The
    drainer's election lock is not probed: taking it, even for a moment, can make a
    starting drainer lose its election.)
    """
    from per_buffer.queue import DurableQueue  # noqa: PLC0415

    deadline = time.perf_counter() + timeout
    with DurableQueue(directory) as probe:
        while True:
            now = time.perf_counter()
            if probe.counts() != before:
                return now
            if now >= deadline:
                return None
            time.sleep(0.001)


def end_drainers(under: Path, grace: float = 1.0, timeout: float = 5.0) -> int:
    """Let drainers under ``under`` stop by themselves for ``grace`` s, then end them.

    A drainer stops on its own once no recorder is attached and nothing is left to
    deliver; one with work left (an unreachable server, a capped drain) would linger
    for a minute in a directory about to be deleted. Those get SIGTERM (the drainer
    hands its claims back and exits), and SIGKILL after ``timeout`` s. Returns how
    many had to be signalled.
    """
    deadline = time.monotonic() + grace
    pids = drainer_pids(under)
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = drainer_pids(under)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [pid for pid in left if _alive(pid)]
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] != "Z"
