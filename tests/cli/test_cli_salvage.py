"""``per-buffer salvage``: re-queue what a quarantined database still holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import on_disk, one_error_line, run
from quarantine_helpers import quarantine_garbage, quarantine_readable

from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer


def test_salvage_requeues_a_readable_quarantine_then_drain_delivers_it(
    env: PerServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    folder = quarantine_readable(directory, 6)
    assert on_disk(directory) == 0
    assert run("salvage", str(folder)) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"re-queued 6 entries from {folder} into {directory}; could not read: 0 entries\n"
    )
    assert on_disk(directory) == 6
    assert run("salvage", str(folder)) == 2  # a second run would store them twice
    assert "--force" in one_error_line(capsys.readouterr().err)
    assert run("status", "--dir", str(directory), "--json") == 0
    assert json.loads(capsys.readouterr().out)["quarantine"]["salvaged_entries"] == 6
    assert run("drain", "--dir", str(directory), "--timeout", "20") == 0
    capsys.readouterr()
    assert {(a.billing_id, a.user_id) for a in env.activities} == {
        ("saved", f"u{i}") for i in range(6)
    }


def test_salvage_into_another_directory_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = quarantine_readable(tmp_path / "old", 3)
    live = tmp_path / "live"
    with DurableQueue(live):
        pass
    assert run("salvage", str(folder), "--dir", str(live), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["requeued"], data["unreadable"]) == (3, 0)
    assert data["directory"] == str(live)
    assert on_disk(live) == 3


def test_nothing_readable_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "q"
    folder = quarantine_garbage(directory, 50)
    assert run("salvage", str(folder)) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    assert "nothing was readable" in line and str(folder) in line
    assert on_disk(directory) == 0


def test_bad_paths_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    not_quarantine = tmp_path / "plain"
    not_quarantine.mkdir()
    for path in (tmp_path / "missing", a_file, not_quarantine):
        assert run("salvage", str(path)) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert str(path) in one_error_line(captured.err)
    folder = quarantine_readable(tmp_path / "q", 1)
    assert run("salvage", str(folder), "--dir", str(tmp_path / "plain")) == 2
    assert "not a per_buffer queue directory" in one_error_line(capsys.readouterr().err)
