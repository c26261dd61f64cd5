"""What lives in a queue directory: file names, database folders, and ``totals.json``.

A queue directory holds ``queue.lock``, ``reserve.bin``, ``totals.json``, the live database
in the highest-numbered ``db-<n>/`` folder and any ``quarantine-<stamp>-db-<n>/`` folders
moved aside. This module names them, lists them, and reads and writes ``totals.json``
(the counters that must survive a quarantine). It opens no database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Final

_log = logging.getLogger("per_buffer.queue")

DB_NAME: Final = "cache.db"
GEN_PREFIX: Final = "db-"
QUARANTINE_PREFIX: Final = "quarantine-"
LOCK_NAME: Final = "queue.lock"
RESERVE_NAME: Final = "reserve.bin"
TOTALS_NAME: Final = "totals.json"
SALVAGE_MARKER: Final = "salvaged.json"

#: Ids stay unique within a directory across quarantines: database n starts at
#: (n - 1) * 10**12 + 1 (keys hold 15 digits: 999 databases).
IDS_PER_GENERATION: Final = 10**12


def generation_number(name: str) -> int | None:
    """The number n of a ``db-<n>`` or ``quarantine-<stamp>-db-<n>`` folder name, else None."""
    if name.startswith(GEN_PREFIX):
        tail = name[len(GEN_PREFIX) :]
    elif name.startswith(QUARANTINE_PREFIX) and f"-{GEN_PREFIX}" in name:
        tail = name.rsplit(f"-{GEN_PREFIX}", 1)[1]
    else:
        return None
    return int(tail) if tail.isdigit() else None


def first_id(number: int) -> int:
    """The first entry id of database number ``number``."""
    return (min(max(number, 1), 999) - 1) * IDS_PER_GENERATION + 1


def generations(directory: Path) -> tuple[list[tuple[int, Path]], int]:
    """Live database folders (sorted by number) and the highest number ever used.

    Raises:
        OSError: the directory cannot be listed.
    """
    live: list[tuple[int, Path]] = []
    highest = 0
    for name in os.listdir(directory):
        number = generation_number(name)
        if number is None:
            continue
        highest = max(highest, number)
        path = directory / name
        if name.startswith(GEN_PREFIX) and path.is_dir():
            live.append((number, path))
    live.sort()
    return live, highest


def utc_stamp() -> str:
    """A sortable UTC timestamp for quarantine folder names."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def replace_file(path: Path, fill: Callable[[int], object]) -> None:
    """Write ``path`` whole or not at all: ``fill(fd)`` a temporary file, then rename it.

    Raises:
        OSError: the file could not be written (the temporary file is removed).
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fill(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def write_json_atomically(path: Path, value: object) -> None:
    """Write ``value`` as JSON to ``path``: temporary file, fsync, rename, fsync the folder.

    Raises:
        OSError: the file could not be written (nothing is left half-written).
    """
    data = json.dumps(value, sort_keys=True).encode("utf-8")

    def fill(fd: int) -> None:
        os.write(fd, data)
        os.fsync(fd)

    replace_file(path, fill)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(frozen=True)
class Totals:
    """Counters of a queue directory kept outside its databases (``totals.json``).

    Attributes:
        quarantines: databases moved aside as unreadable.
        quarantined_entries: entries (pending, in flight, dead) those databases held,
            as far as they could be counted.
        quarantines_uncounted: databases moved aside whose entries could not be counted
            (their entries are missing from ``quarantined_entries``).
        salvaged_entries: entries that :func:`~per_buffer.queue.salvage` stored again.
    """

    quarantines: int = 0
    quarantined_entries: int = 0
    quarantines_uncounted: int = 0
    salvaged_entries: int = 0


def read_totals(directory: Path) -> Totals:
    """The directory's totals; zeros when the file is missing or unreadable (logged)."""
    path = directory / TOTALS_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Totals()
    except OSError as exc:
        _log.warning("cannot read %s: %s", path, exc)
        return Totals()
    try:
        data = json.loads(raw)
        return Totals(
            quarantines=int(data.get("quarantines", 0)),
            quarantined_entries=int(data.get("quarantined_entries", 0)),
            quarantines_uncounted=int(data.get("quarantines_uncounted", 0)),
            salvaged_entries=int(data.get("salvaged_entries", 0)),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        _log.warning("%s is malformed (%s); its counters read as zero", path, exc)
        return Totals()


def write_totals(directory: Path, totals: Totals) -> None:
    """Replace ``totals.json`` atomically. Call with the exclusive directory lock held.

    Raises:
        OSError: it could not be written.
    """
    write_json_atomically(directory / TOTALS_NAME, {"version": 1, **asdict(totals)})


# --------------------------------------------------------------------------- public look-ups


def is_queue_directory(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a per_buffer queue (its lock file or a database folder)."""
    directory = Path(path)
    try:
        return (directory / LOCK_NAME).exists() or any(
            generation_number(p.name) is not None for p in directory.glob(f"{GEN_PREFIX}*")
        )
    except OSError:
        return False


def quarantined_folders(path: str | os.PathLike[str]) -> list[Path]:
    """The databases of queue directory ``path`` moved aside as unreadable, oldest first.

    Each is a ``quarantine-<UTC stamp>-db-<n>`` folder that :func:`salvage` can read.
    An unreadable or missing ``path`` gives an empty list.
    """
    try:
        return sorted(p for p in Path(path).glob(f"{QUARANTINE_PREFIX}*") if p.is_dir())
    except OSError:
        return []


def queue_directories(root: str | os.PathLike[str]) -> list[Path]:
    """Every queue directory directly under ``root`` (e.g. ``~/.cache/per-buffer``), sorted.

    ``root`` itself is not included; a missing or unreadable root gives an empty list.
    """
    try:
        children = sorted(p for p in Path(root).iterdir() if p.is_dir())
    except OSError:
        return []
    return [child for child in children if is_queue_directory(child)]
