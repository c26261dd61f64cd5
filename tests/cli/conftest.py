"""Fixtures of the ``per-buffer`` command's tests (``server`` is in tests/conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from per_buffer.testing import PerServer


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, server: PerServer) -> PerServer:
    """The process environment points at the local server."""
    monkeypatch.setenv("PER_BASE_URL", server.url)
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", server.activity_token)
    monkeypatch.setenv("PER_REPORTING_TOKEN", server.reporting_token)
    return server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port
