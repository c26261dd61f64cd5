"""Shared pieces of the benchmark suite: results, tables, statistics and process helpers."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES: tuple[str, ...] = ("smoke", "quick", "full")
SCENARIOS: tuple[str, ...] = (
    "hot_path",
    "delivery",
    "backlog",
    "outage",
    "degraded",
    "coalescing",
    "startup",
    "app",
)

#: Order in which the runner executes them: the backlog's long drain goes last so that it
#: can use whatever remains of the mode's time budget (see ``remaining_budget``).
RUN_ORDER: tuple[str, ...] = (
    "hot_path",
    "delivery",
    "outage",
    "degraded",
    "coalescing",
    "startup",
    "app",
    "backlog",
)
DEADLINE_ENV = "PER_BENCH_DEADLINE"

ACTIVITY_TYPE = "api_call"
PUT_BATCH = 512


# --------------------------------------------------------------------------- results


@dataclass
class Table:
    """One Markdown table of a scenario (cells already formatted)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append a row; every cell is turned into text."""
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        """The table as GitHub-flavoured Markdown, notes as a bullet list below it."""
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(row) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class Target:
    """A target of the brief with the figure measured in this run."""

    name: str
    target: str
    measured: str
    met: bool | None  # None: could not be evaluated (e.g. a peer is not installed)

    @property
    def verdict(self) -> str:
        """``yes``, ``MISSED`` or ``n/a``."""
        return met_text(self.met)


@dataclass
class ScenarioResult:
    """Everything one scenario reports: tables for people, figures for machines."""

    name: str
    mode: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    lost: int = 0
    checks: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScenarioResult:
        """The inverse of :meth:`to_json`."""
        return cls(
            name=data["name"],
            mode=data["mode"],
            tables=[Table(**t) for t in data.get("tables", [])],
            targets=[Target(**t) for t in data.get("targets", [])],
            figures=data.get("figures", {}),
            lost=int(data.get("lost", 0)),
            checks=data.get("checks", {}),
        )


def met_text(met: bool | None) -> str:
    """The text of a met? cell."""
    if met is None:
        return "n/a"
    return "yes" if met else "MISSED"


# --------------------------------------------------------------------------- statistics


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of an already sorted sequence."""
    if not ordered:
        return math.nan
    rank = math.ceil(q / 100.0 * len(ordered))
    return float(ordered[min(len(ordered) - 1, max(0, rank - 1))])


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99, p99.9 and max of per-call latencies, in microseconds."""
    ordered = sorted(samples_ns)
    return {
        "p50": percentile(ordered, 50) / 1000.0,
        "p99": percentile(ordered, 99) / 1000.0,
        "p999": percentile(ordered, 99.9) / 1000.0,
        "max": (ordered[-1] / 1000.0) if ordered else math.nan,
        "n": float(len(ordered)),
    }


@dataclass(frozen=True)
class Spread:
    """The median of repeated runs and their range."""

    median: float
    low: float
    high: float
    runs: int

    def as_dict(self) -> dict[str, float]:
        """Plain dict for the JSON output."""
        return {"median": self.median, "min": self.low, "max": self.high, "runs": self.runs}


def spread(values: Sequence[float]) -> Spread:
    """Median, min and max of ``values`` (NaN when empty)."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.median(clean), min(clean), max(clean), len(clean))


def num(value: float, digits: int = 3) -> str:
    """A number with about ``digits`` significant digits and thousands separators."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 10 ** (digits - 1) or magnitude == 0:
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
    return f"{value:,.{decimals}f}"


def fmt(sp: Spread, digits: int = 3) -> str:
    """``median [min-max]`` or just the value for a single run."""
    if sp.runs == 0:
        return "-"
    if sp.runs == 1 or sp.low == sp.high:
        return num(sp.median, digits)
    return f"{num(sp.median, digits)} [{num(sp.low, digits)}-{num(sp.high, digits)}]"


# --------------------------------------------------------------------------- machine


def rss_mb() -> float:
    """Resident set size of this process, in MiB (psutil if present, else /proc)."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415

        return float(psutil.Process().memory_info().rss) / 2**20
    except ImportError:
        return _proc_status_kib("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    """The resident set's high-water mark of this process, in MiB (Linux ``VmHWM``)."""
    return _proc_status_kib("VmHWM") / 1024.0


def _proc_status_kib(key: str) -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def loadavg() -> float:
    """The 1-minute load average (NaN where unavailable)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform  # noqa: PLC0415

    return platform.processor() or "unknown"


def closed_port() -> int:
    """A loopback TCP port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory on the real disk (not tmpfs), removed afterwards."""
    base = os.environ.get("PER_BENCH_TMP") or None
    path = Path(tempfile.mkdtemp(prefix=f"per-bench-{prefix}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def log(message: str) -> None:
    """Progress line on stderr (stdout carries the tables)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def remaining_budget() -> float | None:
    """Seconds left in the whole run's time budget (set by the runner), or None."""
    text = os.environ.get(DEADLINE_ENV)
    if not text:
        return None
    return float(text) - time.time()


def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def prefill(
    directory: Path, pairs: Iterable[tuple[str, str]], activity_type: str = ACTIVITY_TYPE
) -> int:
    """Put activities ``(billing, user)`` on disk in ``directory`` in batches; return the count.

    Not timed by callers: it is how a backlog is set up.
    """
    from per_buffer.models import Activity  # noqa: PLC0415
    from per_buffer.queue import DurableQueue  # noqa: PLC0415

    queue = DurableQueue(directory, max_items=50_000_000, max_bytes=2**40)
    stored = 0
    now = time.time()
    batch: list[tuple[Activity, float]] = []
    try:
        for billing, user in pairs:
            batch.append((Activity(billing, user, activity_type), now))
            if len(batch) >= PUT_BATCH:
                stored += queue.put(batch).stored
                batch = []
        if batch:
            stored += queue.put(batch).stored
    finally:
        queue.close()
    return stored


def unique_pairs(count: int, tag: str, billing_ids: int = 97) -> Iterator[tuple[str, str]]:
    """``count`` distinct ``(billing, user)`` pairs whose user IDs start with ``tag``."""
    for i in range(count):
        yield f"org-{i % billing_ids}", f"{tag}-user-{i}"
