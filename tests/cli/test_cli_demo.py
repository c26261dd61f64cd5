"""``per-buffer demo``: small runs reach MATCH, as text and as JSON."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run


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
