"""The ``per-buffer`` command: a demo, queue inspection and repair, and the plain API calls.

Commands::

    per-buffer demo          record many activities against a local Per, check the report
    per-buffer status        what a queue directory holds
    per-buffer drain         deliver a left-behind backlog
    per-buffer dead-letters  list, requeue or purge activities Per refused
    per-buffer record        one activity, through the queue or straight to Per
    per-buffer report        Per's unique-user report
    per-buffer serve-local   run the local Per server in the foreground

Results go to stdout (``--json`` output is a single JSON document), progress
and errors to stderr. Every failure is one line ``per-buffer: error: ...`` and
a non-zero exit status: 2 for bad input, 1 for a runtime failure, 130 for Ctrl-C.
Only the standard library is used for terminal output. The ``demo`` command's
implementation lives in :mod:`per_buffer._demo`, imported only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, TypeVar

from ._queue_storage import is_queue_directory, quarantined_folders
from ._version import __version__
from .client import (
    ACTIVITY_TOKEN_ENV,
    BASE_URL_ENV,
    REPORTING_TOKEN_ENV,
    PerClient,
    resolve_base_url,
)
from .config import default_directory
from .errors import PerAuthError, PerError, PerRateLimitError, QueueError
from .models import format_timestamp, parse_timestamp, validate_id
from .queue import DurableQueue
from .recorder import Recorder, RecorderStats
from .testing import DEFAULT_ACTIVITY_TOKEN, DEFAULT_REPORTING_TOKEN, PerServer

__all__ = ["CLIError", "UsageError", "build_parser", "main"]

PROG = "per-buffer"
BUFFER_DIR_ENV = "PER_BUFFER_DIR"
TYPE_ENVS = ("PER_ACTIVITY_TYPE_ID", "ACTIVITY_TYPE_ID")
CONCURRENCY_ENV = "PER_BUFFER_CONCURRENCY"
_DRAIN_CONCURRENCY = 32  # a backlog is drained faster than the recorder's everyday default

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_TTY_INTERVAL = 0.2  # seconds between rewrites of the progress line on a terminal
_PLAIN_INTERVAL = 1.0  # seconds between progress lines when stderr is not a terminal


# --------------------------------------------------------------------------- errors


class CLIError(Exception):
    """A failure shown as one line ``per-buffer: error: <message>``; ``code`` is the exit status."""

    code = EXIT_FAILURE

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(CLIError):
    """Bad input: a malformed argument, a missing setting; exit status 2."""

    code = EXIT_USAGE


def _one_line(text: object) -> str:
    """Collapse a message to one line (no secrets are ever in library messages)."""
    return " ".join(str(text).split()) or "unknown error"


def _error_line(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)


def _explain(exc: PerError, *, base_url: str, token_env: str) -> CLIError:
    """Turn a Per failure into one actionable line naming the setting to fix."""
    text = _one_line(exc).rstrip(".")
    if isinstance(exc, PerAuthError):
        scope = "reporting" if token_env == REPORTING_TOKEN_ENV else "activity"
        return CLIError(
            f"Per refused the token in {token_env} ({exc.message}): set it to a valid Per "
            f"token with the {scope} scope"
        )
    if isinstance(exc, PerRateLimitError) or (exc.retryable and exc.status_code is not None):
        return CLIError(f"{text} (tried {_CALL_ATTEMPTS} times): try again later")
    if exc.retryable:
        return CLIError(f"{text}: is Per reachable at {base_url}? (check {BASE_URL_ENV})")
    return CLIError(text)


_CALL_ATTEMPTS = 3
_T = TypeVar("_T")


def _call(fn: Callable[[], _T], *, base_url: str, token_env: str) -> _T:
    """One Per call; a 5xx or 429 answer is retried twice (never a refused connection)."""
    for attempt in range(1, _CALL_ATTEMPTS + 1):
        try:
            return fn()
        except PerError as exc:
            answered = exc.status_code is not None or isinstance(exc, PerRateLimitError)
            if not (exc.retryable and answered) or attempt == _CALL_ATTEMPTS:
                raise _explain(exc, base_url=base_url, token_env=token_env) from None
            wait = 0.5 * 2 ** (attempt - 1)
            if isinstance(exc, PerRateLimitError) and exc.retry_after is not None:
                wait = min(max(wait, exc.retry_after), 10.0)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port between 0 and 65535, not {text!r}")
    return value


def _number(low: float, high: float, unit: str = "") -> Callable[[str], float]:
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected a number between {low:g} and {high:g}{suffix}, not {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


def _positive_seconds(high: float) -> Callable[[str], float]:
    inner = _number(0.0, high, "seconds")

    def parse(text: str) -> float:
        value = inner(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, not {text!r}")
        return value

    parse.__name__ = "seconds"
    return parse


def _timestamp(text: str) -> datetime:
    try:
        return parse_timestamp(text, "date")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time; use e.g. 2024-05-01 or 2024-05-01T00:00:00Z"
            + ("" if "time zone" not in str(exc) else " (with Z or an offset)")
        ) from None


def _token(text: str) -> str:
    if not text or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise argparse.ArgumentTypeError("expected a token without spaces or control characters")
    return text


def _identifier(text: str) -> str:
    try:
        return validate_id(text, "ID")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------- environment


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _base_url() -> str:
    try:
        return resolve_base_url(_env(BASE_URL_ENV))
    except ValueError as exc:
        raise UsageError(f"{BASE_URL_ENV}: {exc}") from None


def _activity_token() -> str:
    token = _env(ACTIVITY_TOKEN_ENV)
    if token is None:
        raise UsageError(
            f"no Per activity token: set {ACTIVITY_TOKEN_ENV} "
            f"(e.g. export {ACTIVITY_TOKEN_ENV}=...; try '{PROG} serve-local' for a local one)"
        )
    return token


def _reporting_token() -> str:
    token = _env(REPORTING_TOKEN_ENV)
    if token is None:
        raise UsageError(
            f"no Per reporting token: set {REPORTING_TOKEN_ENV} to a token with the reporting scope"
        )
    return token


def _activity_type(arg: str | None) -> str:
    if arg is not None:
        return arg
    for name in TYPE_ENVS:
        value = _env(name)
        if value is not None:
            return value
    raise UsageError(
        "no activity type: pass --activity-type-id or set PER_ACTIVITY_TYPE_ID "
        "(or ACTIVITY_TYPE_ID)"
    )


def _queue_directory(arg: str | None) -> Path:
    """The queue directory from ``--dir``, ``PER_BUFFER_DIR`` or the token's default; must exist."""
    if arg:
        path, source = Path(arg).expanduser(), "--dir"
    elif _env(BUFFER_DIR_ENV):
        path, source = Path(os.environ[BUFFER_DIR_ENV].strip()).expanduser(), BUFFER_DIR_ENV
    elif _env(ACTIVITY_TOKEN_ENV):
        token = _env(ACTIVITY_TOKEN_ENV) or ""
        path = default_directory(token, _base_url())
        source = f"the default directory for {ACTIVITY_TOKEN_ENV} and {BASE_URL_ENV}"
    else:
        raise UsageError(
            f"no queue directory: pass --dir DIR or set {BUFFER_DIR_ENV} "
            f"(or {ACTIVITY_TOKEN_ENV} to use its default directory)"
        )
    if not path.exists():
        raise UsageError(
            f"queue directory {path} does not exist (from {source}); "
            f"pass --dir or set {BUFFER_DIR_ENV} to the directory your recorder uses"
        )
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory (from {source}); pass --dir DIR")
    if not is_queue_directory(path):
        raise UsageError(
            f"{path} holds no per_buffer queue (from {source}); pass --dir or set "
            f"{BUFFER_DIR_ENV} to the directory your recorder uses"
        )
    return path


