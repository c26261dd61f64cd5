"""The queue look-ups ``status`` and ``salvage`` need, from :mod:`per_buffer.queue`.

Transitional: :mod:`per_buffer.queue` is gaining public functions for these
(``queue_directories``, ``inspect``, ``quarantined_folders``, ``salvage``,
``DurableQueue.delivery_state``). Until each one lands, the fallback here does
the same with what exists; this module goes away once all of them are there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import queue as _queue
from ..queue import DurableQueue, QueueStats


def is_queue_directory(path: Path) -> bool:
    """True when ``path`` holds a per_buffer queue."""
    public = getattr(_queue, "is_queue_directory", None)
    if public is not None:
        return bool(public(path))
    from .._queue_storage import is_queue_directory as private  # noqa: PLC0415

    return private(path)


def quarantined_folders(path: Path) -> list[Path]:
    """The databases the queue in ``path`` moved aside as unreadable."""
    public = getattr(_queue, "quarantined_folders", None)
    if public is not None:
        return [Path(p) for p in public(path)]
    from .._queue_storage import quarantined_folders as private  # noqa: PLC0415

    return [path / name for name in private(path)]


def queue_directories(root: Path) -> list[Path]:
    """Every queue directory directly under ``root``."""
    public = getattr(_queue, "queue_directories", None)
    if public is not None:
        return [Path(p) for p in public(root)]
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    return [p for p in children if is_queue_directory(p)]


def inspect(path: Path) -> QueueStats | None:
    """The queue's counters (None when ``path`` holds no queue)."""
    public = getattr(_queue, "inspect", None)
    if public is not None:
        result: QueueStats | None = public(path)
        return result
    if not is_queue_directory(path):
        return None
    with DurableQueue(path, reserve_bytes=0) as queue:
        return queue.stats()


def delivery_state(path: Path) -> dict[str, Any] | None:
    """What the delivery worker last wrote about itself (None when nothing was written)."""
    if not hasattr(DurableQueue, "delivery_state"):
        return None
    with DurableQueue(path, reserve_bytes=0) as queue:
        state: dict[str, Any] | None = queue.delivery_state()  # type: ignore[attr-defined]
    return state


def salvage(quarantine_dir: Path, into: DurableQueue) -> Any:
    """Re-queue the readable entries of a quarantined database into ``into``.

    None when :mod:`per_buffer.queue` has no ``salvage`` yet.
    """
    public = getattr(_queue, "salvage", None)
    if public is None:
        return None
    return public(quarantine_dir, into=into)
