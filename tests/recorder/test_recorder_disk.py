"""The recorder when the disk fails: activities wait in memory, nothing raises, nothing is lost."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from per_buffer import ConfigurationError, Recorder
from per_buffer.testing import PerServer

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("counters_add_up")]


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


def test_unwritable_directory_is_a_configuration_error_naming_it(
    server: PerServer, small_tmpfs: Path
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(ConfigurationError) as info:
        Recorder(server.activity_token, "login", directory=small_tmpfs / "q", base_url=server.url)
    assert str(small_tmpfs / "q") in str(info.value)
    assert "PER_BUFFER_DIR" in str(info.value)
    assert server.activity_token not in str(info.value)
