"""Reading a queue database without diskcache and without writing to it.

Two readers over a raw ``sqlite3`` connection (the fourth place where the queue issues
SQL itself, see the package documentation):

* :class:`ReadOnlyView` offers the ``get``/``peek`` subset of diskcache's ``Cache`` on a
  read-only connection, so the queue's row code can read a live database without
  opening it as a queue (no lease reclaim, no table creation, no reserve file);
* :func:`scan_rows` reads every row of a possibly damaged database by row number, so that
  one bad page hides only the rows on it: a range scan by rowid runs until SQLite reports
  damage, then single rows are read one by one past the damage and the range scan
  resumes. It is how :func:`~per_buffer.queue.salvage` and the quarantine count read a
  database that SQLite reports as malformed.

diskcache stores a str key with ``raw = 1`` and a str value shorter than
``disk_min_file_size`` (16 MiB here, never reached) inline with ``mode = 1`` (raw).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from ._health import CorruptData
from ._layout import DB_NAME
from ._rows import (
    DEAD_PREFIX,
    LEASE_PREFIX,
    MAIN,
    META_KEY,
    RETRY,
    Counters,
    check_rows,
    entry_rows,
    loads,
    record_rows,
)

_MODE_RAW: Final = 1  # diskcache.core.MODE_RAW
_RANGE_SQL: Final = "SELECT rowid, key, raw, mode, value FROM Cache WHERE rowid > ? ORDER BY rowid"
_POINT_SQL: Final = "SELECT key, raw, mode, value FROM Cache WHERE rowid = ?"
_GET_SQL: Final = "SELECT mode, value FROM Cache WHERE key = ? AND raw = 1"
_PEEK_SQL: Final = (
    "SELECT key, mode, value FROM Cache WHERE ? < key AND key < ? AND raw = 1 "
    "ORDER BY key {} LIMIT 1"
)
#: Without a readable max(rowid), the scan stops after this many row numbers in a row
#: that were absent or unreadable.
_MAX_BLIND_PROBES: Final = 100_000


def connect_readonly(
    db: Path, *, immutable: bool = False, tolerant: bool = False, timeout: float = 2.0
) -> sqlite3.Connection:
    """A read-only connection to ``db`` (``immutable``: no locks, the WAL is ignored).

    ``tolerant``: read a damaged file as far as possible (see :func:`tolerate_damage`).

    Raises:
        sqlite3.Error: the file cannot be opened.
    """
    uri = f"file:{quote(str(db))}?{'immutable=1' if immutable else 'mode=ro'}"
    con = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    if tolerant:
        tolerate_damage(con)
    return con


def tolerate_damage(con: sqlite3.Connection) -> None:
    """Let SQLite read a truncated file: with ``writable_schema`` it no longer refuses
    every query when the file holds fewer pages than its header says (it reads the
    pages that are there). No write is made through the connections this is used on.
    """
    con.execute("PRAGMA writable_schema=ON")


def _value(mode: object, value: object, what: str) -> str:
    if mode != _MODE_RAW or not isinstance(value, str):
        raise CorruptData(f"{what}: not stored as inline text")
    return value


class ReadOnlyView:
    """``get`` and ``peek`` of a diskcache ``Cache``, on a read-only connection.

    Use as a context manager: the reads inside one ``with`` block see one snapshot.
    """

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con

    @classmethod
    def open(cls, gen: Path, *, timeout: float = 2.0) -> ReadOnlyView:
        """Open the database of folder ``gen`` without writing to it.

        When no WAL file exists nobody has the database open (SQLite deletes it at the
        last close), and the file is opened ``immutable`` so that no ``-wal``/``-shm``
        files are created; otherwise read-only through the WAL.
        """
        wal = gen / (DB_NAME + "-wal")
        return cls(connect_readonly(gen / DB_NAME, immutable=not wal.exists(), timeout=timeout))

    def __enter__(self) -> ReadOnlyView:
        """Start a read transaction (one snapshot)."""
        self._con.execute("BEGIN")
        return self

    def __exit__(self, *exc_info: object) -> None:
        """End the read transaction."""
        with contextlib.suppress(sqlite3.Error):
            self._con.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(sqlite3.Error):
            self._con.close()

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, ``default`` when absent."""
        row = self._con.execute(_GET_SQL, (key,)).fetchone()
        if row is None:
            return default
        return _value(row[0], row[1], key)

    def peek(
        self, prefix: str, default: Any = (None, None), side: str = "front"
    ) -> tuple[Any, Any]:
        """(key, value) of the first (``side="front"``) or last row of ``prefix``."""
        order = "ASC" if side == "front" else "DESC"
        row = self._con.execute(
            _PEEK_SQL.format(order), (f"{prefix}-000000000000000", f"{prefix}-999999999999999")
        ).fetchone()
        if row is None:
            return default  # type: ignore[no-any-return]
        return row[0], _value(row[1], row[2], row[0])


