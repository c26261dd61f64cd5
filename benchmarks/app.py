"""Scenario ``app``: what a web app pays for recording, in each delivery mode (issue 11.6).

Servers, started as a user would: gunicorn with 4 sync workers over a minimal WSGI app
(:mod:`benchmarks.app_wsgi`, the recorder closed by ``per_buffer.integrations.gunicorn``
hooks), and uvicorn with 2 workers over a minimal ASGI app (:mod:`benchmarks.app_asgi`,
wrapped in ``per_buffer.integrations.asgi.PerBufferMiddleware``). Per is the local server
in its own process with a 5 ms latency. Everything shares this machine's cores: CPU that
delivery (or Per) takes while the app is saturated comes out of the app's throughput.

Load: ``wrk`` (1 thread, 16 connections, closed loop) where installed, else a Python load
generator (one process, the same connections; ``PER_BENCH_LOADGEN=python`` forces it; the
table says which). Each run drives one endpoint for whole seconds: ``/r`` draws a user and
calls ``per_buffer.record(billing, user)``, ``/p`` does the same work and calls a no-op in
its place; both time that call in the app (the no-op is the control for ``record()``'s
duration). Runs alternate (``/p``, ``/r``, then ``/r``, ``/p`` ...), and before every run
the queue directory is drained (the wait is the catch-up time), so no run pays for
delivery left over from the one before. Figures are medians of the runs [min-max];
ratios are taken per pair of adjacent runs.

Cases: ``worst``: every request a new user and ``coalesce_window=0`` (each record is a
request to Per); ``zipf``: the default window (900 s) with users drawn from a Zipf pool
(10,000 users, s=1). Modes: ``process`` (the default: a drainer process started on demand,
niced by ``drainer_nice``), ``thread`` (delivery in each worker) and ``external``
(``per-buffer drain --follow`` started here as its own process, at nice 0). Each server x
case x mode runs on its own fresh queue directory and server instance.

CPU per process comes from ``/proc`` (psutil): app processes, the drainer, Per, the load
generator, and the whole machine (``/proc/stat``), whose excess over ours is other work on
the machine: when it is not near 0, req/s figures are unreliable, and the CPU-bound
estimate of the ratio (our CPU per request without recording / with) is the steadier one.

Accounting: each app process counts its ``record()`` calls (and, in the Zipf case, which
pool users it recorded) in a memory-mapped file the benchmark reads. After the last run
the directory is drained: lost = recorded keys - keys Per counted - entries still on disk
(must be 0).

Shutdown under load: in the default mode, worst case, the app server is sent SIGTERM
1.5 s into a load on ``/r`` (and, as a control, on ``/p`` without any recorder); the time
to its exit is measured, then the drainer (which outlives it) delivers the rest, and
recorded = delivered + on disk is checked.

Servers and load generators die with this process (``PR_SET_PDEATHSIG``), and the
scenario skips what is left once ``cap`` seconds have passed (a loaded machine).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from per_buffer.queue import inspect
from per_buffer.testing import PerServerProcess

from ._app_work import (
    CASE_ENV,
    COUNTERS_ENV,
    POOL_ENV,
    PREFIX_ENV,
    ZIPF_ENV,
    read_counters,
    reset_max,
)
from ._common import (
    ACTIVITY_TYPE,
    ScenarioResult,
    Spread,
    Table,
    Target,
    closed_port,
    fmt,
    loadavg,
    log,
    num,
    percentile,
    scratch_dir,
    spread,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

PER_LATENCY = 0.005  # seconds per Per response
CONNECTIONS = 16
POOL = 10_000
ZIPF_S = 1.0
WINDOW = 900.0  # the default coalesce_window (the zipf case)
MARGIN = 30.0  # the default coalesce_margin
TARGET_RPS_RATIO = 0.9
TARGET_P99_RATIO = 1.2
TARGET_SHUTDOWN = 1.0  # seconds
GUNICORN_WORKERS = 4
UVICORN_WORKERS = 2
_PER_BUFFER = (sys.executable, "-m", "per_buffer")  # the per-buffer command
LOADGEN_ENV = "PER_BENCH_LOADGEN"  # "python" forces the Python load generator

SERVERS = ("gunicorn", "uvicorn")
CASES = ("worst", "zipf")
MODES = ("process", "thread", "external")

PARAMS: dict[str, dict[str, Any]] = {
    # seconds: per run (wrk takes whole seconds); pairs: (/p, /r) pairs per configuration
    # (target_pairs: for the worst case in the default mode, which the targets judge);
    # settle: most seconds to wait for the directory to drain before a run; shutdown: test
    # SIGTERM under load; cap: seconds after which the remaining configurations are skipped
    "smoke": {"servers": ("gunicorn",), "cases": ("worst",), "modes": ("process",),
              "seconds": 1, "pairs": 1, "target_pairs": 1, "warmup": 1, "settle": 10.0,
              "shutdown": False,
              "cap": 30.0},
    "quick": {"servers": SERVERS, "cases": CASES, "modes": MODES,
              "seconds": 1, "pairs": 2, "target_pairs": 3, "warmup": 1, "settle": 15.0,
              "shutdown": True,
              "cap": 200.0},
    "full": {"servers": SERVERS, "cases": CASES, "modes": MODES,
             "seconds": 3, "pairs": 5, "target_pairs": 5, "warmup": 2, "settle": 60.0,
             "shutdown": True,
             "cap": 1000.0},
}  # fmt: skip

_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """One run of the load generator."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_s: float  # the load generator's own CPU

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else math.nan


