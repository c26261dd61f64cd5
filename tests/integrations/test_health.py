"""health(): a pure verdict on a stats snapshot, and on a real recorder refused by Per."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import CALM, readme_example, refused_recorder, require, wait_until

import per_buffer
from per_buffer.health import Health, health
from per_buffer.testing import PerServer


def test_all_well_is_ok() -> None:
    verdict = health(CALM)
    assert (verdict.ok, verdict.status, verdict.reasons) == (True, "ok", ())
    assert verdict.to_dict()["reasons"] == [] and verdict.to_dict()["dropped"] == {}


@pytest.mark.parametrize(
    ("changes", "status", "words"),
    [
        ({"pause_reason": "auth", "paused_until": 2e9}, "failing", "refused the token"),
        ({"pause_reason": "rate_limited", "paused_until": 2e9}, "degraded", "rate_limited"),
        ({"oldest_pending_age": 301.0, "pending": 5}, "failing", "waited 301 s (limit 300 s)"),
        ({"oldest_pending_age": 299.0, "pending": 5}, "ok", ""),
        ({"queue_errors": 2, "buffered": 40}, "failing", "40 activities wait in memory"),
        ({"queue_errors": 2, "buffered": 0}, "degraded", "disk queue failed 2 times"),
        ({"dropped": {"memory_full": 3, "closed": 1}}, "degraded", "closed=1, memory_full=3"),
        ({"dead_lettered": 2}, "degraded", "2 activities dead-lettered"),
    ],
)
def test_each_condition(changes: dict[str, Any], status: str, words: str) -> None:
    verdict = health(replace(CALM, **changes))
    assert verdict.status == status
    assert verdict.ok == (status != "failing")
    assert words in " ".join(verdict.reasons)


def test_failing_reasons_come_first_and_the_figures_come_along() -> None:
    stats = replace(
        CALM,
        pause_reason="auth",
        dropped={"queue_full": 1},
        oldest_pending_age=900.0,
        pending=7,
    )
    verdict = health(stats, max_pending_age=600)
    assert verdict.status == "failing" and len(verdict.reasons) == 3
    assert "token" in verdict.reasons[0] and "waited 900 s" in verdict.reasons[1]
    assert "dropped" in verdict.reasons[2]
    assert (verdict.pending, verdict.max_pending_age, verdict.dropped) == (
        7,
        600.0,
        {"queue_full": 1},
    )


def test_previous_counts_only_what_happened_since() -> None:
    before = replace(CALM, dropped={"queue_full": 5}, queue_errors=3, dead_lettered=1)
    same = replace(before, delivered=20)
    assert health(same, previous=before).status == "ok"
    more = replace(before, dropped={"queue_full": 6, "closed": 1}, dead_lettered=2)
    verdict = health(more, previous=before)
    assert verdict.dropped == {"queue_full": 1, "closed": 1} and verdict.dead_lettered == 1
    # a counter below the previous one: a new recorder, counted from zero
    assert health(replace(CALM, queue_errors=1), previous=before).queue_errors == 1


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="RecorderStats"):
        health({"pending": 0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="previous"):
        health(CALM, previous=3)  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), True, "300"):
        with pytest.raises(ValueError, match="max_pending_age"):
            health(CALM, max_pending_age=bad)  # type: ignore[arg-type]


def test_a_recorder_refused_by_per_is_failing(tmp_path: Path) -> None:
    with refused_recorder(tmp_path) as rec:
        verdict = health(rec.stats())
        assert isinstance(verdict, Health)
        assert (verdict.ok, verdict.status, verdict.pause_reason) == (False, "failing", "auth")
        assert verdict.pending == 1


@pytest.mark.usefixtures("per_env")
def test_the_readme_readiness_endpoint(server: PerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    require("flask")
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
    namespace: dict[str, Any] = {"__name__": "readme_ready"}
    exec(readme_example("metrics", "import per_buffer\nfrom flask import Flask"), namespace)
    client = namespace["app"].test_client()
    try:
        per_buffer.record("acme-corp", "u1")
        assert per_buffer.flush(timeout=10)
        response = client.get("/ready")
        assert response.status_code == 200 and response.json["status"] == "ok"
        server.set_tokens(activity_tokens=["rotated-token-0000"])  # the app's token is now refused
        per_buffer.record("acme-corp", "u2")
        wait_until(
            lambda: per_buffer.get_recorder().stats().pause_reason == "auth", 10, "auth pause"
        )
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json["status"] == "failing" and response.json["pause_reason"] == "auth"
    finally:
        per_buffer.shutdown(timeout=0)
