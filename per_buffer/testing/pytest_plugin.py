"""pytest fixtures for code that reports to Per: a local Per server and a recorder wired to it.

Installed with per_buffer (``pip install 'per-buffer[testing]'``), pytest loads this
plugin through the ``pytest11`` entry point ``per_buffer``; nothing to import or
configure::

    def test_signup_is_reported(per_server, per_recorder):
        per_recorder.record("acme-corp", "user-1")
        assert per_recorder.flush(timeout=5)
        assert per_server.activities[0].user_id == "user-1"

``per_server`` is a running :class:`per_buffer.testing.PerServer` (a fresh one per
test, on an ephemeral loopback port); ``per_recorder`` is a
:class:`per_buffer.Recorder` delivering to it with activity type ``"test"`` and a
queue directory under the test's ``tmp_path``. Both are torn down after the test.
Override either fixture in a ``conftest.py`` to change its settings. Disable the
plugin with ``-p no:per_buffer``.

Tests that do not ask for these fixtures start nothing: the server and recorder classes
are imported, and built, inside the fixtures. (Loading the plugin still imports the
``per_buffer`` package it lives in, as Python imports a module's parent packages.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from per_buffer import Recorder
    from per_buffer.testing import PerServer

__all__ = ["per_recorder", "per_server"]

# the activity type of the recorder the ``per_recorder`` fixture gives
_ACTIVITY_TYPE = "test"


@pytest.fixture
def per_server() -> Iterator[PerServer]:
    """A running local Per server (:class:`per_buffer.testing.PerServer`), stopped at teardown.

    It accepts ``per_server.activity_token`` and ``per_server.reporting_token`` at
    ``per_server.url``; see :class:`~per_buffer.testing.PerServer` for what it
    received (``activities``, ``report()``, ``counters``) and for fault injection.
    """
    from per_buffer.testing import PerServer  # noqa: PLC0415  (only when a test asks)

    with PerServer() as server:
        yield server


@pytest.fixture
def per_recorder(per_server: PerServer, tmp_path: Path) -> Iterator[Recorder]:
    """A :class:`per_buffer.Recorder` delivering to ``per_server``, closed at teardown.

    Activity type ``"test"``, its queue directory under ``tmp_path``, enabled
    whatever ``PER_BUFFER_ENABLED`` says; other settings come from the environment
    and defaults as usual. Call ``per_recorder.flush(timeout=...)`` before looking at
    what ``per_server`` received.
    """
    from per_buffer import Recorder  # noqa: PLC0415  (only when a test asks)

    recorder = Recorder(
        per_server.activity_token,
        _ACTIVITY_TYPE,
        base_url=per_server.url,
        directory=tmp_path / "per-buffer-queue",
        enabled=True,
    )
    try:
        yield recorder
    finally:
        recorder.close()
