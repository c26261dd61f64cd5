"""The pytest plugin (per_buffer.testing.pytest_plugin): its fixtures, here and in a new project."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import httpx
import pytest

from per_buffer import Recorder
from per_buffer.testing import PerServer

pytest_plugins = ["pytester"]

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- used directly


def test_per_recorder_delivers_to_per_server(per_server: PerServer, per_recorder: Recorder) -> None:
    per_recorder.record("acme-corp", "user-1")
    per_recorder.record("acme-corp", "user-1")  # coalesced
    per_recorder.record("globex", "user-2")
    assert per_recorder.flush(timeout=10)
    assert per_server.wait_for_activities(2, timeout=5)
    received = sorted((a.billing_id, a.user_id, a.activity_type_id) for a in per_server.activities)
    assert received == [("acme-corp", "user-1", "test"), ("globex", "user-2", "test")]
    report = per_server.report("2000-01-01T00:00:00Z")
    assert report["activityTypes"] == {
        "test": {"billingIds": {"acme-corp": {"unique": 1}, "globex": {"unique": 1}}}
    }
    assert per_recorder.stats().delivered == 2


def test_per_recorder_queue_lives_under_tmp_path(
    per_recorder: Recorder, per_server: PerServer, tmp_path: Path
) -> None:
    per_recorder.record("acme-corp", "user-1")
    assert per_recorder.flush(timeout=10)
    queue = tmp_path / "per-buffer-queue"
    assert queue.is_dir() and any(queue.iterdir())


def test_per_server_is_a_fresh_running_server(per_server: PerServer) -> None:
    assert per_server.activities == [] and set(per_server.counters.values()) == {0}
    with httpx.Client(trust_env=False, timeout=5) as client:
        response = client.get(
            f"{per_server.url}/reports.get",
            headers={"Authorization": f"Bearer {per_server.reporting_token}"},
        )
    assert response.json()["ok"] is True


@pytest.fixture
def delivery_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PER_BUFFER_ENABLED", "false")


def test_per_recorder_is_enabled_whatever_the_environment(
    delivery_disabled_by_env: None, per_recorder: Recorder, per_server: PerServer
) -> None:
    per_recorder.record("acme-corp", "user-9")
    assert per_recorder.flush(timeout=10)
    assert [a.user_id for a in per_server.activities] == ["user-9"]


# --------------------------------------------------------------------------- a fresh project


FRESH_TESTS = """
    import httpx


    def test_signup_is_reported(per_server, per_recorder):
        per_recorder.record("acme-corp", "user-1")
        assert per_recorder.flush(timeout=10)
        assert [a.user_id for a in per_server.activities] == ["user-1"]


    def test_each_test_gets_its_own_server_and_recorder(per_server, per_recorder):
        assert per_server.activities == []
        SEEN.append((per_server.url, per_recorder))


    def test_both_are_stopped_after_their_test():
        [(url, recorder)] = SEEN
        try:
            httpx.get(url + "/reports.get", timeout=2)
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError("the per_server of an earlier test still answers")
        recorder.record("acme-corp", "user-2")
        assert recorder.stats().dropped == {"closed": 1}


    SEEN = []
"""


def test_a_fresh_project_gets_the_fixtures_from_the_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_app=textwrap.dedent(FRESH_TESTS))
    # a separate interpreter: the plugin must come from the installed entry point, not from here
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_plugin_can_be_disabled_by_its_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_app="def test_x(per_server):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:per_buffer")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'per_server' not found*"])


def test_the_readme_sample_passes_under_pytest(pytester: pytest.Pytester) -> None:
    section = README.split("<!-- pytest-plugin:start -->", 1)[1].split(
        "<!-- pytest-plugin:end -->"
    )[0]
    [sample] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    pytester.makepyfile(test_readme_sample=sample)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=sample.count("def test_"))
