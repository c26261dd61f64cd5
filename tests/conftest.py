"""Shared fixtures: a real Per-compatible server on loopback for every test that needs one."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from per_buffer import Recorder
from per_buffer.config import CLIENT_KNOBS, KNOBS
from per_buffer.testing import PerServer

# A test run started in the background by a non-interactive shell (`make check &`, some CI
# runners) inherits SIGINT ignored, and so would every process the tests start: the
# Ctrl-C tests could not interrupt them. A handler here is reset to the default by exec().
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def server() -> Iterator[PerServer]:
    """A fresh local Per server on an ephemeral port."""
    with PerServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits Per settings from the machine's environment."""
    for name in (knob_env for knob in (*KNOBS, *CLIENT_KNOBS) for knob_env in knob.env):
        monkeypatch.delenv(name, raising=False)
    # drainers started by in-process recorders compete with the suite's own processes at
    # the same priority (a niced one starves on a busy machine; the benchmarks keep nice)
    monkeypatch.setenv("PER_BUFFER_DRAINER_NICE", "0")


@pytest.fixture
def per_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture everything per_buffer logs, down to DEBUG."""
    caplog.set_level(logging.DEBUG, logger="per_buffer")
    return caplog


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a small real tmpfs (``size`` like "1m") to fill up or make read-only.

    Needs root, as CI runs; skips with the reason otherwise. Unmounted at teardown.
    """
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root: mounts a small tmpfs to fill it or make it read-only")
        target = tmp_path / f"tmpfs{len(mounts)}"
        target.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)],
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["mount", "-o", "remount,rw", str(target)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@pytest.fixture
def counters_add_up(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[Recorder]]:
    """After the test, every recorder it built (closed now if still open) satisfies
    ``recorded == coalesced + delivered + dead_lettered + pending + in_flight +
    sum(dropped)``. Tests where recorders share a directory (one delivers what another
    recorded) opt out with ``@pytest.mark.shared_directory``."""
    made: list[Recorder] = []
    original = Recorder.__init__

    def tracking(self: Recorder, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(Recorder, "__init__", tracking)
    yield made
    if request.node.get_closest_marker("shared_directory"):
        return
    for recorder in made:
        recorder.close(timeout=5)
        s = recorder.stats()
        accounted = (s.coalesced + s.delivered + s.dead_lettered + s.pending + s.in_flight) + sum(
            s.dropped.values()
        )
        assert s.recorded == accounted, f"counters do not add up for {recorder!r}: {s}"
