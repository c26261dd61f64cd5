"""salvage(): re-queue what a quarantined database still holds, damaged ones included."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
from queue_helpers import FakeClock, drain, generation, ids, items, run_helper

from per_buffer.errors import QueueError
from per_buffer.queue import AlreadySalvagedError, DurableQueue, quarantined_folders, salvage


def fingerprint(folder: Path) -> dict[str, str]:
    """Name -> sha256 of every file in ``folder``."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def quarantine_one(qdir: Path) -> Path:
    """Move the live database of ``qdir`` aside as a damaged one would be; return the folder."""
    with DurableQueue(qdir) as queue:
        queue._storage.quarantine("simulated damage")
    (folder,) = quarantined_folders(qdir)
    return folder


def test_salvage_requeues_every_kind_of_row_and_keeps_dead_letters(
    qdir: Path, clock: FakeClock
) -> None:
    with DurableQueue(qdir, clock=clock) as queue:
        queue.put(items(1100, "m"))  # three main-queue chunks
        claim = queue.claim(10)
        queue.release(claim, ids(claim)[:4], not_before=clock.now + 60, error="HTTP 503")  # type: ignore[arg-type]
        queue.release(claim, ids(claim)[4:6], not_before=0, refused=True, error="x")  # type: ignore[arg-type]
        queue.dead_letter(claim, ids(claim)[6:8], "invalid_parameter")  # type: ignore[arg-type]
        queue.ack(claim, ids(claim)[8:])  # type: ignore[arg-type]  # delivered: not salvaged
        queue.claim(5)  # left leased
        queue._storage.quarantine("simulated damage")
    (folder,) = quarantined_folders(qdir)
    before = fingerprint(folder)
    with DurableQueue(qdir, clock=clock) as live:
        assert live.counts() == (0, 0)
        result = salvage(folder, live)
        assert (result.requeued, result.dead_letters) == (1096, 2)
        assert (result.unreadable, result.missing, result.duplicates_skipped, result.refused) == (
            0,
            0,
            0,
            0,
        )
        stats = live.stats()
        assert (stats.pending, stats.dead_lettered, stats.salvaged_entries) == (1096, 2, 1098)
        dead, _ = live.dead_letters()
        assert dead.reason == "invalid_parameter"
        assert (dead.entry.attempts, dead.entry.failures) == (1, 1)
        got = {entry.activity.user_id: entry for entry in drain(live)}
        assert len(got) == 1096
        assert (got["m0"].failures, got["m0"].attempts, got["m0"].last_error) == (1, 0, "HTTP 503")
        assert (got["m4"].failures, got["m4"].attempts, got["m4"].last_error) == (1, 1, "x")
        assert got["m1099"].recorded_at == 1000.0 + 1099
        assert "m8" not in got and "m6" not in got  # acked; dead-lettered
    assert fingerprint(folder) == {**before, "salvaged.json": fingerprint(folder)["salvaged.json"]}
    marker = json.loads((folder / "salvaged.json").read_text())
    assert (marker["state"], marker["requeued"], marker["into"]) == ("done", 1096, str(qdir))


def test_salvage_twice_is_refused_unless_forced(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(3))
    folder = quarantine_one(qdir)
    with DurableQueue(qdir) as live:
        assert salvage(folder, live).requeued == 3
        with pytest.raises(AlreadySalvagedError, match="already salvaged") as error:
            salvage(folder, live)
        assert error.value.marker == folder / "salvaged.json"
        assert live.counts() == (3, 0)
        assert salvage(folder, live, force=True).requeued == 3
        assert live.counts() == (6, 0)


def test_salvage_refuses_what_is_not_a_quarantined_database(qdir: Path, tmp_path: Path) -> None:
    with DurableQueue(qdir) as live:
        live.put(items(1))
        with pytest.raises(ValueError, match="live database"):
            salvage(generation(qdir), live)
        with pytest.raises(ValueError, match="holds no queue database"):
            salvage(tmp_path, live)
        folder = quarantine_one(qdir)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another salvage of it is running
            with pytest.raises(QueueError, match="another salvage"):
                salvage(folder, live)
        finally:
            os.close(fd)


