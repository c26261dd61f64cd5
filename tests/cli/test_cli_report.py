"""``per-buffer report``: this month up to now by default, relative times, the period shown."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cli_helpers import one_error_line, run

from per_buffer import PerClient
from per_buffer.cli.report import moment, period
from per_buffer.testing import PerServer

NOW = datetime(2024, 5, 17, 10, 30, 15, 250_000, tzinfo=timezone.utc)


def record_some(server: PerServer) -> None:
    with PerClient(server.activity_token, base_url=server.url) as client:
        for user in ("u1", "u2", "u3"):
            client.add_activity("acme", user, "login")
        client.add_activity("globex", "u1", "login")
        client.add_activity("acme", "u1", "export")


def test_report_table_and_json(env: PerServer, capsys: pytest.CaptureFixture[str]) -> None:
    record_some(env)
    assert run("report", "--start", "2000-01-01") == 0
    out = capsys.readouterr().out
    assert out.startswith("Per report 2000-01-01T00:00:00Z .. ")
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
    assert (data["start"], data["end"]) == ("2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z")


def test_without_bounds_it_is_this_month_up_to_now(
    env: PerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Right after recording, the default report shows the activity (it used to be empty)."""
    record_some(env)
    before = datetime.now(timezone.utc)
    assert run("report", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"] == {"login": 4, "export": 1}
    assert data["start"] == before.strftime("%Y-%m-01T00:00:00Z")
    end = datetime.fromisoformat(data["end"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= end <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert data["period"] == "this month (UTC) up to now"

    assert run("report") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"Per report {data['start']} .. ")
    assert first.endswith("(this month (UTC) up to now)")


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ("today", "2024-05-17T00:00:00Z"),
        ("yesterday", "2024-05-16T00:00:00Z"),
        ("now", "2024-05-17T10:30:16Z"),  # now rounded up to a whole second
        ("-7d", "2024-05-10T10:30:16Z"),
        ("-12h", "2024-05-16T22:30:16Z"),
        ("-30m", "2024-05-17T10:00:16Z"),
        ("-2w", "2024-05-03T10:30:16Z"),
        ("2024-05-01", "2024-05-01T00:00:00Z"),
        ("2024-05-01T12:00:00+02:00", "2024-05-01T10:00:00Z"),
    ],
)
def test_start_forms(start: str, expected: str) -> None:
    first, last, described = period(moment(start), None, NOW)
    assert first.strftime("%Y-%m-%dT%H:%M:%SZ") == expected
    assert last.strftime("%Y-%m-%dT%H:%M:%SZ") == "2024-05-17T10:30:16Z"
    assert described == f"from {start} to now"


def test_default_period_and_end_forms() -> None:
    first, last, described = period(None, None, NOW)
    assert (first.isoformat(), last.isoformat()) == (
        "2024-05-01T00:00:00+00:00",
        "2024-05-17T10:30:16+00:00",
    )
    assert described == "this month (UTC) up to now"
    first, last, described = period(moment("yesterday"), moment("today"), NOW)
    assert (first.day, last.day, last.hour) == (16, 17, 0)
    assert described == "from yesterday to today"


def test_relative_and_word_times_on_the_command_line(
    env: PerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    record_some(env)
    for argv in (
        ["--start", "today"],
        ["--start", "-7d"],
        ["--start=-30m", "--end", "now"],
        ["--start", "-12h", "--end", "now"],
    ):
        assert run("report", *argv, "--json") == 0, argv
        assert json.loads(capsys.readouterr().out)["totals"] == {"login": 4, "export": 1}
    assert run("report", "--start", "yesterday", "--end", "today") == 0
    out = capsys.readouterr().out
    assert "(from yesterday to today)" in out.splitlines()[0]
    assert "No activity in this period." in out


def test_malformed_times(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_REPORTING_TOKEN", "t")
    assert run("report", "--start", "last week") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--start" in line and "last week" in line and "-7d" in line and "yesterday" in line
    assert run("report", "--start", "2024-05-01T10:00:00") == 2  # no time zone
    assert "time zone" in one_error_line(capsys.readouterr().err)
    assert run("report", "--start", "today", "--end", "yesterday") == 2
    assert "--start" in one_error_line(capsys.readouterr().err)
    assert run("report", "--start", "-5x") == 2
    one_error_line(capsys.readouterr().err)


def test_unreachable_per(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("PER_REPORTING_TOKEN", "t")
    assert run("report", "--start", "2024-05-01", "--timeout", "2") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "reachable" in line and "PER_BASE_URL" in line


def test_bad_token_is_named(
    env: PerServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PER_REPORTING_TOKEN", "wrong")
    assert run("report") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "PER_REPORTING_TOKEN" in line and "wrong" not in line