def loadgen() -> str:
    """``wrk`` when installed (unless ``PER_BENCH_LOADGEN=python``), else ``python``."""
    if os.environ.get(LOADGEN_ENV) == "python" or shutil.which("wrk") is None:
        return "python"
    return "wrk"


def _wait_rusage(proc: subprocess.Popen[str]) -> float:
    """Wait for ``proc`` and return its CPU seconds (user + system)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return float(usage.ru_utime + usage.ru_stime)


class LoadRun:
    """A load generator process on one URL (started by :meth:`start`, read by :meth:`finish`)."""

    def __init__(self, url: str, seconds: int, tmp: Path) -> None:
        self.url = url
        self.seconds = seconds
        self.kind = loadgen()
        self._tmp = tmp
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> LoadRun:
        """Start the generator process."""
        if self.kind == "wrk":
            script = self._tmp / "report.lua"
            if not script.exists():
                script.write_text(_WRK_SCRIPT)
            command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{self.seconds}s", "--timeout", "5s"]
            command += ["-s", str(script), self.url]
        else:
            command = [sys.executable, "-m", "benchmarks.app", "load", self.url]
            command += [str(self.seconds), str(CONNECTIONS)]
        self._proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        return self

    def interrupt(self) -> None:
        """Stop the generator early (it still reports what it measured)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)

    def finish(self) -> Load:
        """Wait for the generator and parse its report."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        output = proc.stdout.read()
        proc.stdout.close()
        cpu = _wait_rusage(proc)
        for line in output.splitlines():
            if line.startswith("WRKJSON "):
                data = json.loads(line[8:])
                errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
                return Load(
                    requests=int(data["requests"]),
                    errors=int(errors),
                    seconds=data["duration_us"] / 1e6,
                    p50_ms=data["p50_us"] / 1000.0,
                    p99_ms=data["p99_us"] / 1000.0,
                    cpu_s=cpu,
                )
        raise RuntimeError(f"{self.kind} printed no report: {output[-2000:]!r}")


def run_load(url: str, seconds: int, tmp: Path) -> Load:
    """Drive ``url`` for ``seconds`` with the load generator."""
    return LoadRun(url, seconds, tmp).start().finish()


# --------------------------------------------------------------------------- Python generator


def python_load(url: str, seconds: float, connections: int) -> dict[str, Any]:
    """A closed-loop HTTP/1.1 load generator: ``connections`` sockets, one request in flight
    on each, reconnecting when the server closes (gunicorn's sync workers do after every
    response). Returns the same figures as the wrk script."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port_text = host_port.partition(":")
    port = int(port_text or 80)
    request = f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    latencies: list[int] = []
    errors = 0
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)

    def open_one() -> None:
        nonlocal errors
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError:
            errors += 1
            time.sleep(0.01)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.send(request)
        selector.register(sock, selectors.EVENT_READ, [b"", time.perf_counter_ns()])

    started = time.perf_counter()
    deadline = started + seconds
    for _ in range(connections):
        open_one()
    while not stopping and time.perf_counter() < deadline:
        if not selector.get_map():
            open_one()
            continue
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            state = key.data
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                state[0] += data
                head_end = state[0].find(b"\r\n\r\n")
                if head_end < 0:
                    continue
                head = state[0][:head_end].lower()
                marker = head.find(b"content-length:")
                length = 0
                if marker >= 0:
                    line_end = head.find(b"\r\n", marker)
                    length = int(head[marker + 15 : line_end if line_end >= 0 else len(head)])
                if len(state[0]) < head_end + 4 + length:
                    continue
                now = time.perf_counter_ns()
                if head.startswith(b"http/1.1 2"):
                    latencies.append(now - state[1])
                else:
                    errors += 1
                if b"connection: close" not in head:
                    state[0] = b""
                    state[1] = now
                    sock.send(request)
                    continue
            elif not state[0]:
                errors += 1  # closed before answering
            selector.unregister(sock)
            sock.close()
            if time.perf_counter() < deadline and not stopping:
                open_one()
    elapsed = time.perf_counter() - started
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": elapsed * 1e6,
        "connect": 0,
        "read": 0,
        "write": 0,
        "status": errors,
        "timeout": 0,
        "p50_us": percentile(latencies, 50) / 1000.0,
        "p99_us": percentile(latencies, 99) / 1000.0,
    }


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM it when this process dies (Linux), so a scenario
    killed by the runner's timeout leaves no server or load generator behind."""
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _psutil() -> Any:
    import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415

    return psutil


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process; 0 when it is gone."""
    psutil = _psutil()

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0
    return float(times.user + times.system)


def drainer_pids(directory: Path) -> list[int]:
    """Processes running ``python -m per_buffer.drainer`` in ``directory`` (its cwd)."""
    psutil = _psutil()

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "per_buffer.drainer" not in cmdline:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if Path(proc.cwd()) == directory:
                found.append(proc.pid)
    return found


def _nice(pid: int) -> int | None:
    psutil = _psutil()

    try:
        return int(psutil.Process(pid).nice())
    except psutil.Error:
        return None


class AppServer:
    """gunicorn or uvicorn serving one of the benchmark apps on a loopback port."""

    def __init__(self, kind: str, env: dict[str, str], tmp: Path) -> None:
        self.kind = kind
        self.env = env
        self.port = closed_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workers = GUNICORN_WORKERS if kind == "gunicorn" else UVICORN_WORKERS
        self._tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line, as a user would type it (with ``python -m``)."""
        if self.kind == "gunicorn":
            conf = self._tmp / "gunicorn.conf.py"
            conf.write_text(
                "from per_buffer.integrations.gunicorn import hooks\n\n"
                f'bind = "127.0.0.1:{self.port}"\n'
                f"workers = {GUNICORN_WORKERS}\n"
                'worker_class = "sync"\n'
                "graceful_timeout = 10\n"
                'loglevel = "warning"\n'
                "worker_exit, on_exit = hooks()\n"
            )
            return [sys.executable, "-m", "gunicorn", "-c", str(conf), "benchmarks.app_wsgi:app"]
        return [
            sys.executable, "-m", "uvicorn", "benchmarks.app_asgi:app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(UVICORN_WORKERS), "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until every worker runs and ``/p`` answers."""
        psutil = _psutil()

        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start ({self.proc.returncode})")
            with contextlib.suppress(psutil.Error):
                if len(self.app_pids()) >= self.workers and self.get("/p") == b"ok":
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not start within {timeout:.0f} s")

    def get(self, path: str) -> bytes:
        """One GET on the server (no proxy)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.base + path, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            return b""

    def warm_up(self, endpoint: str = "r", requests: int = 200) -> None:
        """Sequential requests, enough for every worker to build its recorder (and, in
        the process mode, for one to start the drainer) before anything is timed."""
        for _ in range(requests):
            self.get(f"/{endpoint}")

    def app_pids(self, exclude: set[int] | None = None) -> list[int]:
        """The server's processes (master and workers; drainers excluded)."""
        psutil = _psutil()

        if self.proc is None or self.proc.poll() is not None:
            return []
        root = psutil.Process(self.proc.pid)
        pids = [root.pid] + [child.pid for child in root.children(recursive=True)]
        skip = exclude or set()
        return [pid for pid in pids if pid not in skip]

    def worker_stats(self, tries: int = 30) -> dict[int, dict[str, Any]]:
        """``/s`` of as many workers as answer within ``tries`` requests."""
        found: dict[int, dict[str, Any]] = {}
        for _ in range(tries):
            body = self.get("/s")
            if body:
                data = json.loads(body)
                found[int(data["pid"])] = data
            if len(found) >= self.workers:
                break
        return found

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM the server; seconds until it exited (NaN if it had to be killed)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return 0.0
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return math.nan
        return time.perf_counter() - started


# --------------------------------------------------------------------------- one configuration


@dataclass
class Run:
    """One load run and what it cost."""

    endpoint: str  # "r" or "p"
    load: Load
    cpu: dict[str, float]  # role -> CPU seconds during the load
    recorded: int = 0  # record() calls during the run
    delivered: int = 0  # entries acknowledged during the load (coalesced included)
    on_disk: int = 0  # pending + in flight at the end of the load
    lag: float | None = None  # oldest pending age at the end of the load
    catch_up: float = math.nan  # seconds from the end of the load to an empty directory
    drain_cpu: float = 0.0  # drainer CPU from the start of the load to the empty directory
    drained: int = 0  # entries acknowledged from the start of the load to the empty directory
    wall: tuple[float, float] = (0.0, 0.0)  # unix times the load started and ended
    # the call timed in the app: record() on /r, a no-op in its place on /p (the control)
    call_mean_us: float = math.nan  # mean time in it
    call_max_us: float = math.nan  # the longest call
    call_slow: int = 0  # calls of 1 ms or more
    window: float = math.nan  # seconds between the CPU snapshots around the load


@dataclass
class Config:
    """Everything measured for one server x case x mode."""

    server: str
    case: str
    mode: str
    runs: list[Run] = field(default_factory=list)
    recorded_keys: int = 0
    per_unique: int = 0
    per_requests: int = 0
    on_disk: int = 0
    dead: int = 0
    lost: int = 0
    drainer_nice: int | None = None
    worker_stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    load_avg: tuple[float, float] = (math.nan, math.nan)
    note: str = ""

    def side(self, endpoint: str) -> list[Run]:
        """The runs on one endpoint."""
        return [run for run in self.runs if run.endpoint == endpoint]

    def pairs(self) -> list[tuple[Run, Run]]:
        """``(plain, record)`` runs in adjacent pairs."""
        plain, record = self.side("p"), self.side("r")
        return list(zip(plain, record, strict=False))


def _pending(directory: Path) -> tuple[int, int, float | None]:
    """``(pending + in flight, delivered, oldest pending age)`` of the directory."""
    stats = inspect(directory)
    if stats is None:
        return 0, 0, None
    return stats.pending + stats.in_flight, stats.delivered, stats.oldest_pending_age


def _settle(directory: Path, limit: float) -> tuple[bool, float]:
    """Wait until the directory holds nothing undelivered; (drained, seconds waited)."""
    started = time.perf_counter()
    time.sleep(0.25)  # the committers' last batches (commit_interval is 100 ms)
    while True:
        left, _, _ = _pending(directory)
        if left == 0:
            return True, time.perf_counter() - started
        if time.perf_counter() - started >= limit:
            return False, time.perf_counter() - started
        time.sleep(0.05)


class Probe:
    """CPU seconds per role: app processes, drainer, Per, from ``/proc``."""

    def __init__(self, server: AppServer, per_pid: int, directory: Path, external: int | None):
        self.server = server
        self.per_pid = per_pid
        self.directory = directory
        self.external = external

    def drainers(self) -> list[int]:
        """The directory's drainer processes (started by a worker, or the external one)."""
        pids = drainer_pids(self.directory)
        if self.external is not None:
            pids.append(self.external)
        return pids

    def snapshot(self) -> dict[str, float]:
        """Cumulative CPU seconds per role now (``machine``: every process, others' too)."""
        drainers = self.drainers()
        return {
            "app": sum(_cpu(pid) for pid in self.server.app_pids(set(drainers))),
            "drainer": sum(_cpu(pid) for pid in drainers),
            "per": _cpu(self.per_pid),
            "machine": machine_busy(),
        }


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``; NaN elsewhere)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def _one_run(
    endpoint: str, server: AppServer, probe: Probe, directory: Path, p: dict[str, Any], tmp: Path
) -> Run:
    counters = Path(server.env[COUNTERS_ENV])
    reset_max(counters)
    counts_before = read_counters(counters, POOL)
    _, delivered_before, _ = _pending(directory)
    before = probe.snapshot()
    wall_start, clock = time.time(), time.perf_counter()
    load = run_load(f"{server.base}/{endpoint}", p["seconds"], tmp)
    during = probe.snapshot()
    window = time.perf_counter() - clock
    left, delivered, lag = _pending(directory)
    run = Run(endpoint, load, _delta(during, before), on_disk=left, lag=lag)
    run.wall = (wall_start, time.time())
    run.window = window
    run.cpu["loadgen"] = load.cpu_s
    counts = read_counters(counters, POOL)
    run.recorded = counts.records - counts_before.records
    if endpoint == "r":
        calls, spent = run.recorded, counts.record_ns - counts_before.record_ns
        run.call_max_us = counts.record_max_ns / 1e3
        run.call_slow = counts.record_slow - counts_before.record_slow
    else:
        calls, spent = counts.plain - counts_before.plain, counts.skip_ns - counts_before.skip_ns
        run.call_max_us = counts.skip_max_ns / 1e3
        run.call_slow = counts.skip_slow - counts_before.skip_slow
    if calls:
        run.call_mean_us = spent / calls / 1e3
    run.delivered = delivered - delivered_before
    drained, waited = _settle(directory, p["settle"])
    run.catch_up = waited if drained else math.nan
    run.drain_cpu = probe.snapshot()["drainer"] - before["drainer"]
    run.drained = _pending(directory)[1] - delivered_before
    return run


