"""``per-buffer serve-local``: a fixed default port, the export lines, a clear port-in-use error."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import IO

import pytest
from cli_helpers import SCRIPT, clean_env, one_error_line, run, script

from per_buffer import PerClient
from per_buffer.cli.serve_local import DEFAULT_PORT


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@contextlib.contextmanager
def serve_local(*args: str) -> Iterator[tuple[subprocess.Popen[str], IO[str]]]:
    """``per-buffer serve-local ARGS`` as a child and its stdout; killed if left running."""
    proc = subprocess.Popen(
        [str(SCRIPT), "serve-local", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_local_until_interrupted(closed_port: int) -> None:
    args = ("--port", str(closed_port), "--activity-token", "act", "--reporting-token", "rep")
    with serve_local(*args) as (proc, stdout):
        lines = [stdout.readline() for _ in range(8)]
        url = f"http://127.0.0.1:{closed_port}"
        assert f"export PER_BASE_URL={url}\n" in [line.lstrip() for line in lines]
        assert "export PER_ACTIVITY_TOKEN=act\n" in [line.lstrip() for line in lines]
        with PerClient("act", base_url=url) as client:
            assert client.add_activity("acme", "u1", "login")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "Traceback" not in err and "1 activities accepted" in err


def test_the_default_port_is_fixed_and_documented(capsys: pytest.CaptureFixture[str]) -> None:
    assert DEFAULT_PORT == 8787
    assert run("serve-local", "--help") == 0
    out = capsys.readouterr().out
    assert "default 8787" in out and "http://127.0.0.1:8787" in out


def test_a_port_in_use_is_one_line(busy_port: int) -> None:
    done = script("serve-local", "--port", str(busy_port), env=clean_env(), timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert f"port {busy_port} is in use" in line and "--port" in line


def _exports_of_one_start() -> list[str]:
    """Start ``serve-local`` with its defaults, read its export lines, stop it."""
    with serve_local() as (proc, stdout):
        lines = [stdout.readline() for _ in range(9)]
        if not any(lines):  # it exited at once: the port is taken on this machine
            _, err = proc.communicate(timeout=20)
            if f"port {DEFAULT_PORT} is in use" in err:
                pytest.skip(f"port {DEFAULT_PORT} is taken on this machine by something else")
            raise AssertionError(err)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    return [line.strip() for line in lines if "export " in line]


def test_restarts_print_the_same_export_lines() -> None:
    first = _exports_of_one_start()
    assert f"export PER_BASE_URL=http://127.0.0.1:{DEFAULT_PORT}" in first
    assert _exports_of_one_start() == first
