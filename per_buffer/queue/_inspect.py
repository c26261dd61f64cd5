"""A look at a queue directory that writes nothing: :func:`inspect`."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import QueueError
from . import _model as model
from ._health import CorruptData, file_size
from ._layout import DB_NAME, first_id, generations, is_queue_directory, read_totals
from ._reader import ReadOnlyView
from ._rows import Counters
from ._types import QueueStats


def inspect(path: str | os.PathLike[str]) -> QueueStats | None:
    """A snapshot of the queue directory ``path`` without opening it as a queue.

    Unlike ``DurableQueue(path).stats()`` it reclaims no lease, creates no file or
    table and takes no lock that could delay a process using the queue: the live
    database is read through a read-only SQLite connection (``immutable`` when no
    process has it open, so no ``-wal``/``-shm`` file appears). ``quarantined`` is 0;
    the persistent ``quarantines`` counts come from ``totals.json``.

    Returns None when ``path`` holds no queue; zero counts when it holds no live
    database (only quarantined ones, say).

    Raises:
        QueueError: the live database cannot be read (damaged, locked by a recovery).
    """
    directory = Path(os.fspath(path)).expanduser().absolute()
    if not is_queue_directory(directory):
        return None
    totals = read_totals(directory)
    try:
        live, _ = generations(directory)
    except OSError as exc:
        raise QueueError(f"cannot list the queue directory {directory}: {exc}") from exc
    meta, oldest, state, number, size = Counters(), None, None, 0, 0
    if live:
        number, gen = live[-1]
        meta, oldest, state = _read_live(gen, number)
        size = sum(max(0, file_size(gen / (DB_NAME + s))) for s in ("", "-wal", "-shm"))
    return meta.stats(
        totals,
        oldest_pending_age=None if oldest is None else max(0.0, time.time() - oldest),
        bytes_on_disk=size,
        quarantined=0,
        generation=number,
        delivery_state=state,
    )


def _read_live(gen: Path, number: int) -> tuple[Counters, float | None, Mapping[str, Any] | None]:
    """(counters, oldest recorded_at, delivery state) of a live database, read-only."""
    try:
        view = ReadOnlyView.open(gen)
        try:
            with view:
                meta = Counters.load(view, first_id(number))
                return meta, model.oldest_recorded(view, meta), model.delivery_state(view)
        finally:
            view.close()
    except (sqlite3.Error, CorruptData) as exc:
        raise QueueError(f"cannot read the queue database in {gen}: {exc}") from exc
