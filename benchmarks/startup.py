"""Scenario ``startup``: what importing per_buffer and building a Recorder cost.

Every figure comes from a fresh interpreter (``sys.executable``), runs alternate:
the in-process time of ``import per_buffer`` against ``import httpx`` alone (which
per_buffer needs anyway), the wall time of whole ``python -c`` runs, and the time
to build a :class:`~per_buffer.Recorder` on a fresh and on an existing directory and
to make its first ``record()`` call (which starts the committer thread and, in the
default ``process`` delivery mode, the thread that spawns the drainer), and to close
it right after. ``python -X importtime`` names the heaviest imports.

Time to the first delivery: in a fresh interpreter, from ``Recorder()`` on a fresh
directory (``per_buffer`` already imported) and one ``record()`` to the moment
``stats()`` counts the activity delivered (polled every 2 ms), against the local
server in its own process: in the default mode (the drainer process's start
included: a fresh interpreter that imports per_buffer) and in the ``thread`` mode;
then how long ``close()`` takes in each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from per_buffer.testing import PerServerProcess

from ._common import ScenarioResult, Spread, Table, fmt, loadavg, log, spread
from ._procs import end_drainers

PARAMS: dict[str, dict[str, int]] = {
    "smoke": {"runs": 3},
    "quick": {"runs": 7},
    "full": {"runs": 15},
}

REPO_ROOT = Path(__file__).resolve().parents[1]

_IMPORT = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
_RECORDER = """
import json, sys, time
t0 = time.perf_counter()
import per_buffer
t1 = time.perf_counter()
fresh = per_buffer.Recorder("bench-token", "api_call", directory=sys.argv[1] + "/a",
                            base_url="http://127.0.0.1:9")
t2 = time.perf_counter()
fresh.record("org", "user-1")
t3 = time.perf_counter()
fresh.close(timeout=0)
t4 = time.perf_counter()
again = per_buffer.Recorder("bench-token", "api_call", directory=sys.argv[1] + "/a",
                            base_url="http://127.0.0.1:9")
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "fresh": t2 - t1, "first_record": t3 - t2,
                  "close_0": t4 - t3, "existing": t5 - t4}))
again.close(timeout=0)
"""
# the token comes on standard input, never on the command line
_FIRST_DELIVERY = """
import json, sys, time
import per_buffer
token = sys.stdin.readline().strip()
directory, base_url, delivery = sys.argv[1:4]
t0 = time.perf_counter()
rec = per_buffer.Recorder(token, "api_call", directory=directory, base_url=base_url,
                          delivery=delivery)
rec.record("org", "first-user")
t1 = time.perf_counter()
deadline = t1 + 30.0
while rec.stats().delivered < 1 and time.perf_counter() < deadline:
    time.sleep(0.002)
t2 = time.perf_counter()
delivered = rec.stats().delivered
rec.close(timeout=5.0)
t3 = time.perf_counter()
print(json.dumps({"record": t1 - t0, "delivered": t2 - t0, "close": t3 - t2,
                  "count": delivered, "mode": rec.stats().delivery}))
"""
MODES = ("process", "thread")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure what users see: cached bytecode
    return env


def _python(args: list[str], env: dict[str, str], stdin: str = "") -> tuple[float, str]:
    """Run the interpreter; (wall seconds, stdout)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return time.perf_counter() - start, proc.stdout


