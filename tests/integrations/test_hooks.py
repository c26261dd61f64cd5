"""The gunicorn hooks' flush bound and Celery's signal wiring, in process.

The exit paths themselves, with real gunicorn and Celery processes, are in test_exit_paths.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from integration_helpers import delivered_soon, holding_recorder, on_disk, require

from per_buffer import Recorder
from per_buffer.integrations import celery as per_celery
from per_buffer.integrations.gunicorn import hooks
from per_buffer.testing import PerServer


def recorder(server: PerServer, directory: Path, **options: Any) -> Recorder:
    return holding_recorder(server, directory, "login", **options)


def arbiter(graceful_timeout: float) -> SimpleNamespace:
    """What the hooks read of gunicorn's Arbiter: ``server.cfg.graceful_timeout``."""
    return SimpleNamespace(cfg=SimpleNamespace(graceful_timeout=graceful_timeout))


def test_the_worker_flush_ends_margin_seconds_before_graceful_timeout(
    server: PerServer, tmp_path: Path
) -> None:
    rec = recorder(server, tmp_path / "q", delivery="thread")  # this process delivers
    rec.record("acme-corp", "u1")
    server.outage()  # nothing can be delivered: the flush runs to its bound
    worker_exit, _ = hooks(margin=1.0, recorder=rec)
    started = time.monotonic()
    worker_exit(arbiter(1.6), None)  # flush for 0.6 s
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 4.0, elapsed  # (upper bound generous: shared CPU)
    assert on_disk(tmp_path / "q") == {("acme-corp", "u1", "login")}


def test_with_a_drainer_the_worker_exit_only_writes_to_disk(
    server: PerServer, tmp_path: Path
) -> None:
    rec = recorder(server, tmp_path / "q")  # the default: a drainer process delivers
    rec.record("acme-corp", "warm")
    assert rec.flush(timeout=20)
    for i in range(500):
        rec.record("acme-corp", f"u{i}")  # in memory (commit_interval 30 s)
    worker_exit, _ = hooks(margin=1.0, recorder=rec)
    started = time.monotonic()
    worker_exit(arbiter(30.0), None)
    assert time.monotonic() - started < 1.0  # not graceful_timeout - margin
    assert server.wait_for_activities(501, timeout=20)  # the drainer delivers them


def test_timeout_caps_the_flush_and_on_exit_closes_too(server: PerServer, tmp_path: Path) -> None:
    rec = recorder(server, tmp_path / "q", delivery="thread")
    rec.record("acme-corp", "u2")
    server.outage()
    _, on_exit = hooks(timeout=0.2, recorder=rec)
    started = time.monotonic()
    on_exit(arbiter(30))
    assert time.monotonic() - started < 3.0
    rec.record("acme-corp", "u3")
    assert rec.stats().dropped == {"closed": 1}
    assert on_disk(tmp_path / "q") == {("acme-corp", "u2", "login")}


def test_bad_hook_arguments() -> None:
    with pytest.raises(ValueError, match="margin"):
        hooks(margin=-1)
    with pytest.raises(ValueError, match="timeout"):
        hooks(timeout=-0.5)
    with pytest.raises(ValueError, match="timeout"):
        per_celery.connect(timeout=-1)


def test_celery_signals_close_the_recorder_once_connected(
    server: PerServer, tmp_path: Path
) -> None:
    signals = require("celery.signals")
    rec = recorder(server, tmp_path / "q")
    rec.record("acme-corp", "c1")
    before = len(signals.worker_process_shutdown.receivers)
    per_celery.connect(recorder=rec, timeout=5)
    per_celery.connect(recorder=rec, timeout=5)  # a second call changes nothing
    try:
        assert len(signals.worker_process_shutdown.receivers) == before + 1
        signals.worker_process_shutdown.send(sender=None, pid=1, exitcode=0)
        assert delivered_soon(server, {("acme-corp", "c1", "login")}) == {
            ("acme-corp", "c1", "login")
        }
        rec.record("acme-corp", "c2")
        assert rec.stats().dropped == {"closed": 1}
        signals.worker_shutdown.send(sender=None)  # closing twice is harmless
    finally:
        for signal in (signals.worker_process_shutdown, signals.worker_shutdown):
            signal.disconnect(dispatch_uid=per_celery.DISPATCH_UID)
