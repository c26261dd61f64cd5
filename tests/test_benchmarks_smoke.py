"""The benchmark suite's smoke run: it must finish, crash nowhere and lose nothing.

Timing never fails this test (the smoke run only fails on a crash or a lost
activity); figures are checked for presence, not for speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("hot_path", "delivery", "backlog", "outage", "coalescing", "startup")


def test_smoke_run_completes_without_losing_activities(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["failed"] is False
    assert data["environment"]["mode"] == "smoke"
    for key in ("cpu_count", "python", "platform", "date"):
        assert data["environment"][key]
    for dist in ("per-buffer", "httpx", "diskcache", "tenacity"):
        assert data["environment"]["versions"][dist] != "not installed"
    for name in SCENARIOS:
        scenario = data["scenarios"][name]
        assert scenario["status"] == "ok", (name, scenario)
        assert scenario["lost"] == 0, (name, scenario.get("checks"))
        assert scenario["tables"], name
    # every scenario prints a Markdown table on stdout
    for name in SCENARIOS:
        assert f"## {name}" in proc.stdout
