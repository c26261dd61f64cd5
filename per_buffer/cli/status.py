"""``per-buffer status``: what a queue directory holds, or (``--all``) every default one.

Only reads: the counters, the delivery state the worker persisted, the quarantine.
It never imports the test server.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..queue import QueueStats, inspect, quarantined_folders, queue_directories
from ._common import (
    EXIT_OK,
    EXIT_USAGE_LINE,
    PROG,
    UsageError,
    add_command,
    age,
    cache_root,
    count,
    directory_source,
    iso,
    key_values,
    out,
    print_json,
    queue_directory,
    size,
    table,
)

EPILOG = f"""\
examples:
  {PROG} status --dir /var/lib/myapp/per-buffer
  PER_BUFFER_DIR=/var/lib/myapp/per-buffer {PROG} status --json
  {PROG} status --all                # every queue directory under the default cache root

The directory is --dir, else $PER_BUFFER_DIR, else the default directory for
$PER_ACTIVITY_TOKEN and $PER_BASE_URL. Delivery (paused or not, why, until when,
success ratio, failures) is what the last recorder's worker wrote there.
--all lists every directory under the default root ($XDG_CACHE_HOME/per-buffer,
else ~/.cache/per-buffer; ~/Library/Caches/per-buffer on macOS), one per token
and URL used, with its backlog.
"""

EXIT_CODES = f"""\
  0  shown
  1  the queue could not be read
{EXIT_USAGE_LINE}
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer status``."""
    parser = add_command(
        commands,
        "status",
        "show what a queue directory holds",
        cmd_status,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    parser.add_argument("--dir", metavar="DIR", help="queue directory")
    parser.add_argument(
        "--all", action="store_true", help="every queue directory under the default cache root"
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout")


def cmd_status(args: argparse.Namespace) -> int:
    """``per-buffer status``: what one queue directory (or each of them) holds."""
    if args.all:
        if args.dir:
            raise UsageError("--all lists the default directories; leave out --dir")
        return _status_all(args.json)
    path = queue_directory(args.dir)
    stats = inspect(path)  # reads only: no lease reclaimed, no file created
    if stats is None:
        raise UsageError(f"{path} holds no per_buffer queue; pass --dir DIR")
    state = stats.delivery_state
    folders = quarantined_folders(path)
    if args.json:
        print_json(
            {
                **_backlog(path, stats),
                "dropped": dict(stats.dropped),
                "delivery": dict(state) if state is not None else None,
                "quarantine": _quarantine(stats, folders),
            }
        )
        return EXIT_OK
    _print_status(path, stats, state, folders)
    return EXIT_OK


def _backlog(path: Path, stats: QueueStats) -> dict[str, Any]:
    return {
        "directory": path,
        "pending": stats.pending,
        "in_flight": stats.in_flight,
        "dead_letters": stats.dead_lettered,
        "oldest_pending_age": stats.oldest_pending_age,
        "bytes_on_disk": stats.bytes_on_disk,
    }


def _quarantine(stats: QueueStats, folders: list[Path]) -> dict[str, Any]:
    """Databases moved aside as unreadable, the entries counted in them, what was salvaged."""
    return {
        "databases": max(stats.quarantines, len(folders)),
        "entries": stats.quarantined_entries,
        "uncounted_databases": stats.quarantines_uncounted,
        "salvaged_entries": stats.salvaged_entries,
        "folders": folders,
    }


def _quarantine_text(stats: QueueStats, folders: list[Path]) -> str:
    moved = max(stats.quarantines, len(folders))
    if not moved:
        return "none"
    text = f"{moved:,} database{'s' if moved != 1 else ''} moved aside, "
    text += f"{stats.quarantined_entries:,} entries in them"
    if stats.quarantines_uncounted:
        text += f" (and {stats.quarantines_uncounted:,} that could not be counted)"
    if stats.salvaged_entries:
        text += f"; {stats.salvaged_entries:,} salvaged"
    return text


def _print_status(
    path: Path, stats: QueueStats, state: Mapping[str, Any] | None, folders: list[Path]
) -> None:
    dropped = ", ".join(f"{k}={v:,}" for k, v in stats.dropped.items() if v) or "0"
    pairs = [
        ("directory", str(path)),
        ("pending", count(stats.pending)),
        ("in flight", count(stats.in_flight)),
        ("dead letters", count(stats.dead_lettered)),
        ("oldest pending age", age(stats.oldest_pending_age)),
        ("bytes on disk", size(stats.bytes_on_disk)),
        ("dropped", dropped),
        *_delivery_lines(state),
        ("quarantined", _quarantine_text(stats, folders)),
    ]
    for line in key_values(pairs):
        out(line)
    hints = []
    if stats.pending or stats.in_flight:
        hints.append(f"Deliver the backlog with: {PROG} drain --dir {path}")
    if stats.dead_lettered:
        hints.append(f"Inspect dead letters with: {PROG} dead-letters list --dir {path}")
    hints += [f"Re-queue what is readable with: {PROG} salvage {folder}" for folder in folders]
    if hints:
        out()
        for hint in hints:
            out(hint)


def _delivery_lines(state: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The worker's persisted state as ``(key, value)`` lines."""
    if not state:
        return [("delivery", "no state written yet (no recorder has delivered from here)")]
    now = time.time()
    reason = state.get("pause_reason")
    until = state.get("paused_until")
    if reason and isinstance(until, int | float) and until > now:
        delivery = f"paused ({reason}) until {iso(until)} (in {age(until - now)})"
    elif reason:
        delivery = f"paused ({reason})"
    else:
        delivery = "not paused"
    lines = [("delivery", delivery)]
    ratio = state.get("success_ratio")
    if isinstance(ratio, int | float):
        lines.append(("success ratio", f"{ratio:.0%} of recent attempts"))
    failures = state.get("failures_by_class") or state.get("failures")
    if isinstance(failures, Mapping):
        text = ", ".join(f"{k}={v}" for k, v in sorted(failures.items()) if v) or "none"
        lines.append(("failures by class", text))
    flow = _flow_text(state)
    if flow:
        lines.append(("flow", flow))
    delivered, attempts = state.get("delivered"), state.get("attempts")
    if isinstance(delivered, int) and isinstance(attempts, int):
        lines.append(("last worker sent", f"{attempts:,} requests, {delivered:,} delivered"))
    updated = state.get("updated_at")
    if isinstance(updated, int | float):
        lines.append(("state written", f"{age(now - updated)} ago{_by(state.get('pid'))}"))
    return lines


