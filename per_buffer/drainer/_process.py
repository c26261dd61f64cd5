"""The drainer: one process per queue directory that delivers what recorders commit.

Started automatically by a recorder (``python -m per_buffer.drainer``, its settings
and token read from standard input, never from the command line), or run in the
foreground by ``per-buffer drain --follow`` (a sidecar container, a systemd unit).
It holds ``drainer.lock`` for its whole life, so a directory has at most one; it runs
the same :class:`~per_buffer.delivery.DeliveryWorker` as in-process delivery, in its
main thread, with its own host-wide coalescing; and a watchdog thread:

* turns a recorder's flush request (``flush.request`` touched) into flush mode;
* stops it when no recorder is attached (``recorders.lock`` free) and the queue holds
  nothing undelivered, or when no recorder has been attached for ``linger`` seconds
  and nothing could be delivered meanwhile (Per down: the backlog waits on disk for
  the next recorder). ``follow`` (the foreground command) never stops on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..delivery import DeliverySettings, DeliveryWorker
from ..errors import QueueError
from ..queue import DurableQueue
from ._locks import DRAINER_LOCK, FLUSH_REQUEST, RECORDERS_LOCK, FileLock

__all__ = ["BUSY", "IDENTITY", "DrainerOptions", "main", "read_identity", "run"]

logger = logging.getLogger("per_buffer.drainer")

_WATCH = 0.25  # seconds between the watchdog's looks
_FLUSH_FOR = 2.0  # seconds of flush mode after each flush request
_IDLE_POLL = 0.05  # the drainer hears of no commit: it looks at the queue this often

#: What :func:`run` returns when another drainer already holds the directory.
BUSY = 75
#: The drainer's log file in the queue directory.
LOG_NAME = "drainer.log"
#: The running drainer's identity file in the queue directory.
IDENTITY = "drainer.id"
_ELECTION_TRIES = 20
_ELECTION_PAUSE = 0.01


@dataclass(frozen=True)
class DrainerOptions:
    """How a drainer runs (the part of a recorder's settings it needs).

    Attributes:
        directory: the queue directory.
        settings: the delivery settings (token included).
        max_queue_items, max_queue_bytes, full_policy, lease_seconds: the queue's bounds.
        nice: added to the process's niceness (0: none), so delivery uses idle CPU first.
        linger: seconds without any attached recorder and without a delivery before a
            drainer with work left gives up until the next recorder starts one.
        follow: run until stopped (the foreground command), never stop when idle.
        spawned_at: unix time the spawning recorder was made: with different settings
            (a rotated token, another URL), a newer recorder takes the directory over.
    """

    directory: Path
    settings: DeliverySettings
    max_queue_items: int = 10_000_000
    max_queue_bytes: int = 2 * 1024**3
    full_policy: str = "drop_newest"
    lease_seconds: float = 300.0
    nice: int = 0
    linger: float = 60.0
    follow: bool = False
    spawned_at: float = 0.0

    @property
    def fingerprint(self) -> str:
        """A keyed hash of what decides where and how activities go (token, URL, proxy):
        recorders compare it without learning the token."""
        s = self.settings
        text = f"{s.base_url}\n{s.proxy or ''}\n{s.token}"
        return hashlib.blake2b(text.encode(), digest_size=8, person=b"per-drainer-id").hexdigest()

    def to_json(self) -> str:
        """One line of JSON for the spawned process's standard input (holds the token)."""
        settings = {
            f.name: getattr(self.settings, f.name)
            for f in fields(self.settings)
            if f.name not in ("on_error", "clock")
        }
        return json.dumps(
            {
                "directory": str(self.directory),
                "settings": settings,
                "max_queue_items": self.max_queue_items,
                "max_queue_bytes": self.max_queue_bytes,
                "full_policy": self.full_policy,
                "lease_seconds": self.lease_seconds,
                "nice": self.nice,
                "linger": self.linger,
                "spawned_at": self.spawned_at,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> DrainerOptions:
        """The options a spawning recorder wrote (see :meth:`to_json`)."""
        data: dict[str, Any] = json.loads(text)
        data["directory"] = Path(data["directory"])
        data["settings"] = DeliverySettings(**data["settings"])
        return cls(**data)


def run(options: DrainerOptions, *, ready: Any = None) -> int:
    """Elect this process drainer of ``options.directory`` and deliver until done.

    Returns 0 when it ran until done or stopped, :data:`BUSY` when another drainer
    holds the directory. ``ready``: a writable text stream told ``ready <pid>`` or
    ``busy``.
    """
    directory = options.directory
    elected = FileLock(directory / DRAINER_LOCK)
    if not _elect(elected):
        _tell(ready, "busy")
        return BUSY
    try:
        _write_identity(directory, options)
        if options.nice > 0:
            with contextlib.suppress(OSError):
                os.nice(options.nice)
        queue = DurableQueue(
            directory,
            max_items=options.max_queue_items,
            max_bytes=options.max_queue_bytes,
            full_policy=options.full_policy,  # type: ignore[arg-type]
            lease_seconds=options.lease_seconds,
            lock_timeout=2.0,
            max_delay=options.settings.backoff_max,
        )
        worker = DeliveryWorker(queue, options.settings, idle_poll=_IDLE_POLL)
        _tell(ready, f"ready {os.getpid()}")
        watchdog = _Watchdog(options, queue, worker)
        threading.Thread(target=watchdog.run, name="per-buffer-watchdog", daemon=True).start()
        _stop_on_signals(worker)
        worker.run()
        watchdog.stop()
        queue.close()
        return 0
    finally:
        elected.close()


def _elect(lock: FileLock) -> bool:
    """Take the election lock; a recorder looking whether a drainer runs holds it for
    microseconds, so a failed try is repeated for a moment before giving up."""
    for _ in range(_ELECTION_TRIES):
        if lock.try_exclusive():
            return True
        time.sleep(_ELECTION_PAUSE)
    return False


def _write_identity(directory: Path, options: DrainerOptions) -> None:
    """``drainer.id``: which process drains and with which settings (hashed)."""
    identity = {
        "pid": os.getpid(),
        "fingerprint": options.fingerprint,
        "spawned_at": options.spawned_at,
    }
    path = directory / IDENTITY
    temporary = path.with_name(f".{IDENTITY}.{os.getpid()}")
    with contextlib.suppress(OSError):
        temporary.write_text(json.dumps(identity))
        os.replace(temporary, path)


def read_identity(directory: Path) -> dict[str, Any] | None:
    """The running drainer's ``drainer.id`` (pid, settings fingerprint), if readable."""
    try:
        value = json.loads((directory / IDENTITY).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _tell(stream: Any, line: str) -> None:
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        stream.write(line + "\n")
        stream.flush()
        stream.close()


def _stop_on_signals(worker: DeliveryWorker) -> None:
    def stop(signum: int, frame: object) -> None:
        worker.stop(0.0)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)


class _Watchdog:
    """Flush requests and the decision to stop, from a thread beside the worker."""

    def __init__(self, options: DrainerOptions, queue: DurableQueue, worker: DeliveryWorker):
        self._options = options
        self._queue = queue
        self._worker = worker
        self._recorders = FileLock(options.directory / RECORDERS_LOCK)
        self._flush = options.directory / FLUSH_REQUEST
        self._flush_seen = self._mtime()
        self._flush_until = 0.0
        self._alone_since: float | None = None
        self._delivered_at = (time.monotonic(), 0)
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def _mtime(self) -> float:
        try:
            return self._flush.stat().st_mtime
        except OSError:
            return 0.0

    def run(self) -> None:
        while not self._stopped.wait(_WATCH):
            try:
                self._look()
            except Exception:
                logger.exception("per_buffer: the drainer's watchdog failed; it goes on")

    def _look(self) -> None:
        now = time.monotonic()
        mtime = self._mtime()
        if mtime != self._flush_seen:
            self._flush_seen = mtime
            if self._flush_until <= now:
                self._worker.begin_flush()
            self._flush_until = now + _FLUSH_FOR
        elif self._flush_until and self._flush_until <= now:
            self._flush_until = 0.0
            self._worker.end_flush()
        if self._options.follow:
            return
        stats = self._worker.stats
        if stats.delivered + stats.coalesced != self._delivered_at[1]:
            self._delivered_at = (now, stats.delivered + stats.coalesced)
        if not self._recorders.free():
            self._alone_since = None
            return
        if self._alone_since is None:
            self._alone_since = now
        try:
            pending, in_flight = self._queue.counts()
        except QueueError:
            return
        idle = pending + in_flight == 0
        stuck = now - max(self._alone_since, self._delivered_at[0]) >= self._options.linger
        if idle or stuck:
            if not idle:
                logger.warning(
                    "per_buffer: the drainer of %s stops with %d activities left on disk: "
                    "nothing could be delivered for %.0f s and no recorder is attached; "
                    "the next recorder or `per-buffer drain` delivers them",
                    self._options.directory,
                    pending + in_flight,
                    self._options.linger,
                )
            self._worker.stop(0.0)
            self._stopped.set()


def main(argv: list[str] | None = None) -> int:
    """``python -m per_buffer.drainer``: options as one JSON line on standard input.

    It logs (INFO and up, never a token) to ``drainer.log`` in the queue directory,
    which rotates at 1 MiB; its standard output says ``ready <pid>`` (or ``busy``) once.
    """
    del argv
    line = sys.stdin.readline()
    sys.stdin.close()
    try:
        options = DrainerOptions.from_json(line)
    except (ValueError, TypeError, KeyError) as exc:
        print(f"per-buffer drainer: bad options on standard input ({type(exc).__name__})")
        return 2
    _log_to(options.directory / LOG_NAME)
    code = run(options, ready=sys.stdout)
    return 0 if code == BUSY else code


def _log_to(path: Path) -> None:
    handler: logging.Handler
    try:
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=1024 * 1024, backupCount=1, encoding="utf-8"
        )
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s drainer[{os.getpid()}] %(levelname)s %(message)s")
    )
    package = logging.getLogger("per_buffer")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
