"""Who holds a lease: this process's identity, and whether another process on this host runs.

A lease records the host, pid and start time (clock ticks since boot, from ``/proc``) of
the process that claimed it; a lease whose process is gone can be reclaimed at once
instead of waiting for its expiry. Pid reuse is told apart by the start time.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    try:
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def process_gone(pid: int, start: int | None) -> bool:
    """True when ``pid`` (started at ``start`` ticks, if known) no longer runs here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # EPERM: it exists, owned by someone else
    state = proc_state(pid)
    if state is None:
        return False
    letter, started = state
    if letter in ("Z", "X"):
        return True  # exited, not yet reaped
    return start is not None and started != start


def boot_time() -> float | None:
    """Unix time of the last boot (``/proc/stat``), None if unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class ProcessIdentity:
    """This process as a lease owner.

    Attributes:
        host: the host name.
        pid: the process id.
        start_ticks: the process start time in clock ticks since boot, None if unknown.
        owner: the default lease owner, ``host:pid:nonce``.
    """

    host: str
    pid: int
    start_ticks: int | None
    owner: str

    @classmethod
    def current(cls) -> ProcessIdentity:
        """The identity of the calling process (a fresh nonce each call)."""
        host = socket.gethostname()
        pid = os.getpid()
        state = proc_state(pid)
        return cls(
            host=host,
            pid=pid,
            start_ticks=None if state is None else state[1],
            owner=f"{host}:{pid}:{secrets.token_hex(4)}",
        )

    def owner_gone(self, host: Any, pid: Any, start: Any) -> bool:
        """True when the process ``(host, pid, start)`` of a lease is known to be gone.

        Only processes on this host can be checked; elsewhere the lease must expire.
        """
        try:
            pid = int(pid)
        except (TypeError, ValueError):
            return False
        if host != self.host:
            return False
        start_ticks = start if isinstance(start, int) else None
        if pid == self.pid:
            return (
                start_ticks is not None
                and self.start_ticks is not None
                and start_ticks != self.start_ticks
            )
        return process_gone(pid, start_ticks)
