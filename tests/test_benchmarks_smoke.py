"""The benchmark suite's smoke run: it must finish, crash nowhere and lose nothing.

Timing never fails this test (the smoke run only fails on a crash or a lost
activity); figures are checked for presence, not for speed. The run's scratch
directories are kept under the test's own directory, so the drainer processes the
recorders start there can be found afterwards: none may outlive the run.

It runs the scenarios that exercise the runner and both delivery modes (about 10 s);
``make bench-smoke`` (which ``.ci/run`` calls after the suite) runs every scenario.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("delivery", "backlog", "coalescing")


def _drainer_pids(under: Path) -> list[int]:
    """The benchmarks' own finder (the repository root is not always on sys.path)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks._procs import drainer_pids  # noqa: PLC0415

    return drainer_pids(under)


def test_smoke_run_completes_without_losing_activities(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PER_BENCH_TMP"] = str(scratch)  # scratch_dir()
    env["TMPDIR"] = str(scratch)  # tempfile (startup's interpreters)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "--only",
            ",".join(SCENARIOS),
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,  # under pytest's own 120 s
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

    # delivery measured both modes, with the drainer's own CPU read from /proc
    delivery = data["scenarios"]["delivery"]
    assert delivery["checks"]["modes"] == ["process", "thread"]
    for cell in delivery["figures"]["configs"].values():
        for subject in ("drainer", "thread", "httpx"):
            assert cell[subject]["runs"], subject
        for run in cell["drainer"]["runs"]:
            assert run["mode"] == "process" and run["drainer_pid"], run
            assert run["drained"] is True, run
            assert math.isfinite(run["cpu_per_1k"]) and run["cpu_per_1k"] > 0, run
        for run in cell["thread"]["runs"]:
            assert run["mode"] == "thread" and run["drained"] is True, run
    assert delivery["figures"]["event_loop"] in ("uvloop", "asyncio")
    assert any(t["name"].startswith("drainer CPU per delivered") for t in delivery["targets"])
    # the backlog was drained by a drainer that reached the server
    drain = data["scenarios"]["backlog"]["figures"]["drain"]
    assert drain["mode"] == "process" and drain["delivered"] > 0, drain
    assert data["scenarios"]["coalescing"]["figures"]["delivery_mode"] == "thread"

    # no drainer started by the run outlives it (one with work left lingers otherwise)
    deadline = time.monotonic() + 5.0
    while _drainer_pids(scratch) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _drainer_pids(scratch) == []