def _open_queue(path: Path) -> DurableQueue:
    """Open an existing queue for inspection (no ballast file is created)."""
    return DurableQueue(path, reserve_bytes=0)


def _quarantined_folders(path: Path) -> list[str]:
    """Databases the queue moved aside as unreadable (``quarantine-*`` folders)."""
    return quarantined_folders(path)


# --------------------------------------------------------------------------- output helpers


def _out(line: str = "") -> None:
    print(line, file=sys.stdout)


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(_plain(value), indent=2, ensure_ascii=False) + "\n")


def _plain(value: object) -> Any:
    """Something ``json.dumps`` accepts: mappings, sequences, numbers, strings, None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


def _iso(value: object) -> str | None:
    """An ISO 8601 UTC time (``...Z``) from a datetime or a unix time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(float(value), timezone.utc)
    else:
        return str(value)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _count(value: int) -> str:
    return f"{value:,}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _size(num: int) -> str:
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{num} B" if unit == "B" else f"{value:.1f} {unit} ({num:,} bytes)"
        value /= 1024
    return f"{num} B"  # pragma: no cover


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> list[str]:
    """Aligned text columns; ``align`` has one ``l`` or ``r`` per column."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if how == "r" else cell.ljust(width)
            for cell, width, how in zip(row, widths, align, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


def _key_values(pairs: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{key.ljust(width)}  {value}" for key, value in pairs]


class Progress:
    """Live status on stderr: one rewritten line on a terminal, periodic plain lines otherwise."""

    def __init__(self, stream: IO[str] | None = None, *, plain_interval: float = _PLAIN_INTERVAL):
        self._stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self._stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._interval = _TTY_INTERVAL if self.tty else plain_interval
        self._last = -math.inf
        self._dirty = False

    def update(self, text: str, *, force: bool = False) -> None:
        """Show ``text`` unless the previous update was too recent (``force`` shows it anyway)."""
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        try:
            if self.tty:
                width = max(20, self._columns() - 1)
                if len(text) > width:
                    text = text[: width - 1] + "…"
                self._stream.write("\r" + text + "\x1b[K")
                self._dirty = True
            else:
                self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def _columns(self) -> int:
        """Width of the terminal behind the stream (stdout may be redirected meanwhile)."""
        with contextlib.suppress(ValueError):
            columns = int(os.environ.get("COLUMNS", ""))
            if columns > 0:
                return columns
        try:
            return os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return shutil.get_terminal_size((100, 20)).columns

    def note(self, text: str) -> None:
        """A message on its own line (the live line is redrawn by the next update)."""
        self.done()
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text + "\n")
            self._stream.flush()

    def done(self) -> None:
        """End the live line so that following output starts on a fresh line."""
        if self._dirty:
            self._dirty = False
            with contextlib.suppress(OSError, ValueError):
                self._stream.write("\n")
                self._stream.flush()


def _short_error(text: str | None) -> str:
    """The gist of a delivery error for a progress line: ``HTTP 503``, ``ConnectError``..."""
    if not text:
        return "error"
    match = re.search(r"HTTP \d{3}|\b\w+(?:Error|Timeout)\b|invalid_auth_token", text)
    return match.group(0) if match else _one_line(text)[:40]


class DeliveryState:
    """Names what delivery is doing from successive stats: sending, retrying, paused, caught up."""

    def __init__(self) -> None:
        self._delivered = -1
        self._progress_at = time.monotonic()

    def update(self, stats: RecorderStats, now: float) -> str:
        """The state after ``stats`` (taken at monotonic time ``now``)."""
        if stats.delivered != self._delivered:
            self._delivered, self._progress_at = stats.delivered, now
        if stats.pause_reason:
            until = ""
            if stats.paused_until is not None:
                until = f", {max(0.0, stats.paused_until - time.time()):.0f} s left"
            return f"paused ({stats.pause_reason}{until})"
        if not (stats.pending or stats.in_flight):
            return "caught up"
        if now - self._progress_at > 0.75 and stats.retried and stats.last_error:
            return f"retrying ({_short_error(stats.last_error)})"
        return "sending"


def _bar(fraction: float, width: int = 24) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:5.1f}%"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C (so cleanup runs) while a long command is active."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    """``per-buffer report``: Per's unique-user report as a table or JSON."""
    if args.end is not None and args.start is None:
        raise UsageError(
            "--end needs --start (with neither, Per reports the whole prior calendar month)"
        )
    if args.start is not None and args.end is not None and args.start > args.end:
        raise UsageError("--start is later than --end")
    token = _reporting_token()
    base_url = _base_url()
    with PerClient.for_reporting(token, base_url=base_url, timeout=args.timeout) as client:
        report = _call(
            lambda: client.get_report(args.start, args.end),
            base_url=base_url,
            token_env=REPORTING_TOKEN_ENV,
        )
    totals = report.totals()
    if args.json:
        _print_json(
            {
                "start": report.start,
                "end": report.end,
                "result": report.raw,
                "totals": totals,
            }
        )
        return EXIT_OK
    start = format_timestamp(report.start) if report.start else "?"
    end = format_timestamp(report.end) if report.end else "(unbounded)"
    _out(f"Per report {start} .. {end}")
    _out()
    rows = list(report)
    if not rows:
        _out("No activity in this period.")
        return EXIT_OK
    for line in _table(
        ("ACTIVITY TYPE", "BILLING ID", "UNIQUE USERS"),
        [(r.activity_type_id, r.billing_id, r.unique) for r in rows],
        "llr",
    ):
        _out(line)
    _out()
    _out("Totals per activity type:")
    for line in _table(
        ("ACTIVITY TYPE", "BILLING IDS", "UNIQUE USERS"),
        [
            (type_id, sum(1 for r in rows if r.activity_type_id == type_id), totals[type_id])
            for type_id in sorted(totals)
        ],
        "lrr",
    ):
        _out(line)
    return EXIT_OK