def _flow_text(state: Mapping[str, Any]) -> str:
    """``4 of 8 requests in flight, 12.5/s learned from a rate limit, probing``."""
    parts = []
    limit, ceiling = state.get("limit"), state.get("max_concurrency")
    if isinstance(limit, int) and isinstance(ceiling, int):
        parts.append(f"up to {limit} of {ceiling} requests in flight")
    rate = state.get("rate")
    if isinstance(rate, int | float):
        parts.append(f"{rate:.3g}/s learned from a rate limit")
    if state.get("probing"):
        parts.append("probing one request at a time while Per fails")
    return ", ".join(parts)


def _by(pid: object) -> str:
    """`` by pid 123 (running)`` or ``(exited)``: whether the writer still runs here."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f" by pid {pid} (exited)"
    except OSError:  # exists, owned by someone else
        pass
    return f" by pid {pid} (running)"


def _status_all(as_json: bool) -> int:
    """Every queue directory under the default cache root, one row each."""
    root = cache_root()
    try:
        current, _ = directory_source(None)
    except UsageError:  # a malformed PER_BASE_URL: no directory is marked as current
        current = None
    rows: list[dict[str, Any]] = []
    for path in queue_directories(root):
        stats = inspect(path)
        if stats is None:
            continue
        row = _backlog(path, stats)
        row["current"] = current is not None and path == current
        rows.append(row)
    if as_json:
        print_json({"root": root, "directories": rows})
        return EXIT_OK
    if not rows:
        out(f"No queue directories under {root}.")
        return EXIT_OK
    out(f"Queue directories under {root}:")
    for line in table(
        ("DIRECTORY", "PENDING", "IN FLIGHT", "DEAD LETTERS", "OLDEST", "SIZE"),
        [
            (
                row["directory"].name + (" *" if row["current"] else ""),
                count(row["pending"]),
                count(row["in_flight"]),
                count(row["dead_letters"]),
                age(row["oldest_pending_age"]),
                size(row["bytes_on_disk"], exact=False),
            )
            for row in rows
        ],
        "lrrrrr",
    ):
        out(line)
    if any(row["current"] for row in rows):
        out("* the default directory of the current PER_ACTIVITY_TOKEN and PER_BASE_URL")
    backlog = [row for row in rows if row["pending"] or row["in_flight"]]
    if backlog:
        out()
        out(
            f"Deliver a backlog with: {PROG} drain --dir {root}/<DIRECTORY> "
            "(with the activity token it was recorded with)"
        )
    return EXIT_OK
