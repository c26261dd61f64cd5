"""``per-buffer dead-letters``: list, requeue, purge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import dead_letters, run

from per_buffer.testing import PerServer


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