# --------------------------------------------------------------------------- record


def cmd_record(args: argparse.Namespace) -> int:
    """``per-buffer record``: one activity through the durable queue, or ``--direct`` to Per."""
    if args.direct and args.dir:
        raise UsageError("--dir is for the queue; leave it out with --direct")
    token = _activity_token()
    type_id = _activity_type(args.activity_type_id)
    base_url = _base_url()
    if args.direct:
        with PerClient(token, base_url=base_url, timeout=args.timeout) as client:
            # a duplicate after a retried 5xx is harmless: Per counts unique users
            transaction = _call(
                lambda: client.add_activity(args.billing_id, args.user_id, type_id),
                base_url=base_url,
                token_env=ACTIVITY_TOKEN_ENV,
            )
        if args.json:
            _print_json({"delivered": True, "transaction_id": transaction})
        else:
            _out(transaction)
        return EXIT_OK

    directory = Path(args.dir).expanduser() if args.dir else None
    recorder = Recorder(
        token,
        type_id,
        directory=directory,
        base_url=base_url,
        durability="sync",
        coalesce_window=0,
        enabled=True,  # an explicit command: PER_BUFFER_ENABLED=false does not apply
        exit_timeout=args.timeout,
    )
    try:
        recorder.record(args.billing_id, args.user_id)
        recorder.flush(args.timeout)
        stats = recorder.stats()
    finally:
        recorder.close(0.0)
    where = str(recorder.directory)
    if stats.dropped:
        reasons = ", ".join(f"{k}={v}" for k, v in stats.dropped.items())
        raise CLIError(f"the activity could not be stored in {where} ({reasons})")
    if stats.delivered:
        state, code = "delivered", EXIT_OK
        text = "delivered"
    elif stats.dead_lettered:
        state, code = "dead_lettered", EXIT_FAILURE
        text = (
            f"rejected by Per and dead-lettered ({stats.last_error or 'no reason given'}); "
            f"see '{PROG} dead-letters list --dir {where}'"
        )
    else:
        # queued is a success, unless Per refused the token: then nothing will ever arrive
        state = "queued"
        code = EXIT_FAILURE if stats.pause_reason == "auth" else EXIT_OK
        reason = f" ({_one_line(stats.last_error).rstrip('.')})" if stats.last_error else ""
        text = (
            f"queued: not delivered within {args.timeout:g} s{reason}; it is safe on disk in "
            f"{where} and the next recorder there (or '{PROG} drain --dir {where}') sends it"
        )
    if args.json:
        _print_json(
            {
                "state": state,
                "delivered": state == "delivered",
                "directory": where,
                "last_error": stats.last_error,
            }
        )
    else:
        _out(text)
    if code != EXIT_OK:
        _error_line(text)
    return code


