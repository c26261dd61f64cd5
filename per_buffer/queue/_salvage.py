"""Re-queue what a quarantined database still holds: :func:`salvage`."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import QueueError
from ._health import CorruptData
from ._layout import DB_NAME, GEN_PREFIX, SALVAGE_MARKER, write_json_atomically
from ._queue import DurableQueue
from ._reader import ScanStats, entry_rows_of, scan_rows, tolerate_damage
from ._rows import DEAD_PREFIX, META_KEY, Counters, loads, to_entry
from ._types import DeadLetter, Entry, SalvageResult

if sys.platform != "win32":
    import fcntl

_BATCH: Final = 4096  # entries stored per transaction


class AlreadySalvagedError(QueueError):
    """The folder was salvaged before (or a salvage of it was interrupted).

    Attributes:
        marker: the ``salvaged.json`` file that says so.
    """

    def __init__(self, message: str, marker: Path) -> None:
        super().__init__(message)
        self.marker = marker


@dataclass
class _Found:
    """What could be read from one database."""

    pending: list[Entry] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    counters: Counters | None = None
    duplicates: int = 0
    stats: ScanStats = field(default_factory=ScanStats)


def salvage(
    quarantine_dir: str | os.PathLike[str], into: DurableQueue, *, force: bool = False
) -> SalvageResult:
    """Store every readable entry of a quarantined database into the live queue ``into``.

    Entries of the main queue, of retry groups and of leases become pending entries of
    ``into`` (new ids; ``recorded_at``, attempts, failures and last error kept), in the
    order of their old ids. Dead letters stay dead letters (same reason, time and
    attempts): they were refused by Per, or set aside by an older version's rules, and
    ``per-buffer dead-letters requeue`` sends them again on purpose. Everything stored is
    counted in ``into.stats().salvaged_entries``.

    The folder is never modified: its database and WAL are copied to a temporary folder
    inside ``into``'s directory and read there (so SQLite can replay the WAL), row by row
    so that a damaged page hides only the rows on it. Afterwards ``salvaged.json`` is
    written into the folder with the result; a second run raises
    :class:`AlreadySalvagedError` unless ``force`` (it would store the entries twice).
    The marker is written (state "in progress") before anything is stored, so an
    interrupted run is refused as well.

    Raises:
        ValueError: ``quarantine_dir`` is not a database folder, or is a live one.
        AlreadySalvagedError: the folder was salvaged before (and not ``force``).
        QueueError: another salvage of the folder is running, the marker cannot be
            written, or ``into`` fails (what was stored before stays stored).
    """
    folder = Path(os.fspath(quarantine_dir)).expanduser().absolute()
    if not (folder / DB_NAME).is_file():
        raise ValueError(f"{folder} holds no queue database ({DB_NAME})")
    if folder.name.startswith(GEN_PREFIX) and folder.parent == into.directory:
        raise ValueError(f"{folder} is the live database of {into.directory}, not a quarantine")
    with _folder_lock(folder):
        marker = folder / SALVAGE_MARKER
        if marker.exists() and not force:
            raise AlreadySalvagedError(
                f"{folder} was already salvaged (see {marker}); pass force=True to store its "
                "entries again",
                marker,
            )
        found = _read_copy(folder, into.directory)
        _write_marker(marker, {"state": "in progress", "into": str(into.directory)})
        result = _store(found, into)
        _write_marker(marker, {"state": "done", "into": str(into.directory), **asdict(result)})
    return result


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Any:
    fd = os.open(folder, os.O_RDONLY)
    try:
        if sys.platform != "win32":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise QueueError(f"another salvage of {folder} is running") from exc
        yield
    finally:
        os.close(fd)


def _write_marker(marker: Path, value: dict[str, Any]) -> None:
    try:
        write_json_atomically(marker, {**value, "at": time.time()})
    except OSError as exc:
        raise QueueError(f"cannot write {marker}: {exc}") from exc


def _read_copy(folder: Path, scratch_parent: Path) -> _Found:
    """Copy the database (and its WAL) aside, let SQLite replay the WAL there, read it."""
    scratch = Path(tempfile.mkdtemp(prefix=".salvage-", dir=scratch_parent))
    try:
        for suffix in ("", "-wal"):
            source = folder / (DB_NAME + suffix)
            if source.exists():
                shutil.copyfile(source, scratch / source.name)
        found = _Found()
        try:
            con = sqlite3.connect(str(scratch / DB_NAME), isolation_level=None)
            tolerate_damage(con)
        except sqlite3.Error:
            found.stats.unreadable = 1
            return found
        try:
            _read(con, found)
        finally:
            con.close()
        return found
    except OSError as exc:
        raise QueueError(f"cannot copy {folder} to read it: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _read(con: sqlite3.Connection, found: _Found) -> None:
    seen: set[int] = set()
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        found.stats.unreadable = 1  # no schema: nothing can be found by SQL
        return
    for key, text in scan_rows(con, found.stats):
        try:
            if key == META_KEY:
                found.counters = Counters.decode(text)
                continue
            rows = entry_rows_of(key, text)
            if rows is None:
                continue
            entries = [to_entry(row) for row in rows]
            death = _death(key, text)
        except (CorruptData, TypeError, ValueError, AttributeError):
            found.stats.unreadable += 1
            continue
        for entry in entries:
            if entry.id in seen:
                found.duplicates += 1
            elif death is None:
                found.pending.append(entry)
            else:
                found.dead.append(DeadLetter(entry=entry, reason=death[0], dead_at=death[1]))
            seen.add(entry.id)


def _death(key: str, text: str) -> tuple[str, float] | None:
    """(reason, time) of a dead-letter record, None for any other row."""
    if not key.startswith(DEAD_PREFIX):
        return None
    record = loads(text, key)
    return str(record.get("r", "")), float(record.get("t", 0.0))


def _store(found: _Found, into: DurableQueue) -> SalvageResult:
    pending = sorted(found.pending, key=lambda entry: entry.id)
    requeued = dead = 0
    for start in range(0, len(pending), _BATCH):
        requeued += into.restore(pending[start : start + _BATCH]).stored
    for start in range(0, len(found.dead), _BATCH):
        dead += into.restore_dead_letters(found.dead[start : start + _BATCH])
    readable = len(found.pending) + len(found.dead)
    return SalvageResult(
        requeued=requeued,
        dead_letters=dead,
        unreadable=found.stats.unreadable,
        missing=None if found.counters is None else max(0, found.counters.stored - readable),
        duplicates_skipped=found.duplicates,
        refused=readable - requeued - dead,
    )
