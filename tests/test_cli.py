"""The ``per-buffer`` command: every subcommand in-process, and the real script in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from per_buffer import Activity, PerClient, Recorder, __version__
from per_buffer.cli import main
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer

COMMANDS = ["demo", "status", "drain", "dead-letters", "record", "report", "serve-local"]
SCRIPT = Path(sys.executable).with_name("per-buffer")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, server: PerServer) -> PerServer:
    """The process environment points at the local server."""
    monkeypatch.setenv("PER_BASE_URL", server.url)
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", server.activity_token)
    monkeypatch.setenv("PER_REPORTING_TOKEN", server.reporting_token)
    return server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port


def run(*argv: str) -> int:
    return main(list(argv))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("per-buffer: error: "), err
    assert "Traceback" not in err
    return lines[0]


def backlog(directory: Path, users: int, billing_id: str = "acme") -> None:
    """Leave ``users`` undelivered activities on disk in ``directory``, as a crashed app would."""
    now = time.time()
    with DurableQueue(directory) as queue:
        stored = queue.put([(Activity(billing_id, f"u{i}", "login"), now) for i in range(users)])
    assert stored == users


def dead_letters(directory: Path, users: int) -> None:
    """Set ``users`` activities aside as dead letters, the way the worker does."""
    backlog(directory, users, billing_id="doomed")
    with DurableQueue(directory) as queue:
        claim = queue.claim(users)
        assert claim is not None and len(claim.entries) == users
        queue.dead_letter(claim, [e.id for e in claim.entries], "activity_type_archived")
        assert queue.counts() == (0, 0)


# --------------------------------------------------------------------------- help and version


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_with_examples(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "per-buffer " + (command or "demo") in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--version") == 0
    assert capsys.readouterr().out.strip() == f"per-buffer {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run() == 2
    assert "COMMAND" in one_error_line(capsys.readouterr().err)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PER_", "ACTIVITY_TYPE"))}
    env.update(extra)
    return env


def test_console_script_help_version_and_error() -> None:
    assert SCRIPT.exists(), "run: .venv/bin/pip install -e . --no-deps"
    env = _clean_env()
    done = subprocess.run(
        [str(SCRIPT), "--help"], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert done.returncode == 0 and "examples:" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "per_buffer", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"per-buffer {__version__}"
    done = subprocess.run(
        [str(SCRIPT), "report", "--start", "2024-05-01"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "PER_REPORTING_TOKEN" in one_error_line(done.stderr)


def test_python_m_subcommand_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "per_buffer", "drain", "--help"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert "usage: per-buffer drain" in done.stdout


# --------------------------------------------------------------------------- record


def test_record_direct_prints_transaction_id(
    env: PerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("record", "--billing-id", "acme", "--user-id", "u2", "--direct") == 2
    assert "PER_ACTIVITY_TYPE_ID" in one_error_line(capsys.readouterr().err)

    argv = ["record", "--billing-id", "acme", "--user-id", "u2", "--activity-type-id", "login"]
    assert run(*argv, "--direct") == 0
    out = capsys.readouterr().out.strip()
    assert [a.transaction_id for a in env.activities if a.user_id == "u2"] == [out]


def test_record_through_the_queue_delivers(
    env: PerServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "q"))
    assert run("record", "--billing-id", "acme", "--user-id", "u7") == 0
    assert capsys.readouterr().out.strip() == "delivered"
    assert [(a.billing_id, a.user_id, a.activity_type_id) for a in env.activities] == [
        ("acme", "u7", "login")
    ]
    assert run("record", "--billing-id", "acme", "--user-id", "u8", "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "delivered"


def test_record_through_the_queue_while_down_stays_queued(
    env: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.outage()
    argv = ["record", "--billing-id", "acme", "--user-id", "u9", "--activity-type-id", "login"]
    assert run(*argv, "--dir", str(tmp_path / "q"), "--timeout", "0.3") == 0
    assert capsys.readouterr().out.startswith("queued:")
    with DurableQueue(tmp_path / "q") as queue:
        assert sum(queue.counts()) == 1


# --------------------------------------------------------------------------- report


def test_report_table_and_json(env: PerServer, capsys: pytest.CaptureFixture[str]) -> None:
    with PerClient(env.activity_token, base_url=env.url) as client:
        for user in ("u1", "u2", "u3"):
            client.add_activity("acme", user, "login")
        client.add_activity("globex", "u1", "login")
        client.add_activity("acme", "u1", "export")

    assert run("report", "--start", "2000-01-01") == 0
    out = capsys.readouterr().out
    assert "ACTIVITY TYPE" in out and "UNIQUE USERS" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["login", "acme", "3"] in rows
    assert ["login", "globex", "1"] in rows
    assert ["export", "acme", "1"] in rows
    assert "Totals per activity type:" in out
    assert ["login", "2", "4"] in rows  # 2 billing IDs, 4 unique users

    assert run("report", "--start", "2000-01-01T00:00:00Z", "--end", "2999-01-01", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"] == {"login": 4, "export": 1}
    assert data["result"]["activityTypes"]["login"]["billingIds"]["acme"] == {"unique": 3}
    assert data["start"].startswith("2000-01-01")


def test_report_without_bounds_is_the_prior_month(
    env: PerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("report") == 0
    assert "No activity in this period." in capsys.readouterr().out


# --------------------------------------------------------------------------- status and drain


def test_status_shows_backlog(
    server: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    server.outage()  # an app recorded while Per was down, then stopped
    rec = Recorder(
        server.activity_token,
        "login",
        directory=directory,
        base_url=server.url,
        durability="sync",
        coalesce_window=0,
        backoff_initial=0.02,
        backoff_max=0.2,
    )
    for i in range(25):
        rec.record("acme", f"u{i}")
    rec.close(timeout=0.2)
    with DurableQueue(directory) as queue:
        pending, in_flight = queue.counts()
    assert pending + in_flight == 25

    assert run("status", "--dir", str(directory)) == 0
    out = capsys.readouterr().out
    rows = dict(line.split("  ", 1) for line in out.splitlines() if "  " in line)
    assert rows["pending"].strip() == str(pending)
    assert rows["in flight"].strip() == str(in_flight)
    assert rows["dead letters"].strip() == "0"
    assert "n/a" in rows["pause reason"]
    assert "per-buffer drain" in out

    assert run("status", "--dir", str(directory), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["pending"], data["in_flight"], data["dead_letters"]) == (pending, in_flight, 0)
    assert data["oldest_pending_age"] >= 0 and data["bytes_on_disk"] > 0


def test_status_uses_per_buffer_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backlog(tmp_path / "q", 3)
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "q"))
    assert run("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 3


def test_drain_delivers_backlog(
    env: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    backlog(directory, 40)
    assert env.activities == []
    assert run("drain", "--dir", str(directory), "--timeout", "20") == 0
    out = capsys.readouterr().out
    assert "delivered 40" in out
    assert {a.user_id for a in env.activities} == {f"u{i}" for i in range(40)}
    with DurableQueue(directory) as queue:
        assert queue.counts() == (0, 0)
    assert run("drain", "--dir", str(directory)) == 0
    assert "Nothing to deliver" in capsys.readouterr().out


def test_drain_fails_when_server_is_down(
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
    with DurableQueue(directory) as queue:
        assert sum(queue.counts()) == 5


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
    with DurableQueue(directory) as queue:
        assert sum(queue.counts()) == 5


# --------------------------------------------------------------------------- dead letters


def test_dead_letters_list_requeue_purge(
    env: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    dead_letters(directory, 3)
    d = str(directory)

    assert run("dead-letters", "list", "--dir", d) == 0
    out = capsys.readouterr().out
    assert "REASON" in out and "doomed" in out and "u0" in out and "activity_type_archived" in out

    assert run("dead-letters", "list", "--dir", d, "--json", "--limit", "2") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == 3 and len(data["dead_letters"]) == 2
    assert {"billing_id", "user_id", "activity_type_id", "reason", "attempts"} <= set(
        data["dead_letters"][0]
    )

    assert run("dead-letters", "requeue", "--dir", d) == 0
    assert "requeued 3" in capsys.readouterr().out
    assert run("status", "--dir", d, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pending"] == 3 and status["dead_letters"] == 0
    assert run("drain", "--dir", d, "--timeout", "20") == 0
    capsys.readouterr()
    assert {(a.billing_id, a.user_id) for a in env.activities} == {
        ("doomed", "u0"),
        ("doomed", "u1"),
        ("doomed", "u2"),
    }

    dead_letters(directory, 2)
    assert run("dead-letters", "purge", "--dir", d, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"directory": d, "purged": 2}
    assert run("dead-letters", "--dir", d) == 0  # list is the default action
    assert "No dead letters" in capsys.readouterr().out


# --------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (
            [
                "record",
                "--billing-id",
                "a",
                "--user-id",
                "u",
                "--activity-type-id",
                "t",
                "--direct",
            ],
            2,
            "PER_ACTIVITY_TOKEN",
        ),
        (["report", "--start", "2024-05-01"], 2, "PER_REPORTING_TOKEN"),
        (["status"], 2, "PER_BUFFER_DIR"),
        (["drain"], 2, "--dir"),
        (["demo", "--activities", "lots"], 2, "--activities"),
        (["demo", "--seconds-outage", "-1"], 2, "--seconds-outage"),
        (["drain", "--dir", ".", "--timeout", "nan"], 2, "--timeout"),
        (["dead-letters", "list", "--limit", "0"], 2, "--limit"),
        (["dead-letters", "zap"], 2, "zap"),
        (["serve-local", "--port", "70000"], 2, "--port"),
        (["record", "--billing-id", "", "--user-id", "u"], 2, "--billing-id"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], code: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    captured = capsys.readouterr()
    assert needle in one_error_line(captured.err)
    assert captured.out == ""


def test_malformed_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_REPORTING_TOKEN", "t")
    assert run("report", "--start", "yesterday") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--start" in line and "yesterday" in line
    assert run("report", "--start", "2024-05-01T10:00:00") == 2  # no time zone
    one_error_line(capsys.readouterr().err)
    assert run("report", "--end", "2024-05-01") == 2
    assert "--start" in one_error_line(capsys.readouterr().err)


def test_unreachable_server(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("PER_REPORTING_TOKEN", "t")
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "t")
    assert run("report", "--start", "2024-05-01", "--timeout", "2") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "reachable" in line and "PER_BASE_URL" in line
    argv = ["record", "--billing-id", "a", "--user-id", "u", "--activity-type-id", "t"]
    assert run(*argv, "--direct", "--timeout", "2") == 1
    assert "PER_BASE_URL" in one_error_line(capsys.readouterr().err)


def test_bad_token_is_named(
    env: PerServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_REPORTING_TOKEN", "wrong")
    assert run("report", "--start", "2024-05-01") == 1
    assert "PER_REPORTING_TOKEN" in one_error_line(capsys.readouterr().err)


def test_bad_base_url(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PER_BASE_URL", "http://per.example.com")
    monkeypatch.setenv("PER_REPORTING_TOKEN", "t")
    assert run("report") == 2
    assert "PER_BASE_URL" in one_error_line(capsys.readouterr().err)


def test_unknown_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    for argv in (["status"], ["drain"], ["dead-letters", "list"]):
        assert main([*argv, "--dir", str(missing)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "does not exist" in line and "--dir" in line
    assert not missing.exists()


def test_unknown_default_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "some-token")
    assert run("status") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path) in line and "PER_BUFFER_DIR" in line


# --------------------------------------------------------------------------- serve-local


def test_serve_local_until_interrupted(closed_port: int) -> None:
    proc = subprocess.Popen(
        [
            str(SCRIPT),
            "serve-local",
            "--port",
            str(closed_port),
            "--activity-token",
            "act",
            "--reporting-token",
            "rep",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(8)]
        url = f"http://127.0.0.1:{closed_port}"
        assert f"export PER_BASE_URL={url}\n" in [line.lstrip() for line in lines]
        with PerClient("act", base_url=url) as client:
            assert client.add_activity("acme", "u1", "login")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "Traceback" not in err and "1 activities accepted" in err


# --------------------------------------------------------------------------- demo


def test_demo_small_matches(capsys: pytest.CaptureFixture[str]) -> None:
    code = run("demo", "--activities", "3000", "--seconds-outage", "0.5", "--seed", "7")
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    lines = captured.out.strip().splitlines()
    assert lines[-1].startswith("MATCH: ")
    assert "reduction factor" in captured.out and "COUNTED LOCALLY" in captured.out
    assert "Per is DOWN" in captured.err and "Per is back" in captured.err
    assert "Traceback" not in captured.err


def test_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(
        "demo", "--activities", "2000", "--seconds-outage", "0.3", "--users", "300", "--json"
    )
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert code == 0 and data["verdict"] == "MATCH", data["message"]
    assert data["stats"]["recorded"] == 2000
    assert data["stats"]["dropped"] == 0
    assert all(row["expected"] == row["reported"] for row in data["rows"])
    assert data["settings"]["seconds_outage"] == 0.3