# --------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    """``per-buffer status``: what one queue directory holds."""
    path = _queue_directory(args.dir)
    queue = _open_queue(path)
    try:
        qs = queue.stats()
    finally:
        queue.close()
    dropped = dict(qs.dropped)
    folders = _quarantined_folders(path)
    quarantined = max(qs.quarantined, len(folders))
    if args.json:
        _print_json(
            {
                "directory": path,
                "pending": qs.pending,
                "in_flight": qs.in_flight,
                "dead_letters": qs.dead_lettered,
                "oldest_pending_age": qs.oldest_pending_age,
                "bytes_on_disk": qs.bytes_on_disk,
                "dropped": dropped,
                "quarantined": quarantined,
                "quarantined_folders": folders,
                "pause_reason": None,
            }
        )
        return EXIT_OK
    dropped_text = ", ".join(f"{k}={v:,}" for k, v in dropped.items() if v) or "0"
    quarantine_text = str(quarantined)
    if folders:
        quarantine_text += f" (unreadable databases moved aside: {', '.join(folders)})"
    pairs = [
        ("directory", str(path)),
        ("pending", _count(qs.pending)),
        ("in flight", _count(qs.in_flight)),
        ("dead letters", _count(qs.dead_lettered)),
        ("oldest pending age", _age(qs.oldest_pending_age)),
        ("bytes on disk", _size(qs.bytes_on_disk)),
        ("dropped", dropped_text),
        ("quarantined", quarantine_text),
        ("pause reason", "n/a (known only inside the process that records)"),
    ]
    for line in _key_values(pairs):
        _out(line)
    if qs.pending or qs.in_flight:
        _out()
        _out(f"Deliver the backlog with: {PROG} drain --dir {path}")
    if qs.dead_lettered:
        _out(f"Inspect dead letters with: {PROG} dead-letters list --dir {path}")
    return EXIT_OK