# --------------------------------------------------------------------------- damaged databases


@dataclass
class ScanStats:
    """What :func:`scan_rows` could not read.

    Attributes:
        unreadable: damaged places: each row that could not be decoded, and each stretch
            of row numbers that SQLite could not read (a damaged page hides a stretch).
    """

    unreadable: int = 0


def _upper_rowid(con: sqlite3.Connection) -> int | None:
    """The largest row number, from the table or else from its key index."""
    try:
        row = con.execute("SELECT max(rowid) FROM Cache").fetchone()
        return None if row is None or row[0] is None else int(row[0])
    except sqlite3.DatabaseError:
        pass
    upper = None
    try:  # the index holds every row number too; read as far as it goes
        for (rowid,) in con.execute("SELECT rowid FROM Cache INDEXED BY Cache_key_raw"):
            upper = int(rowid) if upper is None else max(upper, int(rowid))
    except sqlite3.DatabaseError:
        pass
    return upper


def _decoded(key: object, raw: object, mode: object, value: object, stats: ScanStats) -> Any:
    """(key, text) of one of our rows, None for a row that cannot be (counted)."""
    if not isinstance(key, str) or raw != 1 or mode != _MODE_RAW or not isinstance(value, str):
        stats.unreadable += 1
        return None
    return key, value


def scan_rows(
    con: sqlite3.Connection, stats: ScanStats, deadline: float | None = None
) -> Iterator[tuple[str, str]]:
    """Every readable (key, text) row of the ``Cache`` table, in row number order.

    What cannot be read is counted in ``stats.unreadable``. Without a known largest
    row number, the scan ends after 100,000 row numbers in a row that were absent or
    unreadable.

    Raises:
        TimeoutError: ``deadline`` (``time.monotonic()``) passed.
    """
    upper = _upper_rowid(con)
    pos = blind = 0
    damaged = False  # inside a stretch of unreadable row numbers
    while True:
        try:
            for rowid, key, raw, mode, value in con.execute(_RANGE_SQL, (pos,)):
                pos, blind, damaged = int(rowid), 0, False
                item = _decoded(key, raw, mode, value, stats)
                if item is not None:
                    yield item
            if upper is None or pos >= upper:
                return
        except sqlite3.DatabaseError:
            pass
        # Row pos + 1, or a page on the way to it, is damaged: read single rows past it.
        pos += 1
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the scan ran out of time")
        if (upper is not None and pos > upper) or blind > _MAX_BLIND_PROBES:
            return
        try:
            row = con.execute(_POINT_SQL, (pos,)).fetchone()
        except sqlite3.DatabaseError:
            stats.unreadable += 0 if damaged else 1
            blind, damaged = blind + 1, True
            continue
        if row is None:
            blind += 1
            continue
        blind, damaged = 0, False
        item = _decoded(row[0], row[1], row[2], row[3], stats)
        if item is not None:
            yield item


def entry_rows_of(key: str, text: str) -> list[list[Any]] | None:
    """The entry rows held by a stored row (chunk, retry group, lease, dead letter).

    None for a row that holds no entries (counters, indexes, failure log).

    Raises:
        CorruptData: the row is one of ours but cannot be decoded.
    """
    if key.startswith((f"{MAIN}-", f"{RETRY}-")):
        return entry_rows(text, key)
    if key.startswith((LEASE_PREFIX, DEAD_PREFIX)):
        return check_rows(record_rows(loads(text, key), key), key)
    return None


def count_entries(gen: Path, *, budget: float = 1.0) -> int | None:
    """Entries (pending, in flight, dead) a database folder held, None if unknown.

    Reads the counters row when it can; otherwise counts the entries of every readable
    row within ``budget`` seconds (None when none is found). Never writes the database
    file. A counters row read from a database whose WAL was lost is the count at the
    last checkpoint.
    """
    deadline = time.monotonic() + budget
    for immutable in (False, True):
        try:
            con = connect_readonly(gen / DB_NAME, immutable=immutable, tolerant=True, timeout=0.1)
        except sqlite3.Error:
            continue
        try:
            with contextlib.suppress(sqlite3.Error, CorruptData):
                raw = ReadOnlyView(con).get(META_KEY)
                if raw is not None:
                    return Counters.decode(raw).stored
            with contextlib.suppress(sqlite3.Error, TimeoutError):
                return _count_by_scan(con, deadline)
        finally:
            con.close()
    return None


def _count_by_scan(con: sqlite3.Connection, deadline: float) -> int | None:
    con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # no schema: nothing to scan
    stats = ScanStats()
    total = 0
    for key, text in scan_rows(con, stats, deadline):
        try:
            rows = entry_rows_of(key, text)
        except CorruptData:
            stats.unreadable += 1
            continue
        if rows is not None:
            total += len(rows)
    # Nothing found: an empty database, or one whose content is lost (a deleted WAL):
    # it cannot be told, so it is unknown.
    return total or None
