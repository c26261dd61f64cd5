"""The storage under DurableQueue: locks, processes, fork, corruption, quarantine, full disk."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import drain, generation, ids, items, mp_worker, run_helper, users

from per_buffer.errors import QueueError
from per_buffer.queue import DurableQueue

if sys.platform != "win32":
    import fcntl


def test_directory_is_private(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    DurableQueue(fresh).close()
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    DurableQueue(existing).close()
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o700


def test_lock_timeout_raises_queue_error(qdir: Path) -> None:
    with DurableQueue(qdir, lock_timeout=0.4) as queue:
        queue.put(items(3))
        holder = sqlite3.connect(generation(qdir) / "cache.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            with pytest.raises(QueueError, match="locked"):
                queue.put(items(1))
            assert 0.3 < time.monotonic() - start < 5
            with pytest.raises(QueueError):
                queue.claim(1)
            assert queue.counts() == (3, 0)  # reads do not need the write lock
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert queue.put(items(1)).stored == 1
        assert len(drain(queue)) == 4


def test_fork_child_reopens_and_parent_keeps_working(qdir: Path) -> None:
    queue = DurableQueue(qdir)
    queue.put(items(10, "parent"))
    parent_cache = queue._storage.cache
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            queue.put(items(5, "child"))
            claim = queue.claim(4)
            assert queue._storage.cache is not parent_cache
            assert users(claim) == ["parent0", "parent1", "parent2", "parent3"]
            queue.ack(claim, ids(claim))
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert queue._storage.cache is parent_cache
    assert queue.counts() == (11, 0)
    got = [e.activity.user_id for e in drain(queue)]
    assert got == [f"parent{i}" for i in range(4, 10)] + [f"child{i}" for i in range(5)]
    queue.close()


def test_forked_workers_claim_disjoint_sets(qdir: Path, tmp_path: Path) -> None:
    queue = DurableQueue(qdir)  # opened before fork, like gunicorn --preload
    queue.put(items(600))
    children = []
    for n in range(3):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                got = []
                while (claim := queue.claim(7)) is not None:
                    got += ids(claim)
                    queue.ack(claim, ids(claim))
                (tmp_path / f"child{n}.json").write_text(json.dumps(got))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    seen = Counter(
        i for n in range(3) for i in json.loads((tmp_path / f"child{n}.json").read_text())
    )
    assert sorted(seen) == list(range(1, 601)) and max(seen.values()) == 1
    assert queue.counts() == (0, 0)
    queue.close()


def test_another_process_quarantine_is_followed(qdir: Path) -> None:
    a = DurableQueue(qdir)
    b = DurableQueue(qdir)
    try:
        a.put(items(3, "old"))
        old_gen = generation(qdir)
        b._storage.quarantine("simulated damage")  # what a process finding corruption does
        assert not old_gen.exists()
        a.put(items(2, "new"))  # a notices the new database and writes there
        fresh = drain(b)
        assert [e.activity.user_id for e in fresh] == ["new0", "new1"]
        assert [e.id for e in fresh] == [10**12 + 1, 10**12 + 2]  # unique in the directory
        assert b.stats().quarantined == 1 and a.stats().quarantined == 0
        # the directory's totals are shared: both see the 3 entries moved aside
        assert (a.stats().quarantines, a.stats().quarantined_entries) == (1, 3)
        assert a.generation == b.generation == 2
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- corruption


def _crashed_queue(qdir: Path, batches: int = 20, close: bool = False) -> Path:
    run_helper("fill", str(qdir), str(batches), "100", "close" if close else "crash")
    return generation(qdir)


def _assert_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture, queue: DurableQueue) -> None:
    stats = queue.stats()
    assert stats.quarantined == 1 and stats.quarantines == 1 and stats.generation == 2
    # counted from its counters row or its readable rows, or else counted as unknown
    assert (stats.quarantined_entries > 0) != (stats.quarantines_uncounted == 1)
    moved = sorted(qdir.glob("quarantine-*-db-0001"))
    assert len(moved) == 1 and (moved[0] / "cache.db").exists()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "no ERROR logged"
    message = errors[-1].getMessage()
    assert str(qdir / "db-0001" / "cache.db") in message and str(moved[0]) in message
    assert queue.put(items(3, "fresh")).stored == 3
    assert [e.activity.user_id for e in drain(queue)] == ["fresh0", "fresh1", "fresh2"]


def test_truncated_database_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir, batches=100, close=True)
    db = gen / "cache.db"
    os.truncate(db, db.stat().st_size // 2)
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_garbage_database_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir, close=True)
    db = gen / "cache.db"
    db.write_bytes(os.urandom(db.stat().st_size))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_deleted_wal_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A killed writer left a WAL; deleting it loses committed transactions.

    The -shm index still says which frames had not been copied into the database, so
    the loss is detected, logged and the database moved aside (not silently rolled back).
    """
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    (gen / "cache.db-wal").unlink()
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_deleted_wal_and_shm_falls_back_to_last_checkpoint(qdir: Path) -> None:
    """With the -shm gone as well nothing tells what was lost: the database opens at
    its last checkpoint (uncheckpointed items are lost, acked ones may come back)."""
    gen = _crashed_queue(qdir)
    (gen / "cache.db-wal").unlink()
    (gen / "cache.db-shm").unlink()
    with DurableQueue(qdir) as queue:
        pending, in_flight = queue.counts()
        assert 0 <= pending <= 2000 and in_flight == 0
        assert len(drain(queue)) == pending
        assert queue.put(items(2)).stored == 2 and len(drain(queue)) == 2
        assert queue.stats().quarantined == 0