# --------------------------------------------------------------------------- drain


def cmd_drain(args: argparse.Namespace) -> int:
    """``per-buffer drain``: deliver everything left in a queue directory."""
    path = _queue_directory(args.dir)
    token = _activity_token()
    base_url = _base_url()
    started = time.monotonic()
    recorder = Recorder(
        token,
        "-",  # never used: drain records nothing, it only delivers what is on disk
        directory=path,
        base_url=base_url,
        coalesce_window=0,
        enabled=True,  # an explicit command: PER_BUFFER_ENABLED=false does not apply
        exit_timeout=0.0,
        concurrency=args.concurrency or (None if _env(CONCURRENCY_ENV) else _DRAIN_CONCURRENCY),
    )
    progress = Progress()
    outcome: dict[str, bool] = {}
    try:
        first = recorder.stats()
        total = first.pending + first.in_flight
        if total == 0:
            _out(f"Nothing to deliver in {path} (dead letters: {first.dead_letters:,}).")
            return EXIT_OK
        progress.note(f"Draining {total:,} activities from {path} to {base_url} ...")

        def run_flush() -> None:
            outcome["done"] = recorder.flush(args.timeout)

        flusher = threading.Thread(target=run_flush, name="per-buffer-drain", daemon=True)
        flusher.start()
        auth_refused = False
        stats = first
        state = DeliveryState()

        def show(force: bool = False) -> None:
            left = stats.pending + stats.in_flight
            done = max(0, total - left)
            progress.update(
                f"{_bar(done / total)} {done:,}/{total:,} | delivered {stats.delivered:,}, "
                f"dead-lettered {stats.dead_lettered:,}, retried {stats.retried:,} | "
                f"{state.update(stats, time.monotonic())} | "
                f"{time.monotonic() - started:.1f} s",
                force=force,
            )

        while flusher.is_alive():
            flusher.join(_TTY_INTERVAL)
            stats = recorder.stats()
            total = max(total, stats.pending + stats.in_flight)
            show()
            if stats.pause_reason == "auth":
                auth_refused = True
                break
        stats = recorder.stats()
        show(force=True)
        progress.done()
    finally:
        recorder.close(0.0)  # whatever is left stays on disk
    left = stats.pending + stats.in_flight
    elapsed = time.monotonic() - started
    ok = outcome.get("done", False) and left == 0 and not auth_refused
    _out(
        f"delivered {stats.delivered:,}, dead-lettered {stats.dead_lettered:,}, "
        f"retried {stats.retried:,}, left {left:,} in {elapsed:.1f} s"
    )
    if stats.dead_letters:
        _out(
            f"{stats.dead_letters:,} dead letters in {path}: see "
            f"'{PROG} dead-letters list --dir {path}'"
        )
    if ok:
        return EXIT_OK
    if auth_refused:
        raise CLIError(
            f"Per refused the activity token; nothing more was sent and {left:,} activities "
            f"stay in {path}: check {ACTIVITY_TOKEN_ENV}"
        )
    reason = f" (last error: {_one_line(stats.last_error)})" if stats.last_error else ""
    raise CLIError(
        f"{left:,} activities not delivered within {args.timeout:g} s{reason}; they stay in "
        f"{path}: run '{PROG} drain' again or raise --timeout"
    )


# --------------------------------------------------------------------------- dead letters


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """``per-buffer dead-letters``: list, requeue or purge what Per refused for good."""
    if args.limit is not None and args.action != "list":
        raise UsageError(f"--limit applies to 'dead-letters list' only, not {args.action!r}")
    path = _queue_directory(args.dir)
    queue = _open_queue(path)
    try:
        if args.action == "requeue":
            moved = queue.requeue_dead_letters()
            if args.json:
                _print_json({"directory": path, "requeued": moved})
            else:
                _out(f"requeued {moved:,} dead letters in {path}")
                if moved:
                    _out(f"the next recorder there, or '{PROG} drain --dir {path}', sends them")
            return EXIT_OK
        if args.action == "purge":
            purged = queue.purge_dead_letters()
            if args.json:
                _print_json({"directory": path, "purged": purged})
            else:
                _out(f"purged {purged:,} dead letters from {path}")
            return EXIT_OK
        limit = args.limit if args.limit is not None else (None if args.json else 100)
        letters = queue.dead_letters(limit=limit)
        total = queue.stats().dead_lettered
    finally:
        queue.close()
    records = [
        {
            "id": letter.entry.id,
            "billing_id": letter.entry.activity.billing_id,
            "user_id": letter.entry.activity.user_id,
            "activity_type_id": letter.entry.activity.activity_type_id,
            "recorded_at": _iso(letter.entry.recorded_at),
            "attempts": letter.entry.attempts,
            "last_error": letter.entry.last_error,
            "reason": letter.reason,
            "dead_at": _iso(letter.dead_at),
        }
        for letter in letters
    ]
    if args.json:
        _print_json({"directory": path, "total": total, "dead_letters": records})
        return EXIT_OK
    if not records:
        _out(f"No dead letters in {path}.")
        return EXIT_OK
    for line in _table(
        ("ID", "BILLING ID", "USER ID", "ACTIVITY TYPE", "ATTEMPTS", "DEAD AT", "REASON"),
        [
            (
                r["id"],
                r["billing_id"],
                r["user_id"],
                r["activity_type_id"],
                r["attempts"],
                r["dead_at"] or "-",
                _one_line(r["reason"] or "-"),
            )
            for r in records
        ],
        "lllllll",
    ):
        _out(line)
    if total > len(records):
        _out(f"... showing {len(records):,} of {total:,}; use --limit N or --json for more")
    return EXIT_OK