def run_config(
    server_kind: str, case: str, mode: str, per: PerServerProcess, p: dict[str, Any], base: Path
) -> Config:
    """Start the server for one case and mode, run the alternating loads, account."""
    config = Config(server_kind, case, mode)
    tag = f"{server_kind}-{case}-{mode}"
    tmp = base / tag
    directory, counters = tmp / "queue", tmp / "counters"
    directory.mkdir(parents=True)
    counters.mkdir()
    per.reset()
    env = _env()
    env.update(
        {
            "PER_ACTIVITY_TOKEN": per.activity_token,
            "PER_BASE_URL": per.url,
            "PER_ACTIVITY_TYPE_ID": ACTIVITY_TYPE,
            "PER_BUFFER_DIR": str(directory),
            "PER_BUFFER_DELIVERY": mode,
            CASE_ENV: case,
            PREFIX_ENV: f"{tag}-{os.getpid()}",
            COUNTERS_ENV: str(counters),
            POOL_ENV: str(POOL),
            ZIPF_ENV: repr(ZIPF_S),
        }
    )
    for name in ("PER_BUFFER_COALESCE_WINDOW", "PER_BUFFER_DRAINER_NICE"):
        env.pop(name, None)
    if case == "worst":
        env["PER_BUFFER_COALESCE_WINDOW"] = "0"
    load_before = loadavg()
    external: subprocess.Popen[bytes] | None = None
    server = AppServer(server_kind, env, tmp)
    try:
        server.start()
        # warm-up: the recorders, the drainer and the connections start here, not timed
        server.warm_up()
        if mode == "external":
            # started once the queue exists: `drain --follow` refuses a directory without one
            external = subprocess.Popen(
                [*_PER_BUFFER, "drain", "--follow", "--dir", str(directory)],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(tmp / "external.log").open("wb"),
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        probe = Probe(server, per.pid or 0, directory, None if external is None else external.pid)
        run_load(f"{server.base}/p", p["warmup"], tmp)
        if external is not None and external.poll() is not None:
            said = (tmp / "external.log").read_text(errors="replace")
            raise RuntimeError(f"per-buffer drain --follow exited: {said[-2000:]!r}")
        _settle(directory, p["settle"])
        drainers = probe.drainers()
        config.drainer_nice = _nice(drainers[0]) if drainers else None
        pairs = p["target_pairs"] if (case, mode) == ("worst", "process") else p["pairs"]
        for pair in range(pairs):
            order = ("p", "r") if pair % 2 == 0 else ("r", "p")
            for endpoint in order:
                config.runs.append(_one_run(endpoint, server, probe, directory, p, tmp))
        drained, _ = _settle(directory, p["settle"])
        config.worker_stats = server.worker_stats()
        server.terminate()
        if not drained:
            _drain(directory, env)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.terminate()
        if external is not None:
            external.send_signal(signal.SIGTERM)
            try:
                external.wait(10)
            except subprocess.TimeoutExpired:
                external.kill()
                external.wait()
        _reap_drainers(directory)
    _account(config, per, directory, counters)
    config.load_avg = (load_before, loadavg())
    return config


def _drain(directory: Path, env: dict[str, str], timeout: float = 60.0) -> None:
    """``per-buffer drain`` what is left in the directory (after the servers are gone)."""
    subprocess.run(
        [*_PER_BUFFER, "drain", "--dir", str(directory), "--timeout", str(int(timeout))],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=timeout + 30,
        check=False,
    )


def _reap_drainers(directory: Path, wait: float = 5.0) -> None:
    """Let the directory's drainer (started by a worker) exit; stop it if it lingers."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not drainer_pids(directory):
            return
        time.sleep(0.1)
    for pid in drainer_pids(directory):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def _account(config: Config, per: PerServerProcess, directory: Path, counters: Path) -> None:
    counts = read_counters(counters, POOL)
    config.recorded_keys = counts.distinct if config.case == "zipf" else counts.records
    stats = per.stats()
    config.per_unique = int(stats["unique"])
    config.per_requests = int(stats["counters"]["ok"])
    queue = inspect(directory)
    config.on_disk = 0 if queue is None else queue.pending + queue.in_flight
    config.dead = 0 if queue is None else queue.dead_lettered
    config.lost = max(0, config.recorded_keys - config.per_unique - config.on_disk - config.dead)


# --------------------------------------------------------------------------- shutdown


@dataclass
class Shutdown:
    """SIGTERM of an app server under load."""

    server: str
    endpoint: str  # "r": recording; "p": the control without a recorder
    exit_s: float
    load: Load | None
    recorded: int = 0
    per_unique: int = 0
    on_disk: int = 0
    lost: int = 0
    delivered_by_drainer_s: float = math.nan  # from the exit to an empty directory
    exit_code: int | None = None


def run_shutdown(
    server_kind: str, per: PerServerProcess, p: dict[str, Any], base: Path, endpoint: str = "r"
) -> Shutdown:
    """Worst case, default mode: SIGTERM the server 1.5 s into a load on ``/{endpoint}``.

    ``/p`` is the control: the same server under the same load without a recorder.
    """
    tag = f"{server_kind}-shutdown-{endpoint}"
    tmp = base / tag
    directory, counters = tmp / "queue", tmp / "counters"
    directory.mkdir(parents=True)
    counters.mkdir()
    per.reset()
    env = _env()
    env.update(
        {
            "PER_ACTIVITY_TOKEN": per.activity_token,
            "PER_BASE_URL": per.url,
            "PER_ACTIVITY_TYPE_ID": ACTIVITY_TYPE,
            "PER_BUFFER_DIR": str(directory),
            "PER_BUFFER_DELIVERY": "process",
            "PER_BUFFER_COALESCE_WINDOW": "0",
            CASE_ENV: "worst",
            PREFIX_ENV: f"{tag}-{os.getpid()}",
            COUNTERS_ENV: str(counters),
        }
    )
    env.pop("PER_BUFFER_DRAINER_NICE", None)
    server = AppServer(server_kind, env, tmp)
    result = Shutdown(server_kind, endpoint, math.nan, None)
    try:
        server.start()
        server.warm_up(endpoint)
        _settle(directory, p["settle"])
        load = LoadRun(f"{server.base}/{endpoint}", 4, tmp).start()
        time.sleep(1.5)  # pacing: the load has run for 1.5 s
        result.exit_s = server.terminate()
        result.exit_code = None if server.proc is None else server.proc.returncode
        load.interrupt()
        result.load = load.finish()
        drained, waited = _settle(directory, p["settle"])
        result.delivered_by_drainer_s = waited if drained else math.nan
        if not drained:
            _drain(directory, env)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.terminate()
        _reap_drainers(directory)
    result.recorded = read_counters(counters, POOL).records
    result.per_unique = int(per.stats()["unique"])
    queue = inspect(directory)
    result.on_disk = 0 if queue is None else queue.pending + queue.in_flight
    result.lost = max(0, result.recorded - result.per_unique - result.on_disk)
    return result


# --------------------------------------------------------------------------- report


def _ratios(config: Config, attr: str) -> Spread:
    values = []
    for plain, record in config.pairs():
        a, b = getattr(record.load, attr), getattr(plain.load, attr)
        if b and not math.isnan(a) and not math.isnan(b):
            values.append(a / b)
    return spread(values)


def _side(config: Config, endpoint: str, attr: str) -> Spread:
    return spread([getattr(run.load, attr) for run in config.side(endpoint)])


def _cores(config: Config, endpoint: str, role: str) -> Spread:
    return spread([run.cpu.get(role, math.nan) / run.window for run in config.side(endpoint)])


def _with_control(config: Config, attr: str, scale: float) -> str:
    """``median of /r runs (median of /p runs)`` of a timed-call figure."""
    mine = spread([getattr(run, attr) / scale for run in config.side("r")])
    control = spread([getattr(run, attr) / scale for run in config.side("p")])
    return f"{num(mine.median)} ({num(control.median)})"


def _per_request(config: Config, endpoint: str, role: str) -> Spread:
    return spread(
        [
            run.cpu.get(role, math.nan) / run.load.requests * 1e6
            for run in config.side(endpoint)
            if run.load.requests
        ]
    )


def _near_window_edge(start: float, end: float) -> bool:
    """True when [start, end] comes within ``MARGIN`` of a coalescing window boundary."""
    boundary = math.floor(end / WINDOW) * WINDOW  # the last boundary before the end
    return start - MARGIN <= boundary or (boundary + WINDOW) - end <= MARGIN


_OURS = ("app", "drainer", "per", "loadgen")


def _ours(run: Run) -> float:
    return sum(run.cpu.get(role, 0.0) for role in _OURS)


def _cpu_bound_ratio(config: Config) -> Spread:
    """Per pair: (our CPU per request without recording) / (our CPU per request with)."""
    values = []
    for plain, record in config.pairs():
        if plain.load.requests and record.load.requests and _ours(record):
            per_plain = _ours(plain) / plain.load.requests
            per_record = _ours(record) / record.load.requests
            values.append(per_plain / per_record)
    return spread(values)


def _others(config: Config, endpoint: str | None) -> Spread:
    """Cores used by processes other than ours during the runs on ``endpoint`` (None: all)."""
    return spread(
        [
            max(0.0, run.cpu.get("machine", math.nan) - _ours(run)) / run.window
            for run in (config.runs if endpoint is None else config.side(endpoint))
        ]
    )


def _mode_label(config: Config) -> str:
    if config.mode == "process":
        nice = "?" if config.drainer_nice is None else str(config.drainer_nice)
        return f"process (drainer nice {nice})"
    if config.mode == "external":
        return "external (nice 0)"
    return config.mode


def _versions() -> str:
    from importlib import metadata  # noqa: PLC0415

    parts = []
    for dist in ("gunicorn", "uvicorn", "uvloop", "httptools"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def report(
    result: ScenarioResult, configs: list[Config], shutdowns: list[Shutdown], p: dict[str, Any]
) -> None:
    """Tables, targets and figures."""
    generator = loadgen()
    gen_text = (
        f"wrk (1 thread, {CONNECTIONS} connections)"
        if generator == "wrk"
        else f"the Python load generator ({CONNECTIONS} connections; "
        + ("wrk is not installed)" if shutil.which("wrk") is None else f"{LOADGEN_ENV}=python)")
    )
    cost = Table(
        "app: what recording costs the app (with recording / without)",
        ["server", "case", "delivery", "req/s without", "req/s with", "req/s ratio",
         "p50 ms without", "p50 ms with", "p99 ms without", "p99 ms with", "p99 ratio"],
    )  # fmt: skip
    for c in configs:
        cost.add(
            c.server, c.case, _mode_label(c),
            fmt(_side(c, "p", "rps")), fmt(_side(c, "r", "rps")), fmt(_ratios(c, "rps"), 2),
            fmt(_side(c, "p", "p50_ms")), fmt(_side(c, "r", "p50_ms")),
            fmt(_side(c, "p", "p99_ms")), fmt(_side(c, "r", "p99_ms")),
            fmt(_ratios(c, "p99_ms"), 2),
        )  # fmt: skip
    cost.notes.append(
        f"Load: {gen_text}; runs of {p['seconds']} s, {p['pairs']} pair(s) of runs per row "
        "(/p without recording, /r with, alternating), medians [min-max], ratios per pair. "
        f"Per: the local server in its own process, {PER_LATENCY * 1000:g} ms latency. "
        f"gunicorn: {GUNICORN_WORKERS} sync workers, WSGI; uvicorn: {UVICORN_WORKERS} "
        f"workers, ASGI ({_versions()}). Cases: worst = a new user per request, "
        f"coalesce_window=0; zipf = default window (900 s), users from a Zipf pool "
        f"({POOL:,} users, s={ZIPF_S:g}). Before each run the directory was drained. The "
        "load is a closed loop (a fixed number of connections): lower throughput raises "
        "every latency (Little's law), so the p99 ratio follows 1 / the req/s ratio, plus "
        "the stalls."
    )
    cost.notes.append(
        "Load average (1 min) at the start/end of each row: "
        + "; ".join(
            f"{c.server}/{c.case}/{c.mode} {c.load_avg[0]:.2f}/{c.load_avg[1]:.2f}" for c in configs
        )
        + f" ({os.cpu_count()} cores shared with other work on this machine)."
    )
    result.tables.append(cost)

    cpu = Table(
        "app: where the CPU goes (µs of CPU per request served, during the load)",
        ["server", "case", "delivery", "app without", "app with", "app: added",
         "drainer", "Per", "load gen", "req/s ratio if CPU-bound",
         "other work's cores without / with", "drainer µs CPU / delivered",
         "commit lag max ms"],
    )  # fmt: skip
    for c in configs:
        records = c.side("r")
        per_delivered = spread(
            [run.drain_cpu / run.drained * 1e6 if run.drained else math.nan for run in records]
        )
        lag_max = max(
            (float(s.get("commit_lag_max") or 0.0) for s in c.worker_stats.values()), default=0.0
        )
        without, with_ = _per_request(c, "p", "app"), _per_request(c, "r", "app")
        cpu.add(
            c.server, c.case, _mode_label(c),
            fmt(without), fmt(with_), num(with_.median - without.median),
            fmt(_per_request(c, "r", "drainer")) if c.mode != "thread" else "(in app)",
            fmt(_per_request(c, "r", "per")),
            fmt(_per_request(c, "r", "loadgen")),
            fmt(_cpu_bound_ratio(c), 2),
            f"{fmt(_others(c, 'p'), 2)} / {fmt(_others(c, 'r'), 2)}",
            fmt(per_delivered) if c.mode != "thread" else "(in app)",
            num(lag_max * 1000.0),
        )  # fmt: skip
    cpu.notes.append(
        "CPU seconds of each process during a run (from /proc, psutil) per request the load "
        "generator completed, medians over runs. App = the server's master and workers (in "
        "thread mode delivery runs there too); app: added = with - without (record() and "
        "the committer, plus delivery in thread mode). Per is the stand-in server on this "
        "machine: in production its CPU is not the app's. Req/s ratio if CPU-bound: the "
        "CPU per request of all these processes without recording divided by that with "
        "recording (paired runs): the req/s ratio a saturated machine would show, "
        "whatever else runs. Other work's cores: the machine's busy CPU (/proc/stat) "
        f"minus these processes', out of {os.cpu_count()}: other agents or jobs on this "
        "machine, and the kernel's interrupt work; when it is not near 0 the req/s "
        "figures above are unreliable. Drainer µs CPU / delivered: from the start of a run with "
        "recording until the directory was empty again, per entry acknowledged. Commit lag "
        "max: the worst of the workers' stats().commit_lag_max over the whole row."
    )
    result.tables.append(cpu)

    delivery = Table(
        "app: recording and delivery during the runs with recording",
        ["server", "case", "delivery", "recorded /run", "record() mean µs (no-op)",
         "record() max ms (no-op)", "record() calls >= 1 ms (no-op)", "delivered during load",
         "on disk at end", "oldest pending s", "catch-up s", "Per requests / keys",
         "keys recorded", "lost"],
    )  # fmt: skip
    for c in configs:
        records = c.side("r")
        delivery.add(
            c.server, c.case, _mode_label(c),
            fmt(spread([run.recorded for run in records])),
            _with_control(c, "call_mean_us", 1.0),
            _with_control(c, "call_max_us", 1000.0),
            _with_control(c, "call_slow", 1.0),
            fmt(spread([run.delivered for run in records])),
            fmt(spread([run.on_disk for run in records])),
            fmt(spread([run.lag if run.lag is not None else 0.0 for run in records])),
            fmt(spread([run.catch_up for run in records])),
            f"{c.per_requests / c.recorded_keys:.2f}" if c.recorded_keys else "-",
            f"{c.recorded_keys:,}",
            f"**{c.lost}**" if c.lost else "0",
        )  # fmt: skip
    delivery.notes.append(
        "Per run with recording: record() calls, their duration as the app saw it (timed "
        "around each call in the workers: mean, longest, calls of 1 ms or more per run; in "
        "brackets the same for a no-op called in its place on /p, timed the same way: what "
        "preemption and the server alone cost), entries acknowledged while the load ran "
        "(coalesced ones included), entries pending or in flight when it stopped and the age "
        "of the oldest (the delivery lag), seconds until the directory was empty (catch-up; "
        "a dash: not within the settle limit). Per requests / keys: activities.add requests "
        "Per answered per distinct key recorded (1.00 is ideal). Keys recorded: distinct "
        "(billing, user) pairs over the row. Lost = keys recorded - keys Per counted - "
        "entries left on disk - dead letters, after a final drain; it must be 0."
    )
    edge = [
        run
        for c in configs
        if c.case == "zipf"
        for run in c.side("r")
        if _near_window_edge(*run.wall)
    ]
    if edge:
        delivery.notes.append(
            f"{len(edge)} Zipf run(s) with recording overlapped the {MARGIN:g} s zone at "
            f"either end of a {WINDOW:g} s coalescing window (UTC-aligned), where a repeat is "
            "suppressed only by an unsent copy (clock-skew safety, by design): more requests "
            "per key there."
        )
    result.tables.append(delivery)

    if shutdowns:
        table = Table(
            "app: SIGTERM of the app server under load (process mode, worst case)",
            ["server", "endpoint", "exit after SIGTERM s", "exit status", "requests served",
             "recorded", "Per counted", "on disk", "directory empty after s", "lost"],
        )  # fmt: skip
        for s in shutdowns:
            table.add(
                s.server,
                "/r (records)" if s.endpoint == "r" else "/p (control: no recorder)",
                f"{s.exit_s:.3f}" if not math.isnan(s.exit_s) else "killed",
                str(s.exit_code),
                "-" if s.load is None else f"{s.load.requests:,}",
                f"{s.recorded:,}",
                f"{s.per_unique:,}",
                f"{s.on_disk:,}",
                num(s.delivered_by_drainer_s),
                f"**{s.lost}**" if s.lost else "0",
            )
        table.notes.append(
            "The load runs on one endpoint; SIGTERM goes to the server's main process 1.5 s "
            "in, and the time until that process exits is measured (gunicorn: its workers "
            "run the per_buffer hooks; uvicorn: the lifespan middleware closes the recorder). "
            "The /p row is the same server and load without any recorder: the server's own "
            "shutdown time. The drainer outlives the server and delivers the rest (directory "
            f"empty after: from the exit; a dash: not within {p['settle']:g} s, then "
            "`per-buffer drain` finished it); lost = recorded - Per counted - on disk."
        )
        result.tables.append(table)

    worst_default = {c.server: c for c in configs if c.case == "worst" and c.mode == "process"}
    for server_kind, c in worst_default.items():
        rps, p99 = _ratios(c, "rps"), _ratios(c, "p99_ms")
        others = _others(c, None)
        context = (
            f" (CPU-bound estimate {fmt(_cpu_bound_ratio(c), 2)}; other work "
            f"{num(others.median, 2)} cores)"
        )
        result.targets.append(
            Target(
                f"app {server_kind}: worst case, default mode, req/s with / without recording",
                f">= {TARGET_RPS_RATIO:g}",
                fmt(rps, 2) + context,
                None if rps.runs == 0 else rps.median >= TARGET_RPS_RATIO,
            )
        )
        result.targets.append(
            Target(
                f"app {server_kind}: worst case, default mode, p99 with / without recording",
                f"<= {TARGET_P99_RATIO:g}",
                fmt(p99, 2),
                None if p99.runs == 0 else p99.median <= TARGET_P99_RATIO,
            )
        )
    for s in shutdowns:
        if s.endpoint != "r":
            continue
        result.targets.append(
            Target(
                f"app {s.server}: shutdown under load, nothing lost",
                f"<= {TARGET_SHUTDOWN:g} s, 0 lost",
                f"{s.exit_s:.3f} s, {s.lost} lost",
                (not math.isnan(s.exit_s)) and s.exit_s <= TARGET_SHUTDOWN and s.lost == 0,
            )
        )
    result.lost = sum(c.lost for c in configs) + sum(s.lost for s in shutdowns)
    result.checks["lost_by_config"] = {f"{c.server}/{c.case}/{c.mode}": c.lost for c in configs}
    result.figures.update(
        {
            "loadgen": generator,
            "configs": [_config_figures(c) for c in configs],
            "shutdown": [_shutdown_figures(s) for s in shutdowns],
        }
    )


def _config_figures(c: Config) -> dict[str, Any]:
    return {
        "server": c.server,
        "case": c.case,
        "mode": c.mode,
        "rps_ratio": _ratios(c, "rps").as_dict(),
        "cpu_bound_ratio": _cpu_bound_ratio(c).as_dict(),
        "p99_ratio": _ratios(c, "p99_ms").as_dict(),
        "runs": [
            {
                "endpoint": run.endpoint,
                "rps": run.load.rps,
                "p50_ms": run.load.p50_ms,
                "p99_ms": run.load.p99_ms,
                "errors": run.load.errors,
                "cpu_s": run.cpu,
                "seconds": run.load.seconds,
                "recorded": run.recorded,
                "call_mean_us": run.call_mean_us,
                "call_max_us": run.call_max_us,
                "call_slow": run.call_slow,
                "delivered": run.delivered,
                "on_disk": run.on_disk,
                "oldest_pending_age": run.lag,
                "catch_up_s": run.catch_up,
                "drainer_cpu_s": run.drain_cpu,
                "drained": run.drained,
            }
            for run in c.runs
        ],
        "recorded_keys": c.recorded_keys,
        "per_unique": c.per_unique,
        "per_requests": c.per_requests,
        "on_disk": c.on_disk,
        "dead": c.dead,
        "lost": c.lost,
        "drainer_nice": c.drainer_nice,
        "worker_stats": list(c.worker_stats.values()),
        "load_average": list(c.load_avg),
    }


def _shutdown_figures(s: Shutdown) -> dict[str, Any]:
    return {
        "server": s.server,
        "exit_s": s.exit_s,
        "exit_code": s.exit_code,
        "endpoint": s.endpoint,
        "requests": None if s.load is None else s.load.requests,
        "recorded": s.recorded,
        "per_unique": s.per_unique,
        "on_disk": s.on_disk,
        "lost": s.lost,
        "drainer_done_s": s.delivered_by_drainer_s,
    }


def _available(server_kind: str) -> bool:
    from importlib.util import find_spec  # noqa: PLC0415

    return find_spec(server_kind) is not None


@contextlib.contextmanager
def _per() -> Iterator[PerServerProcess]:
    with PerServerProcess(latency=PER_LATENCY, keep_activities=False) as server:
        yield server


def run(mode: str) -> ScenarioResult:
    """Measure every server x case x delivery mode of ``mode``'s parameters."""
    p = PARAMS[mode]
    result = ScenarioResult("app", mode)
    missing = [s for s in p["servers"] if not _available(s)]
    if not _available("psutil"):
        missing.append("psutil")
    servers = [s for s in p["servers"] if s not in missing]
    configs: list[Config] = []
    shutdowns: list[Shutdown] = []
    skipped: list[str] = []
    started = time.monotonic()

    def in_time(what: str) -> bool:
        if time.monotonic() - started <= p["cap"]:
            return True
        skipped.append(what)
        return False

    with scratch_dir("app") as base, _per() as per:
        for server_kind in servers:
            for case in p["cases"]:
                for delivery in p["modes"]:
                    if in_time(f"{server_kind}/{case}/{delivery}"):
                        log(f"app: {server_kind}, {case}, {delivery} (load {loadavg():.2f})")
                        configs.append(run_config(server_kind, case, delivery, per, p, base))
            if p["shutdown"]:
                for endpoint in ("r", "p"):
                    if in_time(f"{server_kind} shutdown /{endpoint}"):
                        log(f"app: {server_kind}, SIGTERM under load on /{endpoint}")
                        shutdowns.append(run_shutdown(server_kind, per, p, base, endpoint))
    report(result, configs, shutdowns, p)
    if skipped:
        result.tables[0].notes.append(
            f"Skipped, the scenario's {p['cap']:.0f} s were used up (a loaded machine): "
            + ", ".join(skipped)
            + "."
        )
    if missing:
        result.tables[0].notes.append(
            f"Not measured: {', '.join(missing)} not installed (pip install -e '.[bench]')."
        )
    if mode == "smoke":
        result.tables[0].notes.append(
            "Smoke mode: gunicorn, worst case, process mode, one pair of 1 s runs, no "
            "shutdown test (python -m benchmarks --quick --only app measures everything)."
        )
    return result


def _main(argv: list[str]) -> int:
    """``python -m benchmarks.app load URL SECONDS CONNECTIONS``: the Python load generator."""
    if len(argv) == 4 and argv[0] == "load":
        data = python_load(argv[1], float(argv[2]), int(argv[3]))
        print("WRKJSON " + json.dumps(data), flush=True)
        return 0
    print("usage: python -m benchmarks.app load URL SECONDS CONNECTIONS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
