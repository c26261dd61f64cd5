"""Delivery outside the serving processes: the drainer, with real processes (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from per_buffer import Recorder
from per_buffer.delivery import DeliverySettings
from per_buffer.drainer import DRAINER_LOCK, DrainerOptions, drainer_running
from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer

pytestmark = pytest.mark.usefixtures("counters_add_up")

FAST = {"backoff_initial": 0.02, "backoff_max": 0.2, "poll_interval": 0.05}


def drainers() -> list[int]:
    """Pids of the live drainer processes on this machine."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().split()[2]
        except OSError:
            continue
        if b"per_buffer.drainer" in cmdline and state != "Z":
            found.append(int(name))
    return found


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(autouse=True)
def no_drainer_left(tmp_path: Path) -> Iterator[None]:
    """Every drainer a test started is gone when it ends (they exit when idle)."""
    yield
    for path in tmp_path.rglob(DRAINER_LOCK):
        assert eventually(lambda p=path.parent: not drainer_running(p), timeout=10), (
            f"a drainer still runs for {path.parent}"
        )


def make(server: PerServer, directory: Path, **options: Any) -> Recorder:
    return Recorder(
        server.activity_token,
        "login",
        directory=directory,
        base_url=server.url,
        **{**FAST, "coalesce_window": 0, **options},
    )


