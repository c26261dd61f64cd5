"""Helpers shared by the ``per-buffer`` command's tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from per_buffer import Activity
from per_buffer.cli import main
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer

SCRIPT = Path(sys.executable).with_name("per-buffer")


def run(*argv: str) -> int:
    """``per-buffer ARGV`` in this process; its exit status."""
    return main(list(argv))


def one_error_line(err: str) -> str:
    """The single ``per-buffer: error:`` line of ``err`` (asserts there is exactly one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("per-buffer: error: "), err
    assert "Traceback" not in err
    return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Per settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PER_", "ACTIVITY_TYPE"))}
    env.update(extra)
    return env


def server_env(server: PerServer, **extra: str) -> dict[str, str]:
    """:func:`clean_env` pointing at ``server`` with its activity token, plus ``extra``."""
    return clean_env(PER_BASE_URL=server.url, PER_ACTIVITY_TOKEN=server.activity_token, **extra)


def script(
    *argv: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The installed ``per-buffer`` console script in a subprocess."""
    assert SCRIPT.exists(), "run: .venv/bin/pip install -e . --no-deps"
    return subprocess.run(
        [str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def on_disk(directory: Path) -> int:
    """Activities in the queue directory not delivered yet (pending or in flight)."""
    with DurableQueue(directory) as queue:
        return sum(queue.counts())


def backlog(directory: Path, users: int, billing_id: str = "acme") -> None:
    """Leave ``users`` undelivered activities on disk in ``directory``, as a crashed app would."""
    now = time.time()
    with DurableQueue(directory) as queue:
        result = queue.put([(Activity(billing_id, f"u{i}", "login"), now) for i in range(users)])
    assert result.stored == users


def dead_letters(directory: Path, users: int) -> None:
    """Set ``users`` activities aside as dead letters, the way the worker does."""
    backlog(directory, users, billing_id="doomed")
    with DurableQueue(directory) as queue:
        claim = queue.claim(users)
        assert claim is not None and len(claim.entries) == users
        queue.dead_letter(claim, [e.id for e in claim.entries], "activity_type_archived")
        assert queue.counts() == (0, 0)