def test_salvage_into_a_full_queue_counts_the_refused(tmp_path: Path) -> None:
    source = tmp_path / "source"
    with DurableQueue(source) as queue:
        queue.put(items(10))
    folder = quarantine_one(source)
    with DurableQueue(tmp_path / "live", max_items=4) as live:
        result = salvage(folder, live)
        assert (result.requeued, result.refused) == (4, 6)
        assert live.stats().dropped == {"queue_full": 6}


# --------------------------------------------------------------------------- damaged databases


def big_quarantine(qdir: Path, batches: int) -> tuple[Path, int]:
    """A cleanly closed queue of ``batches`` x 100 entries, moved aside; (folder, entries)."""
    run_helper("fill", str(qdir), str(batches), "100", "close")
    return quarantine_one(qdir), batches * 100


def malformed(db: Path) -> bool:
    """Does SQLite itself fail to read the whole table?"""
    con = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        con.execute("SELECT count(*), sum(length(value)) FROM Cache").fetchone()
    except sqlite3.DatabaseError:
        return True
    finally:
        con.close()
    return False


def test_salvage_reads_past_garbage_pages(qdir: Path) -> None:
    folder, total = big_quarantine(qdir, 150)
    db = folder / "cache.db"
    size = db.stat().st_size
    with open(db, "r+b") as handle:  # a few pages in the middle overwritten
        handle.seek((size // 2) // 4096 * 4096)
        handle.write(os.urandom(6 * 4096))
    assert malformed(db)
    with DurableQueue(qdir) as live:
        result = salvage(folder, live)
        got = [entry.activity.user_id for entry in drain(live)]
    assert 0 < result.requeued < total
    assert result.unreadable > 0
    assert result.missing == total - result.requeued
    assert "fill-149-99" in got and "fill-0-0" in got  # both sides of the damage
    assert len(set(got)) == len(got) == result.requeued


def test_salvage_of_a_truncated_database(qdir: Path) -> None:
    folder, total = big_quarantine(qdir, 100)
    db = folder / "cache.db"
    os.truncate(db, db.stat().st_size * 6 // 10)
    assert malformed(db)
    with DurableQueue(qdir) as live:
        result = salvage(folder, live)
        assert live.counts() == (result.requeued, 0)
    assert 0 < result.requeued < total
    if result.missing is not None:  # the counters row survived the cut
        assert result.requeued + result.missing == total


def test_salvage_after_the_wal_was_deleted(qdir: Path) -> None:
    # A crashed writer's WAL held the last commits; the checkpointed part is still there.
    run_helper("fill", str(qdir), "150", "100", "crash")
    (generation(qdir) / "cache.db-wal").unlink()
    with DurableQueue(qdir) as live:  # the index says frames are missing: moved aside
        (folder,) = quarantined_folders(qdir)
        result = salvage(folder, live)
        got = {entry.activity.user_id for entry in drain(live)}
    assert result.requeued == len(got) > 0
    assert got <= {f"fill-{b}-{i}" for b in range(150) for i in range(100)}
    assert result.unreadable == 0


def test_salvage_of_a_database_with_a_garbage_header(qdir: Path) -> None:
    folder, _ = big_quarantine(qdir, 5)
    db = folder / "cache.db"
    with open(db, "r+b") as handle:
        handle.write(os.urandom(4096))
    with DurableQueue(qdir) as live:
        result = salvage(folder, live)
        assert live.counts() == (0, 0)
    assert (result.requeued, result.unreadable, result.missing) == (0, 1, None)
    assert json.loads((folder / "salvaged.json").read_text())["state"] == "done"
