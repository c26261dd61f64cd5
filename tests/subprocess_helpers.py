"""Helpers for the child processes tests start (proxies, web servers)."""

from __future__ import annotations

import subprocess
from typing import Any


def terminate(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL it if it is still there after ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
