"""``per-buffer record``: delivered, safely queued, refused or lost; one line on one stream."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import on_disk, one_error_line, run, script, server_env

from per_buffer.testing import PerServer

ARGS = ["record", "--billing-id", "acme", "--user-id", "u1", "--activity-type-id", "login"]


def read_only(mount_tmpfs: Callable[[str], Path]) -> Path:
    """A real read-only filesystem (root can write into a chmod 555 directory)."""
    target = mount_tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)
    return target


def test_direct_prints_the_transaction_id(
    env: PerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("record", "--billing-id", "acme", "--user-id", "u2", "--direct") == 2
    assert "PER_ACTIVITY_TYPE_ID" in one_error_line(capsys.readouterr().err)

    assert run(*ARGS[:4], "u2", *ARGS[5:], "--direct") == 0
    captured = capsys.readouterr()
    assert [a.transaction_id for a in env.activities if a.user_id == "u2"] == [captured.out.strip()]
    assert captured.err == ""


def test_delivered_through_the_queue(
    env: PerServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "q"))
    assert run("record", "--billing-id", "acme", "--user-id", "u7") == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("delivered\n", "")
    assert [(a.billing_id, a.user_id, a.activity_type_id) for a in env.activities] == [
        ("acme", "u7", "login")
    ]
    assert run("record", "--billing-id", "acme", "--user-id", "u8", "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "delivered"
    assert on_disk(tmp_path / "q") == 0


def test_unreachable_per_is_queued_on_disk_and_exits_0(
    env: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.outage()
    directory = tmp_path / "q"
    assert run(*ARGS, "--dir", str(directory), "--timeout", "0.3") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("queued, not delivered")
    assert str(directory) in lines[0] and "per-buffer drain" in lines[0]
    assert "delivered\n" not in captured.out
    assert on_disk(directory) == 1


def test_a_file_as_queue_directory_is_lost_with_exit_3(server: PerServer, tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    env = server_env(server, PER_BUFFER_DIR=str(a_file))
    done = script(*ARGS, env=env)
    assert done.returncode == 3 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert line.startswith("per-buffer: error: lost:")
    assert str(a_file) in line and "PER_BUFFER_DIR" in line
    assert "safe" not in line and "queued" not in line
    assert server.activities == []


def test_a_read_only_directory_is_lost_with_exit_3(
    env: PerServer, mount_tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    directory = read_only(mount_tmpfs) / "queue"
    assert run(*ARGS, "--dir", str(directory)) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    assert "lost" in line and str(directory) in line and "--dir" in line
    assert env.activities == []


def test_a_read_only_cache_home_is_lost_with_exit_3(
    server: PerServer, mount_tmpfs: Callable[[str], Path]
) -> None:
    cache = read_only(mount_tmpfs)
    env = server_env(server, XDG_CACHE_HOME=str(cache))
    done = script(*ARGS, env=env)
    assert done.returncode == 3 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert "lost" in line and str(cache / "per-buffer") in line
    assert "default directory" in line


def test_a_refused_token_exits_1_and_keeps_the_activity(
    env: PerServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "revoked")
    directory = tmp_path / "q"
    assert run(*ARGS, "--dir", str(directory), "--timeout", "10") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    assert "refused" in line and "PER_ACTIVITY_TOKEN" in line and str(directory) in line
    assert "revoked" not in captured.err
    assert on_disk(directory) == 1


def test_an_activity_per_rejects_exits_1_as_a_dead_letter(
    env: PerServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PER_BUFFER_BACKOFF_INITIAL", "0.01")
    monkeypatch.setenv("PER_BUFFER_BACKOFF_MAX", "0.05")
    env.inject("ok_false", count=10)
    directory = tmp_path / "q"
    assert run(*ARGS, "--dir", str(directory), "--timeout", "10") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    assert "dead letter" in line and "per-buffer dead-letters list" in line


def test_direct_against_an_unreachable_per_is_lost(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "t")
    assert run(*ARGS, "--direct", "--timeout", "2") == 3
    line = one_error_line(capsys.readouterr().err)
    assert "lost" in line and "PER_BASE_URL" in line


def test_direct_with_a_refused_token_exits_1(
    env: PerServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "wrong")
    assert run(*ARGS, "--direct") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "PER_ACTIVITY_TOKEN" in line and "wrong" not in line