def test_garbage_wal_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    wal = gen / "cache.db-wal"
    with open(wal, "r+b") as handle:
        handle.write(os.urandom(4096))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_garbage_wal_tail_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    wal = gen / "cache.db-wal"
    with open(wal, "r+b") as handle:
        handle.seek(wal.stat().st_size - 3000)
        handle.write(os.urandom(3000))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_garbage_inside_wal_is_quarantined(qdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage in the middle of the WAL: SQLite's recovery would silently drop every
    commit from the first bad checksum on; the frame count it keeps is compared with the
    count the -shm index promised, so the damage is detected."""
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir)
    wal = gen / "cache.db-wal"
    with open(wal, "r+b") as handle:
        handle.seek(wal.stat().st_size // 2)
        handle.write(os.urandom(8192))
    with DurableQueue(qdir) as queue:
        _assert_quarantined(qdir, caplog, queue)


def test_corruption_found_during_operation_is_quarantined(
    qdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir, batches=200, close=True)
    db = gen / "cache.db"
    size = db.stat().st_size
    with open(db, "r+b") as handle:  # the header and the first pages stay intact
        handle.seek(size // 4)
        handle.write(os.urandom(size // 2))
    with DurableQueue(qdir) as queue:
        delivered = drain(queue)  # no exception escapes: quarantine + fresh database
        assert len(delivered) < 20000
        _assert_quarantined(qdir, caplog, queue)


# --------------------------------------------------------------------------- processes


def test_four_processes_start_together_on_a_fresh_directory(tmp_path: Path) -> None:
    directory = tmp_path / "fresh"  # does not exist: every process races to create it
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    outs = [tmp_path / f"worker{n}.json" for n in range(4)]
    procs = [
        context.Process(target=mp_worker, args=(str(directory), n, barrier, str(outs[n]), 2000, 40))
        for n in range(4)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert "error" not in result, result["error"]
    put = [user for result in results for user in result["put"]]
    assert len(put) == len(set(put)) == 8000
    with DurableQueue(directory) as queue:
        leftover = [e.activity.user_id for e in drain(queue)]
    claims = [claim for result in results for claim in result["claims"]]
    acked = Counter(user for claim in claims for user in claim[2]) + Counter(leftover)
    assert set(acked) == set(put)
    assert max(acked.values()) == 1  # no failures here, so no duplicate either
    # no entry was ever held by two live leases: claim intervals of one user never overlap
    spans: dict[str, list[tuple[float, float]]] = {}
    for claimed, acking, claim_users in claims:
        for user in claim_users:
            spans.setdefault(user, []).append((claimed, acking))
    for intervals in spans.values():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert end <= start


# --------------------------------------------------------------------------- storage failures


@pytest.mark.root
def test_full_disk(tmpfs: Path) -> None:
    qdir = tmpfs / "queue"
    queue = DurableQueue(qdir, reserve_bytes=1024 * 1024)
    queue.put(items(500, "a"))
    stored = [f"a{i}" for i in range(500)]
    filler = tmpfs / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for block in (65536, 512):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * block)
    with pytest.raises(QueueError, match="no space"):
        for n in range(500):
            batch = items(100, f"b{n}.")
            queue.put(batch)
            stored += [activity.user_id for activity, _ in batch]
    # everything stored is still claimable, with the disk still full
    delivered = [e.activity.user_id for e in drain(queue, 100)]
    assert sorted(delivered) == sorted(stored)
    filler.unlink()
    assert queue.put(items(10, "c")).stored == 10
    assert len(drain(queue)) == 10
    queue.close()


@pytest.mark.root
def test_read_only_filesystem(tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    qdir = tmpfs / "queue"
    with DurableQueue(qdir) as queue:
        queue.put(items(20))
        queue.claim(5)
    # Linux refuses remount,ro while files are open for writing: closed first.
    result = subprocess.run(
        ["mount", "-o", "remount,ro", str(tmpfs)], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot remount read-only: {result.stderr.strip()}")
    queue = DurableQueue(qdir)  # does not raise: logs and retries on every call
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    with pytest.raises(QueueError):
        queue.put(items(1, "x"))
    for call in (lambda: queue.claim(5), queue.counts, queue.stats, queue.reclaim):
        with contextlib.suppress(QueueError):
            call()
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert queue.put(items(1, "x")).stored == 1  # heals by itself
    assert queue.counts() == (16, 5)
    queue.close()


@pytest.mark.root
def test_filesystem_failing_under_an_open_queue(tmp_path: Path) -> None:
    """ext4 shut down (EXT4_IOC_SHUTDOWN) while the queue is open: every write fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loop-mounts a small ext4 image")
    image, mount = tmp_path / "fs.img", tmp_path / "ext4"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(32 * 1024 * 1024)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(image)], check=False, capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 unavailable: {made.stderr.strip()}")
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], check=False, capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image: {mounted.stderr.strip()}")
    try:
        code = _run_shutdown_child(mount / "queue")
        assert code == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def _run_shutdown_child(qdir: Path) -> int:
    # In a child process: after the shutdown its open descriptors are useless.
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            queue = DurableQueue(qdir)
            queue.put(items(50))
            claim = queue.claim(5)
            fd = os.open(qdir, os.O_RDONLY)
            fcntl.ioctl(fd, 0x8004587D, b"\x02\x00\x00\x00")  # EXT4_IOC_SHUTDOWN, NOLOGFLUSH
            os.close(fd)
            try:
                queue.put(items(1, "late"))
            except QueueError:
                pass
            else:
                raise AssertionError("put succeeded on a shut-down filesystem")
            for call in (
                lambda: queue.claim(5),
                lambda: queue.ack(claim, ids(claim)),  # type: ignore[arg-type]
                queue.counts,
                queue.stats,
            ):
                with contextlib.suppress(QueueError):
                    call()
            code = 0
        except OSError as exc:
            code = 5 if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP) else 4
            traceback.print_exc()
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 5:
        pytest.skip("EXT4_IOC_SHUTDOWN not supported by this kernel")
    return code


