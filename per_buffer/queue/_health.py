"""Is a queue database safe to open, and what kind of failure is an error?

Two jobs, both about the files rather than the queue's rows:

* :func:`inspect_files` looks at a database folder before SQLite opens it (the header,
  truncation, the WAL against its shared-memory index, WAL checksums): the damage a
  killed process, a full disk or a stray write leaves, which SQLite would otherwise hide
  (by silently rolling back committed frames) or trip on later;
* :func:`classify` sorts a storage exception into "corrupt", "full", "locked" or "other",
  which decides between quarantine, releasing the reserve, retrying and giving up.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import diskcache

from ._layout import DB_NAME
from ._process import boot_time

# SQLite primary result codes (sqlite3.Error.sqlite_errorcode exists from Python 3.11).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26
_SQLITE_IOERR_SHMSIZE: Final = 10 | (19 << 8)

_WAL_MAGIC: Final = (0x377F0682, 0x377F0683)
_WAL_VERSION: Final = 3007000
_SHM_HEADER: Final = struct.Struct("=IIIBBHII2I8s2I")  # WalIndexHdr, 48 bytes, native order


class CorruptData(Exception):
    """A stored row could not be decoded: treated like SQLite corruption."""


class LockTimeout(Exception):
    """The directory lock could not be taken before the deadline."""


def _error_codes(exc: BaseException) -> Iterator[tuple[int | None, str]]:
    """(sqlite error code, lowercase message) of ``exc`` and of its context chain."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        if isinstance(current, sqlite3.Error):
            code = getattr(current, "sqlite_errorcode", None)
            yield (code if isinstance(code, int) else None), str(current).lower()
        elif isinstance(current, OSError):
            yield None, f"oserror {current.errno}"
        seen += 1
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> str:
    """One of "corrupt", "full", "locked", "other"."""
    if isinstance(exc, CorruptData):
        return "corrupt"
    if isinstance(exc, LockTimeout):
        return "locked"
    kinds: set[str] = set()
    for code, message in _error_codes(exc):
        primary = None if code is None else code & 0xFF
        if (
            primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
            or "malformed" in message
            or "not a database" in message
        ):
            kinds.add("corrupt")
        elif (
            primary == _SQLITE_FULL
            or code == _SQLITE_IOERR_SHMSIZE
            or "disk is full" in message
            or message in (f"oserror {errno.ENOSPC}", f"oserror {errno.EDQUOT}")
        ):
            kinds.add("full")
        elif primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in message or "busy" in message:
            kinds.add("locked")
    if isinstance(exc, diskcache.Timeout) and not kinds:
        kinds.add("locked")
    for kind in ("corrupt", "full", "locked"):
        if kind in kinds:
            return kind
    return "other"


