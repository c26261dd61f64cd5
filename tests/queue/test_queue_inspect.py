"""Looking at queue directories without opening them: inspect() and the directory look-ups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from queue_helpers import generation, items, run_helper

from per_buffer.errors import QueueError
from per_buffer.queue import (
    DurableQueue,
    inspect,
    is_queue_directory,
    quarantined_folders,
    queue_directories,
)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and modification time (ns)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        info = path.stat()
        out[str(path.relative_to(directory))] = (info.st_size, info.st_mtime_ns)
    return out


def test_inspect_neither_reclaims_nor_writes(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(5))
        queue.set_delivery_state({"pause_reason": "auth"})
    claimed = json.loads(run_helper("claim_and_exit", str(qdir), "2", "close").stdout)
    assert claimed == [1, 2]  # leased by a process that is gone now
    before = snapshot(qdir)
    assert not (generation(qdir) / "cache.db-wal").exists()
    stats = inspect(qdir)
    assert stats is not None
    assert (stats.pending, stats.in_flight, stats.generation) == (3, 2, 1)
    assert stats.delivery_state == {"pause_reason": "auth"}
    assert stats.oldest_pending_age is not None and stats.oldest_pending_age > 0
    assert snapshot(qdir) == before  # no -wal, no -shm, no reserve, nothing touched
    with DurableQueue(qdir) as queue:  # opening as a queue reclaims the dead owner's lease
        assert queue.counts() == (5, 0)


def test_inspect_a_queue_in_use_with_its_totals(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(4))
        claim = queue.claim(4)
        queue.ack(claim, [1, 2], coalesced=True)  # type: ignore[arg-type]
        queue.dead_letter(claim, [3], "bad")  # type: ignore[arg-type]
        queue._storage.quarantine("simulated damage")  # 2 entries moved aside
        queue.put(items(3, "new"))
        stats = inspect(qdir)  # while this process holds the database open
        assert stats is not None
        assert (stats.pending, stats.in_flight, stats.dead_lettered) == (3, 0, 0)
        assert (stats.quarantines, stats.quarantined_entries, stats.generation) == (1, 2, 2)
        assert stats.quarantined == 0 and stats.bytes_on_disk > 0
        assert stats.failure_seq == queue.failure_seq()
        expected = queue.stats()
        assert (stats.dropped, stats.delivered) == (expected.dropped, expected.delivered)


def test_inspect_what_is_not_a_queue(tmp_path: Path) -> None:
    assert inspect(tmp_path / "missing") is None
    assert inspect(tmp_path) is None
    (tmp_path / "file").write_text("x")
    assert inspect(tmp_path / "file") is None


def test_inspect_a_damaged_database_raises(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(3))
    db = generation(qdir) / "cache.db"
    db.write_bytes(os.urandom(db.stat().st_size))
    with pytest.raises(QueueError, match="cannot read"):
        inspect(qdir)


def test_directory_look_ups(tmp_path: Path) -> None:
    root = tmp_path / "cache-root"
    root.mkdir()
    assert queue_directories(root) == [] and queue_directories(tmp_path / "none") == []
    for name in ("b-queue", "a-queue"):
        with DurableQueue(root / name) as queue:
            queue.put(items(1))
    (root / "not-a-queue").mkdir()
    (root / "stray-file").write_text("x")
    assert queue_directories(root) == [root / "a-queue", root / "b-queue"]
    assert is_queue_directory(root / "a-queue") and not is_queue_directory(root / "not-a-queue")
    assert not is_queue_directory(root / "missing")
    assert quarantined_folders(root / "a-queue") == []
    with DurableQueue(root / "a-queue") as queue:
        queue._storage.quarantine("simulated damage")
        queue._storage.quarantine("simulated damage")
    folders = quarantined_folders(root / "a-queue")
    assert len(folders) == 2 and all(isinstance(folder, Path) for folder in folders)
    assert [f.name.rsplit("-", 1)[1] for f in folders] == ["0001", "0002"]
    assert all(f.parent == root / "a-queue" and f.is_dir() for f in folders)
    assert quarantined_folders(tmp_path / "missing") == []
