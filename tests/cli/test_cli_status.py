"""``per-buffer status``: backlog, the worker's persisted delivery state, quarantine, --all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import backlog, run
from quarantine_helpers import quarantine_readable

from per_buffer import Recorder
from per_buffer.config import default_directory
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer


def rows(out: str) -> dict[str, str]:
    return {
        key.strip(): value.strip()
        for key, value in (line.split("  ", 1) for line in out.splitlines() if "  " in line)
    }


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
    shown = rows(out)
    assert shown["pending"] == str(pending)
    assert shown["in flight"] == str(in_flight)
    assert shown["dead letters"] == "0"
    assert shown["quarantined"] == "none"
    assert "n/a" not in out
    assert f"per-buffer drain --dir {directory}" in out

    assert run("status", "--dir", str(directory), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["pending"], data["in_flight"], data["dead_letters"]) == (pending, in_flight, 0)
    assert data["oldest_pending_age"] >= 0 and data["bytes_on_disk"] > 0
    assert data["quarantine"]["databases"] == 0


def test_status_shows_the_pause_the_worker_persisted(
    server: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused token pauses delivery; after the app stopped, status still says so."""
    directory = tmp_path / "q"
    rec = Recorder("revoked", "login", directory=directory, base_url=server.url)
    rec.record("acme", "u1")
    assert not rec.flush(timeout=2)
    assert rec.stats().pause_reason == "auth"
    rec.close(timeout=0.2)

    assert run("status", "--dir", str(directory)) == 0
    shown = rows(capsys.readouterr().out)
    assert shown["delivery"].startswith("paused (auth)")
    assert run("status", "--dir", str(directory), "--json") == 0
    state = json.loads(capsys.readouterr().out)["delivery"]
    assert state["pause_reason"] == "auth"


def test_status_uses_per_buffer_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backlog(tmp_path / "q", 3)
    monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "q"))
    assert run("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 3


def test_status_shows_the_quarantine_and_the_salvage_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    folder = quarantine_readable(directory, 4)
    assert run("status", "--dir", str(directory)) == 0
    out = capsys.readouterr().out
    assert rows(out)["quarantined"].startswith("1 database moved aside")
    assert f"per-buffer salvage {folder}" in out
    assert run("status", "--dir", str(directory), "--json") == 0
    quarantine = json.loads(capsys.readouterr().out)["quarantine"]
    assert quarantine["databases"] == 1 and quarantine["folders"] == [str(folder)]


def test_status_all_lists_every_default_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    url = "http://127.0.0.1:8787"
    first = default_directory("token-one", url)
    second = default_directory("token-two", url)
    backlog(first, 3)
    backlog(second, 5)
    (first.parent / "not-a-queue").mkdir()
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", "token-two")
    monkeypatch.setenv("PER_BASE_URL", url)

    assert run("status", "--all") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"Queue directories under {tmp_path / 'per-buffer'}:"
    table = {line.split()[0]: line.split() for line in out.splitlines()[2:] if "q-" in line}
    assert set(table) == {first.name, second.name}
    assert table[first.name][1] == "3" and table[second.name][1:3] == ["*", "5"]
    assert "not-a-queue" not in out

    assert run("status", "--all", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    listed = {Path(d["directory"]).name: d for d in data["directories"]}
    assert {k: v["pending"] for k, v in listed.items()} == {first.name: 3, second.name: 5}
    assert listed[second.name]["current"] and not listed[first.name]["current"]


def test_status_all_with_nothing_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert run("status", "--all") == 0
    assert capsys.readouterr().out.startswith("No queue directories under ")
