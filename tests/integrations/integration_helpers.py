"""Shared by the integration tests: README examples, real subprocesses, what reached Per or disk."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from per_buffer import Recorder, RecorderStats
from per_buffer.drainer import drainer_running
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

#: (billing_id, user_id, activity_type_id)
Key = tuple[str, str, str]

#: The stats of a recorder with nothing wrong (``dataclasses.replace`` it to make trouble).
CALM = RecorderStats(
    recorded=10,
    coalesced=2,
    enqueued=8,
    delivered=8,
    retried=0,
    dead_lettered=0,
    dropped={},
    pending=0,
    in_flight=0,
    oldest_pending_age=None,
    paused_until=None,
    pause_reason=None,
    last_error=None,
)


def require(module: str) -> ModuleType:
    """Import a framework the test needs: skip without it, but fail in CI (.ci/run installs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = (
            f"needs {module} ({exc}): pip install -e '.[test-integrations]' "
            "(.ci/run installs it and sets PER_BUFFER_REQUIRE_INTEGRATIONS=1)"
        )
        if os.environ.get("PER_BUFFER_REQUIRE_INTEGRATIONS"):
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


def require_binary(name: str) -> str:
    """The path of a program the test needs: skip without it, but fail in CI."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    message = f"needs the {name} program: apt-get install -y {name} (.ci/run installs it)"
    if os.environ.get("PER_BUFFER_REQUIRE_INTEGRATIONS"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def readme_region(name: str) -> str:
    """The README text between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    text = README.read_text(encoding="utf-8")
    return text.split(f"<!-- {name}:start -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def readme_example(region: str, first_line: str) -> str:
    """The code block of a README region whose first line starts with ``first_line``."""
    blocks = re.findall(r"```(?:py|python)\n(.*?)```", readme_region(region), flags=re.S)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"expected one README example starting {first_line!r}: {found}"
    return found[0]


def holding_recorder(
    server: PerServer, directory: Path, activity_type_id: str, **options: Any
) -> Recorder:
    """A recorder for ``server`` whose activities stay in memory until a flush or close."""
    return Recorder(
        server.activity_token,
        activity_type_id,
        directory=directory,
        base_url=server.url,
        commit_interval=30.0,
        **options,
    )


@contextlib.contextmanager
def refused_recorder(directory: Path) -> Iterator[Recorder]:
    """A recorder whose token Per refuses, paused for ``auth`` with one activity pending.

    Its server runs until the block ends; the recorder is closed at once then.
    """
    with PerServer(activity_tokens=["the-real-token-123"]) as per:
        rec = Recorder("a-revoked-token-456", "login", directory=directory, base_url=per.url)
        try:
            rec.record("acme-corp", "u1")
            wait_until(lambda: rec.stats().pause_reason == "auth", 10, "the auth pause")
            yield rec
        finally:
            rec.close(0)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def delivered(server: PerServer) -> set[Key]:
    """What Per accepted."""
    return {(a.billing_id, a.user_id, a.activity_type_id) for a in server.activities}


def delivered_soon(server: PerServer, expected: set[Key], timeout: float = 15.0) -> set[Key]:
    """What Per accepted, once it holds ``expected`` or ``timeout`` passed: with a drainer
    process (the default), delivery goes on after the recording process closed."""
    deadline = time.monotonic() + timeout
    while not delivered(server) >= expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return delivered(server)


def on_disk(directory: Path) -> set[Key]:
    """What waits in a queue directory (leases of dead processes are reclaimed on open).

    A drainer process still delivering holds leases nobody else can claim: wait for it to
    finish (it exits when idle and no recorder is attached) before looking.
    """
    found: set[Key] = set()
    if not directory.exists():
        return found
    deadline = time.monotonic() + 15.0
    while drainer_running(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    with DurableQueue(directory) as queue:
        claims = []
        while (claim := queue.claim(1000, ignore_not_before=True)) is not None:
            claims.append(claim)
            found |= {tuple(entry.activity) for entry in claim.entries}  # type: ignore[misc]
        for claim in claims:  # given back: a drainer started later must deliver them
            queue.release_claim(claim)
    return found


def accounted(server: PerServer, directory: Path) -> set[Key]:
    """Every activity that is safe: delivered to Per or waiting on disk."""
    return delivered(server) | on_disk(directory)


def child_env(server: PerServer, directory: Path, **extra: str) -> dict[str, str]:
    """The environment of a served app: pointed at ``server``, no inherited Per settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PER_", "CELERY_", "DJANGO_"))}
    env.update(
        PER_ACTIVITY_TOKEN=server.activity_token,
        PER_BASE_URL=server.url,
        PER_ACTIVITY_TYPE_ID="api-call",
        PER_BUFFER_DIR=str(directory),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Service:
    """A real server process in its own session, with its output in a log file."""

    def __init__(self, argv: list[str], *, env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.argv = argv
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.argv[:4]} did not exit within {timeout} s of {sig!r}:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """Kill the process group this service started, if anything of it still runs."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        self._out.close()


def python(*args: str) -> list[str]:
    """A command line running this interpreter."""
    return [sys.executable, *args]
