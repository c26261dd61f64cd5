"""Starting a drainer process for a queue directory: spawned, never forked.

A fresh interpreter runs ``python -m per_buffer.drainer``; the options (and the
token) travel through a pipe to its standard input, never on its command line or in
a file. ``spawn.lock`` keeps concurrent recorders from starting several at once (the
loser of a remaining race finds ``drainer.lock`` taken and exits at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Final

from ..config import env_names
from ._locks import DRAINER_LOCK, FileLock, supported
from ._process import DrainerOptions

__all__ = ["drainer_running", "interpreter", "spawn"]

logger = logging.getLogger("per_buffer.drainer")

SPAWN_LOCK: Final = "spawn.lock"
_TOKEN_VARIABLES: Final = frozenset((*env_names("token"), *env_names("reporting_token")))
_READY_WITHIN = 15.0  # seconds for a fresh interpreter to import and report


def interpreter() -> str | None:
    """The Python interpreter to start a drainer with, or None when there is none.

    Embedded interpreters (uWSGI sets ``sys.executable`` to its own binary) are
    recognised by name; delivery then runs in a thread instead.
    """
    if not supported():
        return None
    for candidate in (sys.executable, getattr(sys, "_base_executable", "")):
        if candidate and os.path.basename(candidate).startswith("python"):
            return candidate
    return None


def drainer_running(directory: Path) -> bool:
    """True when a drainer holds the directory's election lock."""
    lock = FileLock(directory / DRAINER_LOCK)
    try:
        return not lock.free()
    finally:
        lock.close()


def spawn(
    options: DrainerOptions,
    python: str,
    started: threading.Event | None = None,
    *,
    wait: bool = True,
) -> int | None:
    """Start a drainer unless one runs or is being started; its pid, or None.

    Waits (up to 15 s) until the new process reports that it was elected, so a
    caller that returns knows delivery is under way; without ``wait`` (an exit
    handler, which can start no thread to reap it) it returns the pid of the process
    once it has its options. ``started`` is set as soon as the process exists (or when
    none will be started).
    """
    starting = FileLock(options.directory / SPAWN_LOCK)
    try:
        if not starting.try_exclusive():
            return None  # another recorder is starting one right now
        if drainer_running(options.directory):
            return None
        return _start(options, python, started, wait=wait)
    finally:
        starting.close()
        if started is not None:
            started.set()


def _start(
    options: DrainerOptions, python: str, started: threading.Event | None, *, wait: bool = True
) -> int | None:
    # the token travels through the pipe only: not even the environment keeps a copy
    env = {k: v for k, v in os.environ.items() if k not in _TOKEN_VARIABLES}
    here = str(Path(__file__).resolve().parents[2])  # the directory holding per_buffer
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (here, env.get("PYTHONPATH"))))
    try:
        process = subprocess.Popen(
            [python, "-m", "per_buffer.drainer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # one line ("ready <pid>"), then closed
            # never the parent's stderr: a caller capturing it (a shell's $(...), a test
            # harness) would wait for the drainer to exit; it logs to drainer.log instead
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C meant for the app does not stop delivery
            env=env,
            cwd=str(options.directory),
            text=True,
        )
    except OSError as exc:
        logger.warning("per_buffer: cannot start a drainer process (%s)", exc)
        return None
    if started is not None:
        started.set()  # it exists: it delivers even if this process ends now
    assert process.stdin is not None and process.stdout is not None
    with contextlib.suppress(OSError):
        process.stdin.write(options.to_json() + "\n")
    with contextlib.suppress(OSError):
        process.stdin.close()
    if not wait:  # its "ready" line finds the pipe closed, which it ignores
        process.stdout.close()
        return process.pid
    answer = _read_line(process, _READY_WITHIN)
    process.stdout.close()
    threading.Thread(target=process.wait, name="per-buffer-reaper", daemon=True).start()
    if answer.startswith("ready"):
        return process.pid
    if answer != "busy":
        logger.warning(
            "per_buffer: the drainer process did not start (%s)",
            answer or "no answer within 15 s",
        )
    return None


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            if selector.select(left):
                return process.stdout.readline().strip()
            if process.poll() is not None:
                return ""
