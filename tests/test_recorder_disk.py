"""The recorder when the disk fails: activities wait in memory, nothing raises, nothing is lost."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from per_buffer import Recorder
from per_buffer.testing import PerServer

pytestmark = pytest.mark.root


@pytest.fixture
def small_tmpfs(mount_tmpfs: Callable[[str], Path]) -> Path:
    """A 1 MiB tmpfs, so the disk really fills up (needs root)."""
    return mount_tmpfs("1m")


def test_full_disk_holds_in_memory_then_writes_when_space_returns(
    server: PerServer, small_tmpfs: Path
) -> None:
    server.outage()  # keep everything queued
    rec = Recorder(
        server.activity_token,
        "login",
        directory=small_tmpfs / "q",
        base_url=server.url,
        coalesce_window=0,
        memory_buffer=200_000,
        concurrency=32,
        backoff_initial=0.02,
        backoff_max=0.2,
        poll_interval=0.05,
    )
    total = 12_000  # about 2.5 MiB of IDs: far more than the 1 MiB disk
    padding = "p" * 200
    for i in range(total):
        rec.record("acme", f"user-{i:06d}-{padding}")
    assert rec.flush(timeout=1.0) is False
    stats = rec.stats()
    assert stats.queue_errors >= 1
    assert stats.buffered > 0
    assert stats.recorded == total
    assert "full" in (stats.last_error or "").lower() or stats.last_error

    subprocess.run(["mount", "-o", "remount,size=256m", str(small_tmpfs)], check=True)
    server.recover()
    assert rec.flush(timeout=60)
    stats = rec.stats()
    rec.close()
    assert stats.buffered == 0
    assert stats.dropped == {}
    assert server.unique_count() == total


def test_unwritable_directory_never_raises_into_record(
    server: PerServer, small_tmpfs: Path
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    rec = Recorder(
        server.activity_token,
        "login",
        directory=small_tmpfs / "q",
        base_url=server.url,
        coalesce_window=0,
        backoff_initial=0.02,
        poll_interval=0.05,
    )  # the queue cannot even be created: the recorder starts in memory
    for i in range(100):
        rec.record("acme", f"ro-{i}")  # must not raise
    assert rec.flush(timeout=0.3) is False
    stats = rec.stats()
    assert stats.buffered == 100 and stats.queue_errors >= 1
    subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert rec.flush(timeout=30)
    rec.close()
    assert {a.user_id for a in server.activities} == {f"ro-{i}" for i in range(100)}
