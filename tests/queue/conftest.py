"""Fixtures of the durable queue tests (helpers are in queue_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from queue_helpers import FakeClock


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    """A queue directory that does not exist yet."""
    return tmp_path / "queue"


@pytest.fixture
def clock() -> FakeClock:
    """An injectable clock at a fixed time."""
    return FakeClock()


@pytest.fixture
def tmpfs(mount_tmpfs: Callable[[str], Path]) -> Path:
    """A small real tmpfs to fill up or remount read-only."""
    return mount_tmpfs("8m")
