"""Fixtures of the integration tests: real server processes and short socket paths."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from integration_helpers import Service

from per_buffer import Recorder
from per_buffer.testing import PerServer


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for Unix sockets (at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Starts real processes; whatever of them still runs is killed at teardown."""
    started: list[Service] = []

    def start(argv: list[str], *, env: Mapping[str, str], cwd: Path | None = None) -> Service:
        log = tmp_path / f"service-{len(started)}.log"
        service = Service(argv, env=env, cwd=cwd or tmp_path, log=log)
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()


@pytest.fixture
def per_env(server: PerServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PerServer:
    """The environment points at ``server`` and a queue directory ``tmp_path / "q"``.

    The test sets the activity type it wants (``PER_ACTIVITY_TYPE_ID``).
    """
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", server.activity_token)
    monkeypatch.setenv("PER_BASE_URL", server.url)
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "q"))
    return server


@pytest.fixture
def busy(server: PerServer, tmp_path: Path) -> Iterator[Recorder]:
    """A recorder that recorded 3 activities, coalesced 1 and delivered 2."""
    rec = Recorder(server.activity_token, "login", directory=tmp_path / "q", base_url=server.url)
    rec.record("acme-corp", "u1")
    rec.record("acme-corp", "u1")  # coalesced
    rec.record("acme-corp", "u2")
    assert rec.flush(timeout=10)
    yield rec
    rec.close()
