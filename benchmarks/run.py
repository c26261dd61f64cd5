"""The benchmark runner: ``python -m benchmarks [--quick | --smoke] [--only A,B] [--json PATH]``.

Each scenario runs in a fresh child process (``--child NAME``) so that memory,
threads and imported peers of one cannot bias the next; the child writes its
results as JSON and the parent prints one Markdown table per measurement, then a
summary of every target.

Exit status: 1 when a scenario crashed (or timed out) or lost an activity, else 0.
Timing never fails the run: a missed target is printed as ``MISSED``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ._common import (
    DEADLINE_ENV,
    MODES,
    RUN_ORDER,
    SCENARIOS,
    ScenarioResult,
    Table,
    cpu_model,
    loadavg,
    met_text,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Seconds a scenario's child may run before it counts as crashed.
TIMEOUTS: dict[str, dict[str, float]] = {
    "smoke": dict.fromkeys(SCENARIOS, 90.0),
    "quick": {**dict.fromkeys(SCENARIOS, 180.0), "app": 300.0},
    "full": {**dict.fromkeys(SCENARIOS, 420.0), "backlog": 780.0, "app": 1200.0},
}

#: Whole-run time budget per mode (seconds); the backlog drain stops at it if need be.
#: (degraded: about 9 s smoke, 55 s quick, 180 s full; app: about 12 s, 200 s, 1000 s.)
BUDGETS: dict[str, float] = {"smoke": 60.0, "quick": 370.0, "full": 2050.0}

_DISTRIBUTIONS = (
    "per-buffer",
    "httpx",
    "diskcache",
    "tenacity",
    "segment-analytics-python",
    "posthog",
    "psutil",
)


def environment(mode: str) -> dict[str, Any]:
    """Machine, interpreter and package versions for the JSON output and the header."""
    versions: dict[str, str] = {}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "mode": mode,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _strict(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


# --------------------------------------------------------------------------- child


def run_child(name: str, mode: str, out: Path) -> int:
    """Run one scenario in this process and write its result to ``out``."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Outages and closed ports are deliberate here; only real errors are worth a line.
    logging.getLogger("per_buffer").setLevel(logging.ERROR)
    module = importlib.import_module(f"benchmarks.{name}")
    started = time.perf_counter()
    result: ScenarioResult = module.run(mode)
    result.figures["elapsed_s"] = time.perf_counter() - started
    out.write_text(json.dumps(result.to_json(), indent=1, default=str))
    return 0


def _spawn(name: str, mode: str) -> tuple[ScenarioResult | None, str, float]:
    """Run ``name`` in a child process; (result or None, failure text, seconds)."""
    fd, raw = tempfile.mkstemp(prefix=f"per-bench-{name}-", suffix=".json")
    os.close(fd)
    out = Path(raw)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "benchmarks.run", "--child", name, "--mode", mode]
    command += ["--child-out", str(out)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=sys.stderr,
            stderr=sys.stderr,
            timeout=TIMEOUTS[mode][name],
            check=False,
        )
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            return None, f"crashed (exit status {proc.returncode})", elapsed
        text = out.read_text()
        if not text.strip():
            return None, "crashed (no result written)", elapsed
        return ScenarioResult.from_json(json.loads(text)), "", elapsed
    except subprocess.TimeoutExpired:
        return (
            None,
            f"crashed (timed out after {TIMEOUTS[mode][name]:.0f} s)",
            (time.perf_counter() - started),
        )
    finally:
        out.unlink(missing_ok=True)


# --------------------------------------------------------------------------- parent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="per_buffer benchmarks: hot path, delivery, backlog, outage, "
        "degraded, coalescing, startup.",
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="whole run in about 2 minutes")
    speed.add_argument(
        "--smoke", action="store_true", help="tiny subset for CI; fails only on crash or loss"
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--json", dest="json_path", default=None, help="write all figures here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--in-process", action="store_true", help="run scenarios in this process (debugging)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``."""
    args = _parse(argv)
    if args.child:
        return run_child(args.child, args.mode or "quick", Path(args.child_out))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
        return 2

    env = environment(mode)
    env["load_average_start"] = loadavg()
    print(f"# per_buffer benchmarks ({mode} mode)\n")
    print(
        f"{env['date']} - {env['cpu_model']}, {env['cpu_count']} cores - Python {env['python']} "
        f"- per_buffer {env['versions']['per-buffer']}, httpx {env['versions']['httpx']}, "
        f"diskcache {env['versions']['diskcache']}, tenacity {env['versions']['tenacity']}\n",
        flush=True,
    )
    started = time.perf_counter()
    os.environ[DEADLINE_ENV] = str(time.time() + BUDGETS[mode])  # inherited by the children
    outcomes: dict[str, tuple[ScenarioResult | None, str, float]] = {}
    for name in [n for n in RUN_ORDER if n in names]:
        print(f"[{name}] running ({mode})...", file=sys.stderr, flush=True)
        if args.in_process:
            t0 = time.perf_counter()
            try:
                module = importlib.import_module(f"benchmarks.{name}")
                outcome: tuple[ScenarioResult | None, str, float] = (module.run(mode), "", 0.0)
            except Exception:
                traceback.print_exc()
                outcome = (None, "crashed (exception)", 0.0)
            outcomes[name] = (outcome[0], outcome[1], time.perf_counter() - t0)
        else:
            outcomes[name] = _spawn(name, mode)
        result, error, elapsed = outcomes[name]
        verdict = error or (f"LOST {result.lost}" if result and result.lost else "ok")
        print(f"[{name}] {verdict} in {elapsed:.1f} s", file=sys.stderr, flush=True)

    results: dict[str, Any] = {}
    summary = Table("Summary: every target", ["scenario", "target", "goal", "measured", "met?"])
    status = Table("Summary: scenarios", ["scenario", "status", "activities lost", "seconds"])
    failed = False
    for name in names:  # printed in the order asked for (the brief's order by default)
        result, error, elapsed = outcomes[name]
        print(f"## {name}\n")
        if result is None:
            failed = True
            print(f"**{name} {error}**\n", flush=True)
            results[name] = {"status": "crashed", "error": error, "seconds": elapsed}
            status.add(name, error.upper(), "-", f"{elapsed:.1f}")
            continue
        for table in result.tables:
            print(table.markdown() + "\n", flush=True)
        for target in result.targets:
            summary.add(name, target.name, target.target, target.measured, target.verdict)
        lost_text = str(result.lost)
        state = "ok"
        if result.lost:
            failed = True
            state = "LOST ACTIVITIES"
            lost_text = f"**{result.lost}**"
        status.add(name, state, lost_text, f"{elapsed:.1f}")
        data = result.to_json()
        data.update(status=state, seconds=elapsed)
        results[name] = data
    total = time.perf_counter() - started
    env["load_average_end"] = loadavg()
    env["total_seconds"] = total
    print("## Summary\n")
    if summary.rows:
        missed = sum(row[-1] == met_text(False) for row in summary.rows)
        summary.notes.append(
            f"{len(summary.rows)} targets, {missed} MISSED."
            if missed
            else f"All {len(summary.rows)} targets met."
        )
        print(summary.markdown() + "\n")
    status.notes.append(
        f"Total {total:.0f} s; load average {env['load_average_start']:.2f} at start, "
        f"{env['load_average_end']:.2f} at end ({env['cpu_count']} cores)."
    )
    print(status.markdown(), flush=True)
    if args.json_path:
        payload = {"environment": env, "scenarios": results, "failed": failed}
        Path(args.json_path).write_text(
            json.dumps(_strict(payload), indent=1, default=str, allow_nan=False)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
