"""``per-buffer drain``: deliver a backlog left behind, with progress, rate and ETA."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from ..config import env_names
from ..recorder import Recorder, RecorderStats
from ._common import (
    ACTIVITY_TOKEN_ENV,
    EXIT_OK,
    EXIT_SIGNAL_LINES,
    EXIT_USAGE_LINE,
    PROG,
    CLIError,
    activity_token,
    add_command,
    base_url,
    directory_source,
    env,
    error_line,
    interrupt_code,
    interruptible,
    one_line,
    out,
    positive_int,
    positive_seconds,
    queue_directory,
)
from ._progress import TTY_INTERVAL, DeliveryState, Progress, Rate, bar

CONCURRENCY_ENV = env_names("concurrency")[0]
_DRAIN_CONCURRENCY = 32  # a backlog is drained faster than the recorder's everyday default

EPILOG = f"""\
examples:
  {PROG} drain --dir /var/lib/myapp/per-buffer
  {PROG} drain --timeout 30
  {PROG} drain --follow --dir /var/lib/myapp/per-buffer   # a sidecar or systemd unit

Delivers every activity left in the directory (needs $PER_ACTIVITY_TOKEN).
Progress, rate and ETA go to stderr; the summary to stdout. Interrupted,
it says how many activities are left and where: they stay on disk.

--follow runs the directory's drainer in the foreground until stopped: it
delivers whatever recorders commit (set PER_BUFFER_DELIVERY=external in the
recording processes so that they never start their own). While another
drainer runs for the directory it waits and takes over when that one ends.
A directory that does not exist yet (or is empty) is created: the sidecar
may start before the first recorder.
"""

EXIT_CODES = f"""\
  0  everything was delivered or dead-lettered (or nothing was left);
     with --follow, stopped by SIGTERM or Ctrl-C
  1  not finished within --timeout, or Per refused the token (the rest stays on disk)
{EXIT_USAGE_LINE}
{EXIT_SIGNAL_LINES} (the rest stays on disk)
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer drain``."""
    parser = add_command(
        commands,
        "drain",
        "deliver a left-behind backlog from a queue directory",
        cmd_drain,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    parser.add_argument("--dir", metavar="DIR", help="queue directory")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="run as the directory's drainer until stopped (delivery='external')",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds(86400.0),
        default=300.0,
        metavar="S",
        help="give up after S seconds (default 300)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"requests in flight (default: ${CONCURRENCY_ENV} or {_DRAIN_CONCURRENCY})",
    )


def cmd_drain(args: argparse.Namespace) -> int:
    """``per-buffer drain``: deliver everything left in a queue directory."""
    path = _follow_directory(args.dir) if args.follow else queue_directory(args.dir)
    token = activity_token()
    url = base_url()
    if args.follow:
        return _follow(path, token, url, args.concurrency)
    recorder = Recorder(
        token,
        "-",  # never used: drain records nothing, it only delivers what is on disk
        directory=path,
        base_url=url,
        coalesce_window=0,
        enabled=True,  # an explicit command: PER_BUFFER_ENABLED=false does not apply
        delivery="thread",  # this command delivers, in the foreground
        exit_timeout=0.0,
        concurrency=args.concurrency or (None if env(CONCURRENCY_ENV) else _DRAIN_CONCURRENCY),
    )
    drain = _Drain(recorder, path, args.timeout)
    try:
        with interruptible():
            first = recorder.stats()
            if first.pending + first.in_flight == 0:
                out(f"Nothing to deliver in {path} (dead letters: {first.dead_letters:,}).")
                return EXIT_OK
            drain.progress.note(
                f"Draining {first.pending + first.in_flight:,} activities from {path} to {url} ..."
            )
            drain.run(first)
    except KeyboardInterrupt as exc:
        drain.progress.done()
        recorder.close(0.0)
        left = drain.left_on_disk()
        error_line(
            f"interrupted: {left:,} activities left on disk in {path}; "
            f"'{PROG} drain --dir {path}' continues"
        )
        return interrupt_code(exc)
    finally:
        recorder.close(0.0)  # whatever is left stays on disk
    return drain.finish()


class _Drain:
    """One drain in a thread, watched and shown until it ends or gives up."""

    def __init__(self, recorder: Recorder, path: Path, timeout: float) -> None:
        self.recorder = recorder
        self.path = path
        self.timeout = timeout
        self.progress = Progress()
        self.state = DeliveryState()
        self.rate = Rate()
        self.started = time.monotonic()
        self.total = 0
        self.stats: RecorderStats | None = None
        self.flushed = False
        self.auth_refused = False

    def run(self, first: RecorderStats) -> None:
        """Drain in a thread; show progress until it ends or Per refuses the token."""
        self.stats, self.total = first, first.pending + first.in_flight

        def drain() -> None:  # the whole directory, whoever recorded it
            self.flushed = self.recorder.drain(self.timeout)

        flusher = threading.Thread(target=drain, name="per-buffer-drain", daemon=True)
        flusher.start()
        while flusher.is_alive():
            flusher.join(TTY_INTERVAL)
            self._sample()
            if self.stats.pause_reason == "auth":
                self.auth_refused = True
                break
        self._sample()
        if self.progress.tty:  # a terminal's live line ends on the final figures
            self._show(force=True)
        self.progress.done()

    def _sample(self) -> None:
        stats = self.stats = self.recorder.stats()
        left = stats.pending + stats.in_flight
        self.total = max(self.total, left)
        self.rate.add(time.monotonic(), self.total - left)
        self._show()

    def _show(self, force: bool = False) -> None:
        stats = self.stats
        assert stats is not None
        left = stats.pending + stats.in_flight
        done = max(0, self.total - left)
        self.progress.update(
            f"{bar(done / max(1, self.total))} {done:,}/{self.total:,} | "
            f"{self.rate.text(left)} | delivered {stats.delivered:,}, "
            f"dead-lettered {stats.dead_lettered:,}, retried {stats.retried:,} | "
            f"{self.state.update(stats, time.monotonic())} | "
            f"{time.monotonic() - self.started:.1f} s",
            force=force,
        )

    def left_on_disk(self) -> int:
        """Activities still undelivered in the directory (after the recorder closed), read
        without opening the queue (which could wait for a write lock held elsewhere: an
        interrupted command must end at once); else the recorder's last figures."""
        from ..queue import inspect  # noqa: PLC0415  (only on interruption)

        try:
            found = inspect(self.path)
        except Exception:
            found = None
        if found is not None:
            return found.pending + found.in_flight
        try:
            stats: RecorderStats | None = self.recorder.stats()
        except Exception:
            stats = self.stats
        return 0 if stats is None else stats.pending + stats.in_flight

    def finish(self) -> int:
        """The summary on stdout; 0, or a CLIError saying what is left and why."""
        stats = self.stats
        assert stats is not None
        path = self.path
        left = stats.pending + stats.in_flight
        elapsed = time.monotonic() - self.started
        rate = stats.delivered / elapsed if elapsed > 0 else 0.0
        out(
            f"delivered {stats.delivered:,}, dead-lettered {stats.dead_lettered:,}, "
            f"retried {stats.retried:,}, left {left:,} in {elapsed:.1f} s "
            f"({rate:,.0f}/s) from {path}"
        )
        if stats.dead_letters:
            out(
                f"{stats.dead_letters:,} dead letters in {path}: see "
                f"'{PROG} dead-letters list --dir {path}'"
            )
        if self.flushed and left == 0 and not self.auth_refused:
            return EXIT_OK
        if self.auth_refused:
            raise CLIError(
                f"Per refused the activity token; nothing more was sent and {left:,} activities "
                f"stay in {path}: check {ACTIVITY_TOKEN_ENV}"
            )
        reason = f" (last error: {one_line(stats.last_error)})" if stats.last_error else ""
        raise CLIError(
            f"{left:,} activities not delivered within {self.timeout:g} s{reason}; they stay in "
            f"{path}: run '{PROG} drain' again or raise --timeout"
        )


