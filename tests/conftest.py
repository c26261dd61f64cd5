"""Shared fixtures: a real Per-compatible server on loopback for every test that needs one."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from per_buffer.testing import PerServer


@pytest.fixture
def server() -> Iterator[PerServer]:
    """A fresh local Per server on an ephemeral port."""
    with PerServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits Per settings from the machine's environment."""
    for name in (
        "PER_ACTIVITY_TOKEN",
        "PER_REPORTING_TOKEN",
        "PER_BASE_URL",
        "PER_ACTIVITY_TYPE_ID",
        "ACTIVITY_TYPE_ID",
        "PER_BUFFER_DIR",
        "PER_BUFFER_ENABLED",
        "PER_BUFFER_DURABILITY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def per_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture everything per_buffer logs, down to DEBUG."""
    caplog.set_level(logging.DEBUG, logger="per_buffer")
    return caplog
