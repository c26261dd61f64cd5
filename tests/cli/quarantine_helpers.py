"""Queue directories holding quarantined databases, for the status and salvage tests."""

from __future__ import annotations

import os
from pathlib import Path

from cli_helpers import backlog

from per_buffer.queue import DurableQueue


def quarantine_readable(directory: Path, users: int) -> Path:
    """Move an intact database of ``users`` activities aside, as a process finding damage does."""
    backlog(directory, users, billing_id="saved")
    with DurableQueue(directory) as queue:
        queue._storage.quarantine("simulated damage")  # what a process finding damage does
        assert sum(queue.counts()) == 0
    (folder,) = sorted(directory.glob("quarantine-*"))
    return folder


def quarantine_garbage(directory: Path, users: int) -> Path:
    """Overwrite a closed database with random bytes; opening it moves it aside."""
    backlog(directory, users, billing_id="garbled")
    (database,) = sorted(directory.glob("db-*/cache.db"))
    database.write_bytes(os.urandom(database.stat().st_size))
    with DurableQueue(directory) as queue:
        assert queue.stats().quarantined == 1
    (folder,) = sorted(directory.glob("quarantine-*"))
    return folder