def _follow_directory(arg: str | None) -> Path:
    """The directory ``--follow`` drains: one that does not exist yet (or is empty) is
    made, since a sidecar may start before the first recorder; the drainer creates the
    queue in it."""
    path, source = directory_source(arg)
    if path is None or (path.exists() and not _empty_directory(path)):
        return queue_directory(arg)  # the usual checks and messages
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create the queue directory {path} (from {source}): {exc}") from None
    return path


def _empty_directory(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


def _follow(path: Path, token: str, url: str, concurrency: int | None) -> int:
    """The directory's drainer in the foreground (a sidecar, a systemd unit) until stopped."""
    from ..config import RecorderConfig  # noqa: PLC0415  (only for --follow)
    from ..delivery import DeliverySettings  # noqa: PLC0415
    from ..drainer import BUSY, DrainerOptions, run  # noqa: PLC0415

    config = RecorderConfig.resolve(
        token=token, activity_type_id="-", directory=path, base_url=url, concurrency=concurrency
    )
    drainer = DrainerOptions(
        directory=path,
        settings=DeliverySettings.from_config(config),
        max_queue_items=config.max_queue_items,
        max_queue_bytes=config.max_queue_bytes,
        full_policy=config.full_policy,
        lease_seconds=config.lease_seconds,
        follow=True,
    )
    stop = threading.Event()
    out(f"Following {path}: delivering what recorders commit to {url} (Ctrl-C stops).")
    with interruptible():
        try:
            while run(drainer) == BUSY:
                stop.wait(1.0)  # another drainer runs: take over when it ends
        except KeyboardInterrupt:
            # stopping is how a follower ends, whenever the signal lands (before the
            # drainer set its own handlers, say): what is left stays on disk
            return EXIT_OK
    return EXIT_OK
