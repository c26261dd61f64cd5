"""``per-buffer drain``: delivers a backlog with rate and ETA; interrupted, says what is left."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import SCRIPT, backlog, on_disk, run, server_env

from per_buffer import Recorder
from per_buffer.testing import PerServer


def test_drain_delivers_a_backlog(
    env: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    backlog(directory, 40)
    assert env.activities == []
    assert run("drain", "--dir", str(directory), "--timeout", "20") == 0
    captured = capsys.readouterr()
    summary = captured.out.splitlines()
    assert len(summary) == 1 and summary[0].startswith("delivered 40, ")
    assert "left 0" in summary[0] and "/s)" in summary[0] and str(directory) in summary[0]
    assert {a.user_id for a in env.activities} == {f"u{i}" for i in range(40)}
    assert on_disk(directory) == 0
    # without a terminal the final progress line is not printed twice
    final = [line for line in captured.err.splitlines() if "40/40" in line]
    assert len(final) <= 1, captured.err
    assert run("drain", "--dir", str(directory)) == 0
    assert "Nothing to deliver" in capsys.readouterr().out


def test_progress_shows_rate_and_eta_and_ends_once_without_a_terminal(
    server: PerServer, tmp_path: Path
) -> None:
    directory = tmp_path / "q"
    backlog(directory, 120)
    server.set_latency(0.05)  # 4 senders at 50 ms: about 1.5 s, so several progress lines
    env = server_env(server)
    done = subprocess.run(
        [str(SCRIPT), "drain", "--dir", str(directory), "--concurrency", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert progress, done.stderr
    assert any("/s, ETA " in line for line in progress), progress
    assert "\r" not in done.stderr and "\x1b" not in done.stderr  # plain lines, no terminal
    # the summary on stdout is the last word: no progress line repeats the final state
    assert sum("120/120" in line for line in progress) <= 1, progress
    assert done.stdout.count("delivered 120, ") == 1


def test_drain_fails_when_per_is_down(
    env: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    backlog(directory, 5)
    env.outage()
    assert run("drain", "--dir", str(directory), "--timeout", "0.5") == 1
    captured = capsys.readouterr()
    assert "left 5" in captured.out
    assert "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("per-buffer: error: 5 activities not delivered")
    assert on_disk(directory) == 5


def test_drain_stops_at_once_when_the_token_is_refused(
    env: PerServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "q"
    backlog(directory, 5)
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "revoked")
    started = time.monotonic()
    assert run("drain", "--dir", str(directory), "--timeout", "30") == 1
    assert time.monotonic() - started < 10
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("per-buffer: error: Per refused") and "PER_ACTIVITY_TOKEN" in last
    assert "Traceback" not in captured.err and "revoked" not in captured.err
    assert on_disk(directory) == 5


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_drain_says_how_many_are_left_and_where(
    server: PerServer, tmp_path: Path, signum: int, code: int
) -> None:
    directory = tmp_path / "q"
    backlog(directory, 7)
    server.outage()  # nothing can be delivered: the drain waits and retries
    env = server_env(server)
    proc = subprocess.Popen(
        [str(SCRIPT), "drain", "--dir", str(directory), "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("Draining 7 activities")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (
        f"per-buffer: error: interrupted: 7 activities left on disk in {directory}; "
        f"'per-buffer drain --dir {directory}' continues"
    )
    assert out == ""
    assert on_disk(directory) == 7


# ------------------------------------------------------------------ a write lock held elsewhere

HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes this pipe
    db.execute("ROLLBACK")
    """
)


@contextlib.contextmanager
def write_lock_held(directory: Path) -> Iterator[None]:
    """Another process holds the write lock (``BEGIN IMMEDIATE``) of ``directory``'s live
    database for the duration of the block (it says so on stdout before the block runs)."""
    database = max(directory.glob("db-*/cache.db"), key=lambda p: int(p.parent.name[3:]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.strip() == "locked", line
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def stop(proc: subprocess.Popen[str], signum: int, timeout: float = 30) -> tuple[str, str, float]:
    """Send ``signum``; (stdout, stderr, seconds until it exited). Killed if it hangs."""
    started = time.monotonic()
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running {timeout:g} s after {signal.Signals(signum).name}")
    return out, err, time.monotonic() - started


PROMPT = 3.0  # seconds an interrupted command may take to exit (it used to take 16-120 s)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_drain_exits_promptly_while_another_process_holds_the_lock(
    server: PerServer, tmp_path: Path, signum: int, code: int
) -> None:
    """Interrupted, drain used to open the queue again to count what is left, waiting up
    to 60 s per statement for the lock (~122 s in all); it now reads a snapshot."""
    directory = tmp_path / "q"
    backlog(directory, 300)
    server.set_latency(1.0)  # the drain is still sending when the lock is taken
    proc = subprocess.Popen(
        [str(SCRIPT), "drain", "--dir", str(directory), "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(server),
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("Draining 300 activities")
        assert server.wait_for_requests(1, 10)  # sending
        with write_lock_held(directory):
            out, err, took = stop(proc, signum)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert took < PROMPT, f"exited {took:.2f} s after the signal"
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"per-buffer: error: interrupted: (\d+) activities left on disk in "
        rf"{re.escape(str(directory))}; 'per-buffer drain --dir "
        rf"{re.escape(str(directory))}' continues",
        last,
    )
    assert found, last
    left = int(found.group(1))
    assert left == on_disk(directory) and 0 < left <= 300, (left, on_disk(directory))
    server.set_latency(0)


def test_follow_creates_a_directory_that_does_not_exist_yet(
    server: PerServer, tmp_path: Path
) -> None:
    """A sidecar may start before the first recorder: ``drain --follow`` on a missing
    directory used to exit 2; it creates it (mode 0700) and delivers what recorders
    commit there later."""
    directory = tmp_path / "not" / "yet"
    with _following(server, directory) as proc:
        assert directory.is_dir() and directory.stat().st_mode & 0o777 == 0o700
        rec = Recorder(
            server.activity_token,
            "login",
            directory=directory,
            base_url=server.url,
            delivery="external",  # the sidecar delivers
            poll_interval=0.05,
        )
        for i in range(3):
            rec.record("acme", f"u{i}")
        assert rec.flush(20)
        rec.close()
        assert {a.user_id for a in server.activities} == {"u0", "u1", "u2"}
        _, err, took = stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert took < PROMPT, f"exited {took:.2f} s after SIGTERM"


def test_follow_stops_promptly_while_another_process_holds_the_lock(
    server: PerServer, tmp_path: Path
) -> None:
    """SIGTERM to ``drain --follow`` mid-drain, the lock taken by another process: it
    used to take 16-18 s to stop."""
    directory = tmp_path / "q"
    backlog(directory, 300)
    server.set_latency(1.0)
    with _following(server, directory) as proc:
        assert server.wait_for_requests(1, 10)  # sending
        with write_lock_held(directory):
            _, err, took = stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert took < PROMPT, f"exited {took:.2f} s after SIGTERM"
    assert 0 < on_disk(directory) <= 300  # what was not acknowledged stays on disk
    server.set_latency(0)


@contextlib.contextmanager
def _following(server: PerServer, directory: Path) -> Iterator[subprocess.Popen[str]]:
    """``per-buffer drain --follow --dir directory``, running once it says so."""
    proc = subprocess.Popen(
        [str(SCRIPT), "drain", "--follow", "--dir", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(server),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"Following {directory}: "), (line, proc.poll())
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