# --------------------------------------------------------------------------- quarantine totals


def test_quarantine_totals_survive_the_databases_they_describe(qdir: Path) -> None:
    with DurableQueue(qdir) as queue:
        queue.put(items(10))
        claim = queue.claim(3)
        queue.dead_letter(claim, ids(claim)[:1], "bad")  # type: ignore[arg-type]
        queue._storage.quarantine("simulated damage")  # pending, in flight and dead: 10
        assert queue.put(items(5)).stored == 5
        queue._storage.quarantine("simulated damage")
        stats = queue.stats()
        assert (stats.quarantines, stats.quarantined_entries) == (2, 15)
        assert (stats.quarantines_uncounted, stats.generation) == (0, 3)
        assert (stats.pending, stats.in_flight, stats.dead_lettered) == (0, 0, 0)
    totals = json.loads((qdir / "totals.json").read_text())
    assert (totals["quarantines"], totals["quarantined_entries"]) == (2, 15)
    assert stat.S_IMODE(os.stat(qdir / "totals.json").st_mode) == 0o600
    with DurableQueue(qdir) as queue:
        assert (queue.stats().quarantines, queue.stats().quarantined_entries) == (2, 15)


def test_quarantine_counts_readable_rows_when_the_counters_row_is_damaged(
    qdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    with DurableQueue(qdir) as queue:
        queue.put(items(1200))
        queue.claim(7)
    holder = sqlite3.connect(generation(qdir) / "cache.db", isolation_level=None)
    holder.execute("UPDATE Cache SET value = 'garbage' WHERE key = 'meta:counters'")
    holder.close()
    with DurableQueue(qdir) as queue:  # the probe finds the damage at open
        stats = queue.stats()
        assert (stats.quarantines, stats.quarantined_entries) == (1, 1200)
    assert "1200 entries" in caplog.text


def test_an_unreadable_database_is_counted_as_uncounted(
    qdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="per_buffer")
    gen = _crashed_queue(qdir, close=True)
    db = gen / "cache.db"
    db.write_bytes(os.urandom(db.stat().st_size))
    with DurableQueue(qdir) as queue:
        stats = queue.stats()
        assert (stats.quarantines, stats.quarantined_entries) == (1, 0)
        assert stats.quarantines_uncounted == 1
    assert "an unknown number of entries" in caplog.text


class _Interrupt(BaseException):
    """What a signal handler raises (SystemExit, KeyboardInterrupt)."""


def test_an_exception_from_a_signal_handler_never_leaves_the_storage_lock_held(
    qdir: Path,
) -> None:
    """Regression: a handler raising right after the storage lock was acquired (before
    the ``try`` that releases it) left it held for good, and one raising inside a
    transaction left the connection in it: every later operation of the process, the
    delivery worker's included, waited or failed (delivered 0 of 27,352)."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    interrupted = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal interrupted
        signal.setitimer(signal.ITIMER_REAL, 0.0007)
        f: Any = frame
        while f is not None and not f.f_code.co_filename.endswith("/per_buffer/queue/_storage.py"):
            f = f.f_back
        if f is not None:
            interrupted += 1
            raise _Interrupt

    with DurableQueue(qdir) as queue:
        previous = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.001)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                with contextlib.suppress(_Interrupt):
                    queue.put(items(1))
                    queue.stats()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert interrupted > 50  # the handler really landed inside queue operations
        assert not queue._storage.lock._is_owned()
        other = threading.Thread(target=queue.stats)  # another thread gets the lock
        other.start()
        other.join(5)
        assert not other.is_alive()
        assert queue.stats().pending >= 1
