"""Exit paths with real servers: activities still in memory at shutdown must not be lost.

Each test serves the README's example with the real server in a subprocess, recording with
``commit_interval=30`` so that the activities are still in memory when the server is
stopped, stops it the way an orchestrator does (SIGTERM) and then counts what reached Per
or the queue directory's disk. Controls without the integration show that these exit paths
really skip the exit handler (so the tests can fail).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from integration_helpers import (
    Key,
    Service,
    accounted,
    child_env,
    delivered_soon,
    python,
    readme_example,
    require,
    require_binary,
    wait_until,
)

from per_buffer.testing import PerServer

IN_MEMORY = {"PER_BUFFER_COMMIT_INTERVAL": "30"}  # the committer waits 15 s before a batch
N = 12  # requests per web server
TASKS = 6  # Celery tasks (a recycled child costs a fork and a start-up each)


def uds_client(sock: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://app", timeout=10
    )


def wait_serving(client: httpx.Client, service: Service, timeout: float = 30.0) -> None:
    def answers() -> bool:
        assert service.alive(), service.output()
        try:
            client.get("/")
        except httpx.TransportError:
            return False
        return True

    wait_until(answers, timeout, f"{service.argv[:4]} to serve:\n{service.output()}")


def export_requests(client: httpx.Client, path: str, method: str = "POST") -> set[Key]:
    """N requests, each recording twice: through ``who`` and in the view."""
    expected: set[Key] = set()
    for n in range(N):
        user = f"u{n}"
        response = client.request(
            method,
            path,
            params={"account": "acme-corp", "user": user},
            headers={"X-Account": "acme-corp", "X-User": user},
        )
        assert response.status_code == 200, response.text
        expected |= {("acme-corp", user, "export"), ("acme-corp", user, "api-call")}
    return expected


# ---------------------------------------------------------------------------------- uvicorn


def serve_fastapi(
    server: PerServer,
    tmp_path: Path,
    short_dir: Path,
    services: Callable[..., Service],
    target: str,
) -> tuple[Service, httpx.Client]:
    require("fastapi")
    require("uvicorn")
    site = tmp_path / "site"
    site.mkdir()
    (site / "app.py").write_text(readme_example("integrations", "# app.py: uvicorn"))
    sock = short_dir / "uvicorn.sock"
    env = child_env(server, tmp_path / "queue", **IN_MEMORY)
    argv = python("-m", "uvicorn", target, "--uds", str(sock), "--lifespan", "on")
    service = services([*argv, "--log-level", "warning"], env=env, cwd=site)
    client = uds_client(sock)
    wait_serving(client, service)
    return service, client


def test_uvicorn_sigterm_with_the_middleware_loses_nothing(
    server: PerServer, tmp_path: Path, short_dir: Path, services: Callable[..., Service]
) -> None:
    service, client = serve_fastapi(server, tmp_path, short_dir, services, "app:app")
    with closing(client):
        expected = export_requests(client, "/exports")
    assert server.activities == []  # all still in the app's memory
    status = service.stop(signal.SIGTERM)
    assert status == -signal.SIGTERM, service.output()  # re-raised: no exit handler ran
    assert accounted(server, tmp_path / "queue") == expected
    # on disk at shutdown, delivered by the flush or the drainer right after
    assert delivered_soon(server, expected) == expected


def test_control_uvicorn_sigterm_without_it_loses_the_memory_batch(
    server: PerServer, tmp_path: Path, short_dir: Path, services: Callable[..., Service]
) -> None:
    service, client = serve_fastapi(server, tmp_path, short_dir, services, "app:api")
    with closing(client):
        export_requests(client, "/exports")  # each view recorded one activity
    assert service.stop(signal.SIGTERM) == -signal.SIGTERM
    assert accounted(server, tmp_path / "queue") == set()  # all 12 lost with the process


# ---------------------------------------------------------------------------------- gunicorn


def test_gunicorn_sigterm_with_the_hooks_flushes_within_graceful_timeout(
    server: PerServer, tmp_path: Path, short_dir: Path, services: Callable[..., Service]
) -> None:
    require("flask")
    require("gunicorn")
    site = tmp_path / "site"
    site.mkdir()
    (site / "app.py").write_text(readme_example("integrations", "# app.py: gunicorn"))
    (site / "gunicorn.conf.py").write_text(readme_example("integrations", "# gunicorn.conf.py"))
    sock = short_dir / "gunicorn.sock"
    # exit_timeout 0: the exit handler alone would leave everything on disk undelivered,
    # so deliveries prove the hook flushed (for up to graceful_timeout - 2 s)
    env = child_env(server, tmp_path / "queue", PER_BUFFER_EXIT_TIMEOUT="0", **IN_MEMORY)
    argv = python("-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"unix:{sock}", "app:app")
    service = services(argv, env=env, cwd=site)
    with uds_client(sock) as client:
        wait_serving(client, service)
        expected = export_requests(client, "/exports")
    assert server.activities == []
    assert service.stop(signal.SIGTERM) == 0, service.output()
    assert delivered_soon(server, expected) == expected, service.output()


# ---------------------------------------------------------------------------------- Celery


@pytest.fixture
def redis_url(short_dir: Path, services: Callable[..., Service], tmp_path: Path) -> str:
    """A real redis-server on a Unix socket (no TCP port to race for)."""
    binary = require_binary("redis-server")
    redis = require("redis")
    sock = short_dir / "redis.sock"
    argv = [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    service = services(argv, env={}, cwd=tmp_path)

    def pong() -> bool:
        assert service.alive(), service.output()
        try:
            return bool(redis.Redis(unix_socket_path=str(sock)).ping())
        except redis.exceptions.ConnectionError:
            return False

    wait_until(pong, 20, "redis-server")
    return f"redis+socket://{sock}"


def run_celery(
    server: PerServer,
    tmp_path: Path,
    services: Callable[..., Service],
    redis_url: str,
    *options: str,
    connect: bool = True,
) -> tuple[set[Key], set[int]]:
    """Serve the README's tasks.py with a prefork worker, run TASKS tasks, warm-shut it down."""
    celery = require("celery")
    site = tmp_path / "site"
    site.mkdir()
    tasks = readme_example("integrations", "# tasks.py")
    if not connect:
        tasks = tasks.replace("\nconnect()", "\n")
    tasks += (
        "\n\n@app.task\ndef export_pid(account: str, user: str) -> int:  # for the test\n"
        "    import os\n\n    export(account, user)\n    return os.getpid()\n"
    )
    (site / "tasks.py").write_text(tasks)
    env = child_env(
        server,
        tmp_path / "queue",
        CELERY_BROKER_URL=redis_url,
        CELERY_RESULT_BACKEND=redis_url,
        **IN_MEMORY,
    )
    argv = python("-m", "celery", "-A", "tasks", "worker", "--pool=prefork", "--concurrency=2")
    argv += ["--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    service = services([*argv, *options], env=env, cwd=site)
    client = celery.Celery("client", broker=redis_url, backend=redis_url)
    try:
        results = [
            client.send_task("tasks.export_pid", args=["acme-corp", f"u{n}"]) for n in range(TASKS)
        ]
        pids = {result.get(timeout=60) for result in results}
    finally:
        client.close()
    assert service.stop(signal.SIGTERM) == 0, service.output()  # warm shutdown
    return {("acme-corp", f"u{n}", "export") for n in range(TASKS)}, pids


def test_celery_recycled_children_lose_nothing(
    server: PerServer, tmp_path: Path, services: Callable[..., Service], redis_url: str
) -> None:
    expected, pids = run_celery(server, tmp_path, services, redis_url, "--max-tasks-per-child=1")
    assert len(pids) == TASKS  # each task ran in a fresh child, which then exited
    assert accounted(server, tmp_path / "queue") == expected


def test_celery_warm_shutdown_loses_nothing(
    server: PerServer, tmp_path: Path, services: Callable[..., Service], redis_url: str
) -> None:
    expected, pids = run_celery(server, tmp_path, services, redis_url)
    assert len(pids) <= 2  # the children lived until the warm shutdown
    assert accounted(server, tmp_path / "queue") == expected


def test_control_celery_children_skip_the_exit_handler(
    server: PerServer, tmp_path: Path, services: Callable[..., Service], redis_url: str
) -> None:
    expected, _ = run_celery(server, tmp_path, services, redis_url, connect=False)
    assert accounted(server, tmp_path / "queue") == set()
    assert expected