def test_the_default_is_a_drainer_process_spawned_with_no_token_in_sight(
    server: PerServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TOKEN", server.activity_token)  # as an app would have it
    rec = make(server, tmp_path / "q")
    assert rec.config.delivery == "process"
    for i in range(300):
        rec.record("acme", f"u{i}")
    assert rec.flush(timeout=20)
    stats = rec.stats()
    assert stats.delivery == "process" and stats.delivered == 300
    assert server.unique_count() == 300
    assert not any(t.name == "per-buffer-delivery" for t in __import__("threading").enumerate())
    (pid,) = [p for p in drainers() if Path(f"/proc/{p}/cwd").resolve() == tmp_path / "q"]
    token = server.activity_token.encode()
    assert token not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert token not in Path(f"/proc/{pid}/environ").read_bytes()
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [
        b"-m",
        b"per_buffer.drainer",
    ]
    started = time.monotonic()
    rec.close()
    assert time.monotonic() - started < 0.5  # the drainer delivers; close only writes
    for path in (tmp_path / "q").rglob("*"):
        if path.is_file():
            assert token not in path.read_bytes(), path


def test_one_drainer_per_directory_however_many_recorders(
    server: PerServer, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from per_buffer import Recorder
        rec = Recorder({server.activity_token!r}, "login", directory={str(tmp_path / "q")!r},
                       base_url={server.url!r}, coalesce_window=0, poll_interval=0.05)
        for i in range(200):
            rec.record("acme", f"{{sys.argv[1]}}-{{i}}")
        ok = rec.flush(timeout=20)
        print("flushed", ok, flush=True)
        sys.stdin.read()  # stay attached until told
        """
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"p{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "flushed True"
        mine = [p for p in drainers() if Path(f"/proc/{p}/cwd").resolve() == tmp_path / "q"]
        assert len(mine) == 1
        assert server.unique_count() == 600
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(10)


def test_a_drainer_that_dies_is_replaced_and_nothing_is_lost(
    server: PerServer, tmp_path: Path
) -> None:
    rec = make(server, tmp_path / "q")
    rec.record("acme", "first")
    assert rec.flush(timeout=20)
    (pid,) = [p for p in drainers() if Path(f"/proc/{p}/cwd").resolve() == tmp_path / "q"]
    server.outage()
    for i in range(100):
        rec.record("acme", f"u{i}")
    os.kill(pid, signal.SIGKILL)
    assert eventually(
        lambda: (
            [p for p in drainers() if Path(f"/proc/{p}/cwd").resolve() == tmp_path / "q"]
            not in ([], [pid])
        ),
        timeout=10,
    ), "no new drainer"
    server.recover()
    assert rec.flush(timeout=30)
    assert server.unique_count() == 101
    rec.close()


def test_an_idle_drainer_without_recorders_exits(server: PerServer, tmp_path: Path) -> None:
    rec = make(server, tmp_path / "q")
    rec.record("acme", "u1")
    assert rec.flush(timeout=20)
    assert drainer_running(tmp_path / "q")
    assert eventually(lambda: drainer_running(tmp_path / "q"), timeout=1)  # attached: stays
    rec.close()
    assert eventually(lambda: not drainer_running(tmp_path / "q"), timeout=5)


def test_a_drainer_with_work_but_no_way_to_deliver_gives_up_after_linger(
    server: PerServer, tmp_path: Path
) -> None:
    directory = tmp_path / "q"
    with DurableQueue(directory) as queue:
        queue.put([(("acme", "u1", "login"), time.time())])
    server.outage()
    options = DrainerOptions(
        directory=directory,
        settings=DeliverySettings(
            server.activity_token, server.url, backoff_initial=0.02, backoff_max=0.2
        ),
        linger=1.0,
    )
    child = subprocess.run(
        [sys.executable, "-m", "per_buffer.drainer"],
        input=options.to_json() + "\n",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert child.returncode == 0
    assert child.stdout.startswith("ready")
    log = (directory / "drainer.log").read_text()
    assert "stops with 1 activities left on disk" in log
    assert server.activity_token not in log
    with DurableQueue(directory) as queue:
        assert queue.stats().pending == 1  # still there for the next recorder


def test_host_wide_coalescing_four_processes_send_each_key_once(
    server: PerServer, tmp_path: Path
) -> None:
    if 900 - time.time() % 900 < 20 or time.time() % 900 < 5:
        pytest.skip("too close to a 15-minute boundary")
    code = textwrap.dedent(
        f"""
        from per_buffer import Recorder
        rec = Recorder({server.activity_token!r}, "login", directory={str(tmp_path / "q")!r},
                       base_url={server.url!r}, coalesce_window=900, coalesce_margin=2,
                       poll_interval=0.05)
        for i in range(1000):
            rec.record("acme", f"user-{{i}}")
        print("flushed", rec.flush(timeout=30), flush=True)
        rec.close()
        """
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert out.strip() == "flushed True"
    assert server.unique_count() == 1000
    # a key committed by several processes costs one request once Per acknowledged it
    assert server.counters["requests"] < 1000 * 1.2, server.counters["requests"]


def test_a_serving_process_exits_in_milliseconds_and_loses_nothing(
    server: PerServer, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        f"""
        import atexit, sys, time
        from per_buffer import Recorder
        rec = Recorder({server.activity_token!r}, "login", directory={str(tmp_path / "q")!r},
                       base_url={server.url!r}, coalesce_window=0, commit_interval=30,
                       exit_timeout=10)
        rec.record("acme", "warm")
        rec.flush(timeout=20)
        for i in range(2000):
            rec.record("acme", f"user-{{i}}")  # still in memory: commit_interval is 30 s
        started = []
        atexit.register(lambda: print(f"exit handler took {{time.monotonic() - started[0]:.3f}}"))
        started.append(time.monotonic())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    took = float(done.stdout.split()[-1])
    assert took < 1.0, done.stdout  # writes the batch, leaves delivery to the drainer
    assert server.wait_for_activities(2001, timeout=30)


def test_external_mode_starts_no_drainer_and_the_follow_command_delivers(
    server: PerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = make(server, tmp_path / "q", delivery="external")
    for i in range(50):
        rec.record("acme", f"u{i}")
    assert rec.flush(timeout=1.5) is False
    assert not drainer_running(tmp_path / "q")
    assert "no drainer runs" in caplog.text
    env = {
        **os.environ,
        "PER_ACTIVITY_TOKEN": server.activity_token,
        "PER_BASE_URL": server.url,
        "PER_BUFFER_DIR": str(tmp_path / "q"),
    }
    follower = subprocess.Popen(
        [sys.executable, "-m", "per_buffer", "drain", "--follow"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rec.flush(timeout=20)
        assert server.unique_count() == 50
        assert (
            server.activity_token.encode() not in Path(f"/proc/{follower.pid}/cmdline").read_bytes()
        )
    finally:
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(10) == 0
    rec.close()


def test_options_travel_as_json_and_hold_the_token_only_there() -> None:
    options = DrainerOptions(
        directory=Path("/tmp/x"), settings=DeliverySettings("secret-token-1", "https://x.test")
    )
    text = options.to_json()
    assert json.loads(text)["settings"]["token"] == "secret-token-1"
    back = DrainerOptions.from_json(text)
    assert back.settings.token == "secret-token-1"
    assert "secret-token-1" not in repr(back)


@pytest.mark.shared_directory
def test_a_rotated_token_takes_the_drainer_over(server: PerServer, tmp_path: Path) -> None:
    """A drainer keeps the settings it was started with; a newer recorder with another
    token (or URL) makes it step down, and the next one delivers with the new token."""
    old = Recorder("old-token", "login", directory=tmp_path / "q", base_url=server.url, **FAST)
    server.set_tokens(activity_tokens=["old-token"])
    old.record("acme", "before")
    assert old.flush(timeout=20)
    server.set_tokens(activity_tokens=["new-token"])  # rotated: the old one is refused now
    new = Recorder("new-token", "login", directory=tmp_path / "q", base_url=server.url, **FAST)
    for i in range(20):
        new.record("acme", f"after-{i}")
    assert new.flush(timeout=20)  # the drainer was replaced
    assert {a.user_id for a in server.activities} >= {f"after-{i}" for i in range(20)}
    new.close()
    old.close()


def test_close_right_after_the_first_record_does_not_wait_for_the_drainer(
    server: PerServer, tmp_path: Path
) -> None:
    rec = make(server, tmp_path / "q")
    rec.record("acme", "u1")  # the drainer is being started now
    started = time.monotonic()
    rec.close(timeout=0)
    assert time.monotonic() - started < 0.5 + 0.5  # timeout + 0.5 s
    assert server.wait_for_activities(1, timeout=20)  # the drainer delivers after close