def importtime_top(env: dict[str, str], limit: int = 8) -> tuple[list[tuple[str, float]], float]:
    """Heaviest packages under ``import per_buffer`` (cumulative ms) and per_buffer's self ms."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import per_buffer"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    packages: dict[str, float] = {}
    own = 0.0
    pattern = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(\S+)")
    for line in proc.stderr.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        self_us, cumulative, name = int(match.group(1)), int(match.group(2)), match.group(3)
        package = name.split(".")[0]
        if package == "per_buffer":
            own += self_us / 1000.0
            continue
        packages[package] = max(packages.get(package, 0.0), cumulative / 1000.0)
    return sorted(packages.items(), key=lambda kv: -kv[1])[:limit], own


def run(mode: str) -> ScenarioResult:
    """Measure imports and Recorder construction in fresh interpreters."""
    p = PARAMS[mode]
    result = ScenarioResult("startup", mode)
    env = _env()
    load_before = loadavg()
    samples: dict[str, list[float]] = {}
    # compile bytecode once, as an installed package would have it
    _python(["-c", "import per_buffer, httpx"], env)
    log(f"startup: {p['runs']} fresh interpreters per measurement")
    failed_first: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="per-bench-startup-") as tmp,
        PerServerProcess(keep_activities=False) as server,
    ):
        for run_index in range(p["runs"]):
            steps: list[tuple[str, list[str]]] = [
                ("python -c pass (wall)", ["-c", "pass"]),
                ("import httpx", ["-c", _IMPORT.format(module="httpx")]),
                ("import per_buffer", ["-c", _IMPORT.format(module="per_buffer")]),
                ("python -c 'import per_buffer' (wall)", ["-c", "import per_buffer"]),
                ("recorder", ["-c", _RECORDER, f"{tmp}/r{run_index}"]),
            ]
            if run_index % 2:
                steps.reverse()
            for label, args in steps:
                wall, out = _python(args, env)
                if label.endswith("(wall)"):
                    samples.setdefault(label, []).append(wall)
                elif label == "recorder":
                    data = json.loads(out.strip().splitlines()[-1])
                    for key, value in data.items():
                        samples.setdefault(f"recorder:{key}", []).append(float(value))
                else:
                    samples.setdefault(label, []).append(float(out.strip().splitlines()[-1]))
            # the port-9 recorders' drainer probes a closed port: it would linger a minute
            end_drainers(Path(tmp), grace=0.0)
            for delivery in MODES if run_index % 2 == 0 else MODES[::-1]:
                directory = f"{tmp}/first-{delivery}-{run_index}"
                _, out = _python(
                    ["-c", _FIRST_DELIVERY, directory, server.url, delivery],
                    env,
                    stdin=server.activity_token + "\n",
                )
                data = json.loads(out.strip().splitlines()[-1])
                if data["count"] < 1 or data["mode"] != delivery:
                    failed_first.append(f"{delivery}: {data}")
                for key in ("delivered", "close"):
                    samples.setdefault(f"first:{delivery}:{key}", []).append(float(data[key]))
                end_drainers(Path(directory))  # it stops by itself once idle and alone
        top, own_modules = importtime_top(env)

    ms: dict[str, Spread] = {k: spread([v * 1000.0 for v in vals]) for k, vals in samples.items()}
    own = spread(
        [
            (a - b) * 1000.0
            for a, b in zip(samples["import per_buffer"], samples["import httpx"], strict=True)
        ]
    )
    table = Table(
        "startup: import and construction times (fresh interpreter each run)",
        ["measurement", "ms", "compared with"],
    )
    httpx_ms = ms["import httpx"].median
    table.add("import httpx (alone)", fmt(ms["import httpx"]), "")
    table.add(
        "import per_buffer (httpx, diskcache, tenacity included)",
        fmt(ms["import per_buffer"]),
        f"{ms['import per_buffer'].median / httpx_ms:.2f}x import httpx",
    )
    table.add(
        "per_buffer's own share (import per_buffer - import httpx, paired runs)", fmt(own), ""
    )
    table.add(
        "whole `python -c 'import per_buffer'` (wall)",
        fmt(ms["python -c 'import per_buffer' (wall)"]),
        f"`python -c pass`: {fmt(ms['python -c pass (wall)'])} ms",
    )
    table.add("Recorder() on a fresh directory", fmt(ms["recorder:fresh"]), "")
    table.add("Recorder() on an existing directory", fmt(ms["recorder:existing"]), "")
    table.add(
        "first record() call (starts the committer thread and the drainer's spawning thread)",
        fmt(ms["recorder:first_record"]),
        "",
    )
    table.add(
        "close(timeout=0) right after that first record() (default mode)",
        fmt(ms["recorder:close_0"]),
        "waits for the drainer it is starting to report ready",
    )
    table.add(
        "Recorder() + record() until the activity is delivered, default mode (drainer "
        "process; its start included)",
        fmt(ms["first:process:delivered"]),
        f"thread mode: {fmt(ms['first:thread:delivered'])} ms",
    )
    table.add(
        "close() right after that delivery, default mode (the drainer goes on)",
        fmt(ms["first:process:close"]),
        f"thread mode: {fmt(ms['first:thread:close'])} ms",
    )
    table.notes.append(
        f"Medians of {p['runs']} fresh interpreters, [min-max]; bytecode already compiled. "
        "Heaviest packages under `import per_buffer` (python -X importtime, one run, cumulative "
        "ms, nested packages counted in their parents too): "
        + ", ".join(f"{name} {value:.1f}" for name, value in top)
        + f"; per_buffer's own modules (self time): {own_modules:.1f} ms."
    )
    table.notes.append(
        "Delivery mode: the default (process) for every row, except the thread-mode figures "
        "given for comparison. Recorder() rows use an unreachable base URL (port 9), so no "
        "delivery happens there; first delivery rows use the local server (0 ms, its own "
        "process), stats() polled every 2 ms in the recording process. A drainer is niced "
        "+10 (drainer_nice), so its start is slower on a busy machine."
    )
    if failed_first:
        table.notes.append("FIRST DELIVERY FAILED: " + "; ".join(failed_first))
    result.tables.append(table)
    result.figures.update(
        {
            "ms": {k: v.as_dict() for k, v in ms.items()},
            "per_buffer_own_ms": own.as_dict(),
            "importtime_top_ms": dict(top),
            "importtime_per_buffer_self_ms": own_modules,
            "first_delivery_failures": failed_first,
            "load_average": {"before": load_before, "after": loadavg()},
        }
    )
    return result
