"""``per-buffer drain``: delivers a backlog with rate and ETA; interrupted, says what is left."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import SCRIPT, backlog, on_disk, run, server_env

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