def _wal_checksum(
    data: bytes, big_endian: bool, start: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data``, continuing from ``start``."""
    words = struct.unpack((">" if big_endian else "<") + f"{len(data) // 4}I", data)
    s1, s2 = start
    for index in range(0, len(words), 2):
        s1 = (s1 + words[index] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[index + 1] + s1) & 0xFFFFFFFF
    return s1, s2


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def inspect_files(gen: Path) -> tuple[str | None, int | None]:
    """Look for damage SQLite would hide or trip on later.

    Returns (a description of the damage or None, the number of WAL frames the index
    promises when some are not yet copied into the database, else None).

    Reads the database header and compares the WAL with its shared-memory index: the
    state a killed process leaves behind. An index written before the last boot is not
    trusted (after a power loss a short WAL is expected with ``synchronous=NORMAL``).
    Must only run while no operation is in progress (exclusive directory lock) and no
    connection of this process is open on these files (closing a descriptor would drop
    this process's POSIX locks).
    """
    db = gen / DB_NAME
    wal = gen / (DB_NAME + "-wal")
    db_size, wal_size = file_size(db), file_size(wal)
    try:
        if db_size <= 0:
            if wal_size > 32:
                return f"{db} is missing or empty but {wal} holds {wal_size} bytes", None
            return None, None
        header = _read_header(db)
        if isinstance(header, str):
            return header, None
        page_size, header_pages = header
        index = _read_index(gen / (DB_NAME + "-shm"))
        if index is not None:
            fields, n_backfill = index
            unbackfilled = max(0, fields[6] - n_backfill)
            if unbackfilled:
                if wal_size < 0:
                    return (
                        f"{wal} is missing: {unbackfilled} committed frames had not been "
                        "copied into the database"
                    ), None
                return _check_wal(wal, wal_size, fields), fields[6]
        elif wal_size > 0:
            with open(wal, "rb") as handle:
                first = handle.read(4)
            if len(first) < 4 or struct.unpack(">I", first)[0] not in _WAL_MAGIC:
                return f"{wal} does not start with a WAL header (overwritten?)", None
        if (
            header_pages > 0
            and (wal_size <= 0 or (index is not None and index[0][6] == index[1]))
            and db_size < header_pages * page_size
        ):
            return (
                f"{db} is truncated: {db_size} bytes, its header says "
                f"{header_pages} pages of {page_size} bytes"
            ), None
    except OSError:
        return None, None  # unreadable for us: let SQLite decide
    return None, None


def _read_header(db: Path) -> tuple[int, int] | str:
    """(page size, pages the header claims, 0 when that count is not valid) or the damage."""
    with open(db, "rb") as handle:
        head = handle.read(100)
    if len(head) < 100 or head[:16] != b"SQLite format 3\x00":
        return f"{db} does not start with a SQLite header"
    page_size = struct.unpack(">H", head[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"{db} has an invalid page size {page_size}"
    (header_pages,) = struct.unpack(">I", head[28:32])
    # The page count is valid only when the change counter matches "version-valid-for".
    return page_size, header_pages if head[24:28] == head[92:96] else 0


def _read_index(shm: Path) -> tuple[tuple[Any, ...], int] | None:
    """(the WAL index header fields, frames backfilled) from ``shm``, None if not trusted."""
    booted = boot_time()
    if file_size(shm) < 136 or (booted is not None and os.stat(shm).st_mtime < booted):
        return None
    with open(shm, "rb") as handle:
        raw = handle.read(136)
    if len(raw) != 136 or raw[:48] != raw[48:96]:
        return None
    fields = _SHM_HEADER.unpack(raw[:48])
    if fields[0] != _WAL_VERSION or fields[3] != 1:
        return None
    (n_backfill,) = struct.unpack("=I", raw[96:100])
    return fields, n_backfill


def _check_wal(wal: Path, wal_size: int, index: tuple[Any, ...]) -> str | None:
    """Compare the WAL with its index header ``index`` (the unpacked WalIndexHdr).

    Checks the WAL header, the size, and the last committed frame in full: its stored
    checksum must match the index and its content, chained from the previous frame.
    """
    page_size = 65536 if index[5] == 1 else index[5]
    mx_frame, cksum, salt = index[6], tuple(index[8:10]), index[10]
    with open(wal, "rb") as handle:
        head = handle.read(32)
        if len(head) < 32:
            return f"{wal} is truncated ({len(head)} bytes)"
        magic = struct.unpack(">I", head[:4])[0]
        if magic not in _WAL_MAGIC:
            return f"{wal} does not start with a WAL header (overwritten?)"
        big_endian = bool(magic & 1)
        if _wal_checksum(head[:24], big_endian) != struct.unpack(">II", head[24:32]):
            return f"{wal} has a damaged header (checksum mismatch)"
        if head[16:24] != salt:
            return f"{wal} does not belong to its index (salt mismatch)"
        frame = 24 + page_size
        if wal_size < 32 + mx_frame * frame:
            return f"{wal} is truncated: {wal_size} bytes for {mx_frame} frames"
        if mx_frame > 1:
            handle.seek(32 + (mx_frame - 2) * frame)
            before = struct.unpack(">II", handle.read(24)[16:24])
        else:
            before = struct.unpack(">II", head[24:32])
        handle.seek(32 + (mx_frame - 1) * frame)
        last = handle.read(frame)
        stored = struct.unpack(">II", last[16:24])
        computed = _wal_checksum(last[:8] + last[24:], big_endian, before)
        if last[8:16] != salt or stored != cksum or computed != cksum:
            return f"{wal} has a damaged last frame (checksum mismatch)"
    return None
