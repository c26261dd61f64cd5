"""The two locks a queue directory uses to elect its drainer and see who records into it.

Both are ``flock`` locks on files in the queue directory, so the kernel releases them
when a process dies, however it dies:

* ``drainer.lock``: held exclusively by the one drainer of the directory for its
  whole life. A recorder that can take it for a moment knows no drainer is alive.
* ``recorders.lock``: held *shared* by every process with an open recorder on the
  directory. A drainer that can take it exclusively for a moment knows that nobody
  records into the directory any more.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Final

__all__ = ["DRAINER_LOCK", "FLUSH_REQUEST", "RECORDERS_LOCK", "FileLock", "supported"]

DRAINER_LOCK: Final = "drainer.lock"
RECORDERS_LOCK: Final = "recorders.lock"
FLUSH_REQUEST: Final = "flush.request"

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover (no drainer process on Windows: thread delivery)
    fcntl = None


def supported() -> bool:
    """True where a drainer process can be elected (POSIX ``flock``)."""
    return fcntl is not None


class FileLock:
    """A ``flock`` on one file, kept open; never blocks unless asked to."""

    __slots__ = ("_fd", "_held", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._held = False

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def try_exclusive(self) -> bool:
        """Take the lock exclusively if nobody holds it; never waits."""
        return self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB)

    def try_shared(self) -> bool:
        """Take the lock shared if nobody holds it exclusively; never waits."""
        return self._lock(fcntl.LOCK_SH | fcntl.LOCK_NB)

    def _lock(self, how: int) -> bool:
        assert fcntl is not None
        fd = self._open()
        try:
            fcntl.flock(fd, how)
        except BlockingIOError:
            return False
        self._held = True
        return True

    def free(self) -> bool:
        """True when nobody holds the lock (checked by taking and releasing it)."""
        if self._held:
            return False
        if self.try_exclusive():
            self.release()
            return True
        return False

    def release(self) -> None:
        """Release the lock (keeps the file open for the next try)."""
        if self._fd is not None and self._held and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._held = False

    def close(self) -> None:
        """Release the lock and close the file."""
        fd, self._fd = self._fd, None
        self._held = False
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: keep the inherited descriptor (and the lock it holds) alive
        for as long as this process runs, and use a fresh one from now on."""
        self._fd = None
        self._held = False
