"""The README cannot drift: every Python sample runs, the configuration table is KNOBS."""

from __future__ import annotations

import re
import signal as signal_module
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import per_buffer
from per_buffer.config import KNOBS
from per_buffer.testing import PerServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def knob_table() -> str:
    lines = [
        "| argument | environment variable | default | unit | meaning |",
        "|---|---|---|---|---|",
    ]
    for knob in KNOBS:
        env = ", ".join(f"`{name}`" for name in knob.env)
        lines.append(f"| `{knob.name}` | {env} | {knob.default} | {knob.unit} | {knob.meaning} |")
    return "\n".join(lines)


def test_configuration_table_matches_knobs() -> None:
    section = README.split("<!-- knobs:start -->\n", 1)[1].split("<!-- knobs:end -->", 1)[0]
    assert section.strip() == knob_table()


def test_setup_commands_and_ci_use_the_same_test_command() -> None:
    assert "per-buffer demo" in README
    assert "python -m pip install -e '.[dev]' && pytest" in README
    ci = (ROOT / ".ci" / "run").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "pip install" in ci and "make check" in ci and "make test\n" in ci
    assert "check: lint types test" in make and "\ntest:" in make and "\n\tpytest\n" in make


def test_there_are_samples() -> None:
    assert len(BLOCKS) >= 6


@pytest.fixture
def per_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    with PerServer() as server:
        monkeypatch.setenv("PER_ACTIVITY_TOKEN", server.activity_token)
        monkeypatch.setenv("PER_REPORTING_TOKEN", server.reporting_token)
        monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "login")
        monkeypatch.setenv("PER_BASE_URL", server.url)
        monkeypatch.setenv("PER_BUFFER_DIR", str(tmp_path / "queue"))
        yield server
        per_buffer.shutdown(timeout=5)


class _Signal:
    """Stands in for a celery signal: records the connected receiver."""

    def __init__(self) -> None:
        self.receivers: list[Any] = []

    def connect(self, fn: Any) -> Any:
        self.receivers.append(fn)
        return fn


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_sample_runs(
    index: int, per_env: PerServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = BLOCKS[index]
    signal = _Signal()
    if "celery" in code:  # celery is not a dependency: a stand-in records the receiver
        celery = types.ModuleType("celery")
        signals = types.ModuleType("celery.signals")
        signals.worker_process_shutdown = signal  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "celery", celery)
        monkeypatch.setitem(sys.modules, "celery.signals", signals)
    namespace: dict[str, Any] = {"__name__": f"readme_sample_{index}"}
    previous = signal_module.getsignal(signal_module.SIGTERM)
    try:
        exec(compile(code, f"README.md sample {index}", "exec"), namespace)
    finally:  # a sample may install a SIGTERM handler: not in the test runner
        installed = signal_module.getsignal(signal_module.SIGTERM)
        signal_module.signal(signal_module.SIGTERM, previous)
    if "on_sigterm" in namespace:
        assert installed is namespace["on_sigterm"]
    for name, value in namespace.items():
        if name.startswith("test_") and callable(value):
            value(tmp_path / name)
    if "worker_exit" in namespace:
        per_buffer.record("acme-corp", "gunicorn-worker")
        namespace["worker_exit"](None, None)
        assert per_env.wait_for_activities(1, timeout=5)
    for receiver in signal.receivers:
        per_buffer.record("acme-corp", "celery-worker")
        receiver()  # on disk now; the drainer (or this flush) delivers it
        assert per_env.wait_for_activities(1, timeout=5)
        assert any(a.user_id == "celery-worker" for a in per_env.activities)