# --------------------------------------------------------------------------- serve-local


def cmd_serve_local(args: argparse.Namespace) -> int:
    """``per-buffer serve-local``: the local Per server in the foreground until Ctrl-C."""
    server = PerServer(
        port=args.port,
        latency=args.latency / 1000.0,
        activity_tokens=(args.activity_token or DEFAULT_ACTIVITY_TOKEN,),
        reporting_tokens=(args.reporting_token or DEFAULT_REPORTING_TOKEN,),
    )
    with _sigterm_as_interrupt():
        try:
            server.start()
        except OSError as exc:
            raise CLIError(
                f"cannot listen on 127.0.0.1:{args.port} ({exc.strerror or exc}); "
                "pick another --port (0: any free one)"
            ) from None
        try:
            if args.error_rate:
                server.inject("503", rate=args.error_rate)
            _out(f"Local Per server listening on {server.url}")
            _out(f"  activity token:  {server.activity_token}")
            _out(f"  reporting token: {server.reporting_token}")
            _out()
            _out("Point per_buffer at it (in another shell):")
            _out(f"  export {BASE_URL_ENV}={server.url}")
            _out(f"  export {ACTIVITY_TOKEN_ENV}={server.activity_token}")
            _out(f"  export {REPORTING_TOKEN_ENV}={server.reporting_token}")
            _out(f"  export {TYPE_ENVS[0]}=login  # any activity type is accepted here")
            sys.stdout.flush()
            extra = f", {args.latency:g} ms latency" if args.latency else ""
            extra += f", {args.error_rate:.0%} HTTP 503" if args.error_rate else ""
            print(f"Serving{extra} until Ctrl-C ...", file=sys.stderr, flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                counters = server.counters
                print(
                    f"\nstopped after {counters['requests']:,} requests "
                    f"({counters['ok']:,} activities accepted)",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            server.stop()
    return EXIT_OK


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """``per-buffer demo``: many activities against a local Per with an outage; check the report."""
    # Imported here: only this command needs it, and per_buffer._demo imports this module.
    from ._demo import cmd_demo as run_demo  # noqa: PLC0415

    return run_demo(args)


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, so ``main`` can return a code)."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` instead of printing usage and exiting."""
        raise UsageError(f"{message} (see '{self.prog} --help')")


_EPILOG_MAIN = f"""\
examples:
  {PROG} demo                              # the whole story against a local Per, ~15 s
  {PROG} serve-local --port 8765           # a local Per to point your code at
  {PROG} status                            # what the queue directory holds
  {PROG} drain --timeout 60                # deliver a left-behind backlog
  {PROG} report --start 2024-05-01 --end 2024-05-31T23:59:59Z

environment:
  {ACTIVITY_TOKEN_ENV}    activity token (record, drain, default queue directory)
  {REPORTING_TOKEN_ENV}   reporting token (report)
  PER_ACTIVITY_TYPE_ID  default activity type (record); ACTIVITY_TYPE_ID also works
  {BASE_URL_ENV}          Per endpoint (default https://api.useper.com)
  {BUFFER_DIR_ENV}        queue directory (default: per token, under ~/.cache/per-buffer)

exit status: 0 success, 1 runtime failure, 2 bad input, 130 interrupted
"""

_EPILOGS = {
    "demo": f"""\
examples:
  {PROG} demo                                   # 200,000 activities, a 3 s outage
  {PROG} demo --activities 3000 --seconds-outage 0.5
  {PROG} demo --json > demo.json                # progress on stderr, JSON on stdout

Starts a local Per server in its own process (5-20 ms latency, 2% HTTP 503),
records skewed activity from several threads through a Recorder in a temporary
directory, takes Per down for a while, flushes, and compares Per's report with
the unique users counted locally. Exit 0 on MATCH, 1 on MISMATCH.
""",
    "status": f"""\
examples:
  {PROG} status --dir /var/lib/myapp/per-buffer
  PER_BUFFER_DIR=/var/lib/myapp/per-buffer {PROG} status --json

The directory is --dir, else $PER_BUFFER_DIR, else the default directory for
$PER_ACTIVITY_TOKEN and $PER_BASE_URL. Why delivery is paused is known only
inside the process that records, so it is shown as n/a.
""",
    "drain": f"""\
examples:
  {PROG} drain --dir /var/lib/myapp/per-buffer
  {PROG} drain --timeout 30

Delivers every activity left in the directory (needs $PER_ACTIVITY_TOKEN).
Exit 0 when everything was delivered or dead-lettered, else 1.
""",
    "dead-letters": f"""\
examples:
  {PROG} dead-letters list --dir /var/lib/myapp/per-buffer --limit 20
  {PROG} dead-letters list --json
  {PROG} dead-letters requeue      # send them again (then: {PROG} drain)
  {PROG} dead-letters purge        # delete them for good
""",
    "record": f"""\
examples:
  {PROG} record --billing-id acme --user-id u-42 --activity-type-id login
  {PROG} record --billing-id acme --user-id u-42 --direct   # prints the transaction ID

Through the queue (default), the activity is on disk before delivery starts;
it is then sent within --timeout or left queued for the next recorder.
""",
    "report": f"""\
examples:
  {PROG} report                                 # the whole prior calendar month
  {PROG} report --start 2024-05-01 --end 2024-05-31T23:59:59Z
  {PROG} report --start 2024-05-01T00:00:00Z --json

Needs $PER_REPORTING_TOKEN. Times are ISO 8601 with Z or an offset; a date
alone means midnight UTC. Only --start: the end is unbounded.
""",
    "serve-local": f"""\
examples:
  {PROG} serve-local
  {PROG} serve-local --port 8765 --latency 20 --error-rate 0.05
  {PROG} serve-local --activity-token dev-act --reporting-token dev-rep

Then, in another shell, export the printed variables and use per_buffer as usual.
""",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``per-buffer`` command."""
    parser = _Parser(
        prog=PROG,
        description="Durable usage reporting to Per: demo, inspect and repair queues, "
        "record activities and read reports.",
        epilog=_EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's log messages on stderr"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=_EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    demo = command("demo", "record through an outage of a local Per, then check its report")
    demo.add_argument(
        "--activities",
        type=_positive_int,
        default=200_000,
        metavar="N",
        help="activities to record (default 200000)",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=8,
        metavar="N",
        help="recording threads (default 8)",
    )
    demo.add_argument(
        "--users",
        type=_positive_int,
        default=5000,
        metavar="N",
        help="distinct users (default 5000)",
    )
    demo.add_argument(
        "--billing-ids",
        type=_positive_int,
        default=40,
        metavar="N",
        help="billing IDs the users belong to (default 40)",
    )
    demo.add_argument(
        "--seconds-outage",
        type=_number(0.0, 20.0, "seconds"),
        default=3.0,
        metavar="S",
        help="how long Per is down during recording (0: no outage; default 3)",
    )
    demo.add_argument(
        "--duration",
        type=_number(0.0, 40.0, "seconds"),
        default=None,
        metavar="S",
        help="spread recording over S seconds (default: activities/20000, at least 2*outage+1)",
    )
    demo.add_argument(
        "--concurrency",
        type=_positive_int,
        default=32,
        metavar="N",
        help="recorder requests in flight (default 32)",
    )
    demo.add_argument(
        "--coalesce-window",
        type=_number(0.0, 86400.0, "seconds"),
        default=900.0,
        metavar="S",
        help="recorder coalescing window (default 900)",
    )
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    demo.add_argument(
        "--top", type=_positive_int, default=10, metavar="N", help="table rows shown (default 10)"
    )
    demo.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    demo.set_defaults(handler=cmd_demo)

    status = command("status", "show what a queue directory holds")
    status.add_argument("--dir", metavar="DIR", help="queue directory")
    status.add_argument("--json", action="store_true", help="JSON on stdout")
    status.set_defaults(handler=cmd_status)

    drain = command("drain", "deliver a left-behind backlog from a queue directory")
    drain.add_argument("--dir", metavar="DIR", help="queue directory")
    drain.add_argument(
        "--timeout",
        type=_positive_seconds(86400.0),
        default=300.0,
        metavar="S",
        help="give up after S seconds (default 300)",
    )
    drain.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"requests in flight (default: ${CONCURRENCY_ENV} or {_DRAIN_CONCURRENCY})",
    )
    drain.set_defaults(handler=cmd_drain)

    dead = command("dead-letters", "list, requeue or purge activities Per refused for good")
    dead.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=("list", "requeue", "purge"),
        help="what to do (default: list)",
    )
    dead.add_argument("--dir", metavar="DIR", help="queue directory")
    dead.add_argument("--json", action="store_true", help="JSON on stdout")
    dead.add_argument(
        "--limit", type=_positive_int, default=None, metavar="N", help="list at most N"
    )
    dead.set_defaults(handler=cmd_dead_letters)

    record = command("record", "record one activity, through the queue or --direct")
    record.add_argument(
        "--billing-id", required=True, type=_identifier, metavar="B", help="customer billed"
    )
    record.add_argument(
        "--user-id", required=True, type=_identifier, metavar="U", help="the active user"
    )
    record.add_argument(
        "--activity-type-id",
        type=_identifier,
        default=None,
        metavar="T",
        help="default $PER_ACTIVITY_TYPE_ID or $ACTIVITY_TYPE_ID",
    )
    record.add_argument(
        "--direct", action="store_true", help="call Per now and print the transaction ID"
    )
    record.add_argument("--dir", metavar="DIR", help="queue directory (not with --direct)")
    record.add_argument(
        "--timeout",
        type=_positive_seconds(3600.0),
        default=5.0,
        metavar="S",
        help="seconds to wait for delivery (default 5)",
    )
    record.add_argument("--json", action="store_true", help="JSON on stdout")
    record.set_defaults(handler=cmd_record)

    report = command("report", "print Per's unique-user report")
    report.add_argument(
        "--start", type=_timestamp, default=None, metavar="TIME", help="first instant covered"
    )
    report.add_argument(
        "--end", type=_timestamp, default=None, metavar="TIME", help="last instant (needs --start)"
    )
    report.add_argument(
        "--timeout",
        type=_positive_seconds(3600.0),
        default=10.0,
        metavar="S",
        help="HTTP timeout in seconds (default 10)",
    )
    report.add_argument("--json", action="store_true", help="JSON on stdout")
    report.set_defaults(handler=cmd_report)

    serve = command("serve-local", "run the local Per server in the foreground until Ctrl-C")
    serve.add_argument("--port", type=_port, default=0, help="TCP port (default: any free one)")
    serve.add_argument(
        "--latency",
        type=_number(0.0, 60_000.0, "milliseconds"),
        default=0.0,
        metavar="MS",
        help="added latency per request, in milliseconds",
    )
    serve.add_argument(
        "--error-rate",
        type=_number(0.0, 1.0),
        default=0.0,
        metavar="F",
        help="share of requests answered with HTTP 503 (0..1)",
    )
    serve.add_argument(
        "--activity-token",
        type=_token,
        default=None,
        metavar="T",
        help=f"accepted activity token (default {DEFAULT_ACTIVITY_TOKEN})",
    )
    serve.add_argument(
        "--reporting-token",
        type=_token,
        default=None,
        metavar="T",
        help=f"accepted reporting token (default {DEFAULT_REPORTING_TOKEN})",
    )
    serve.set_defaults(handler=cmd_serve_local)
    return parser


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _library_logging(verbose: bool) -> Iterator[None]:
    """Keep the library's warnings off stderr (they would break the progress line) unless -v."""
    logger = logging.getLogger("per_buffer")
    handler: logging.Handler
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        previous_level = logger.level
        logger.setLevel(logging.INFO)
    else:
        handler = logging.NullHandler()
        previous_level = logger.level
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``per-buffer`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _error_line(str(exc))
        return exc.code
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    verbose = bool(getattr(args, "verbose", False))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with _library_logging(verbose):
            return handler(args)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write("\n" if sys.stderr.isatty() else "")
            sys.stderr.flush()
        return EXIT_INTERRUPTED
    except CLIError as exc:
        _error_line(str(exc))
        return exc.code
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except PerError as exc:
        _error_line(str(exc))
        return EXIT_FAILURE
    except QueueError as exc:
        _error_line(f"queue: {exc}")
        return EXIT_FAILURE
    except (ValueError, TypeError) as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error_line(str(exc))
        return EXIT_FAILURE
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        _error_line(f"unexpected {type(exc).__name__}: {exc} (run with -v for details)")
        return EXIT_FAILURE
