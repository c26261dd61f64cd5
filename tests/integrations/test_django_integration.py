"""Django: the app, the middleware and the management commands, in real processes.

The site is the README's examples (settings, the who hook, asgi.py) plus what a project
always has (URLs, a secret key). Its recorder settings come only from ``PER_BUFFER`` (the
environment holds no ``PER_*`` variable), so the commands must pass them to the CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from integration_helpers import (
    Service,
    accounted,
    child_env,
    delivered,
    on_disk,
    python,
    readme_example,
    require,
    wait_until,
)

from per_buffer.queue import DurableQueue
from per_buffer.testing import PerServer

SETTINGS_EXTRA = """
import os

SECRET_KEY = "only-for-this-test"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "myproject.urls"
PER_BUFFER = {
    **PER_BUFFER,
    "directory": os.environ["TEST_QUEUE_DIR"],
    "token": os.environ["TEST_PER_TOKEN"],
    "base_url": os.environ["TEST_PER_URL"],
    "commit_interval": 30.0,  # activities stay in memory until the shutdown flush
}
if os.environ.get("TEST_BAD_SETTING"):
    PER_BUFFER["concurrency"] = "many"
"""

URLS = """
from django.http import JsonResponse
from django.urls import path

import per_buffer


def export(request):
    per_buffer.record(request.GET["account"], request.GET["user"], "export")
    return JsonResponse({"ok": True})


urlpatterns = [path("exports", export)]
"""


def make_site(tmp_path: Path) -> Path:
    require("django")
    site = tmp_path / "site"
    project = site / "myproject"
    project.mkdir(parents=True)
    (project / "__init__.py").write_text("")
    settings = readme_example("integrations", "# settings.py") + SETTINGS_EXTRA
    (project / "settings.py").write_text(settings)
    (project / "billing.py").write_text(readme_example("integrations", "# myproject/billing.py"))
    (project / "asgi.py").write_text(readme_example("integrations", "# myproject/asgi.py"))
    (project / "urls.py").write_text(URLS)
    return site


def site_env(server: PerServer, queue: Path, **extra: str) -> dict[str, str]:
    env = child_env(server, queue, **extra)
    for name in list(env):
        if name.startswith("PER_"):
            del env[name]  # everything comes from settings.PER_BUFFER
    env.update(
        TEST_QUEUE_DIR=str(queue),
        TEST_PER_TOKEN=server.activity_token,
        TEST_PER_URL=server.url,
        DJANGO_SETTINGS_MODULE="myproject.settings",
    )
    return env


def manage(site: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        python("-m", "django", *args),
        check=False,
        cwd=site,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_django_under_uvicorn_records_per_request_and_loses_nothing_on_sigterm(
    server: PerServer, tmp_path: Path, short_dir: Path, services: Callable[..., Service]
) -> None:
    require("uvicorn")
    site = make_site(tmp_path)
    queue = tmp_path / "queue"
    sock = short_dir / "django.sock"
    argv = python("-m", "uvicorn", "myproject.asgi:application", "--uds", str(sock))
    service = services([*argv, "--log-level", "warning"], env=site_env(server, queue), cwd=site)
    transport = httpx.HTTPTransport(uds=str(sock))
    expected = set()
    with httpx.Client(transport=transport, base_url="http://app", timeout=10) as client:

        def answers() -> bool:
            assert service.alive(), service.output()
            try:
                return client.get("/nowhere").status_code == 404
            except httpx.TransportError:
                return False

        wait_until(answers, 30, f"Django under uvicorn:\n{service.output()}")
        for n in range(8):
            user = f"d{n}"
            response = client.get(
                "/exports",
                params={"account": "acme-corp", "user": user},
                headers={"X-Account": "acme-corp", "X-User": user},
            )
            assert response.json() == {"ok": True}, response.text
            expected |= {("acme-corp", user, "export"), ("acme-corp", user, "api-call")}
    assert server.activities == []  # in memory
    assert service.stop(signal.SIGTERM) == -signal.SIGTERM, service.output()
    assert accounted(server, queue) == expected  # the directory from settings.PER_BUFFER


def test_management_commands_status_and_drain_use_the_settings(
    server: PerServer, tmp_path: Path
) -> None:
    site = make_site(tmp_path)
    queue = tmp_path / "queue"
    backlog = {("acme-corp", f"b{n}", "api-call") for n in range(3)}
    with DurableQueue(queue) as q:
        q.put([(key, time.time()) for key in sorted(backlog)])
    env = site_env(server, queue)
    server.outage()  # so that nothing but drain can deliver: status must see all three
    status = manage(site, env, "per_buffer_status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["directory"], report["pending"]) == (str(queue), 3)
    server.recover()
    drain = manage(site, env, "per_buffer_drain", "--timeout", "30")
    assert drain.returncode == 0, drain.stdout + drain.stderr
    assert delivered(server) == backlog and on_disk(queue) == set()
    assert server.activity_token not in drain.stdout + drain.stderr


def test_a_failing_command_and_a_bad_setting_say_so(server: PerServer, tmp_path: Path) -> None:
    site = make_site(tmp_path)
    missing = manage(
        site,
        site_env(server, tmp_path / "queue"),
        "per_buffer_status",
        "--dir",
        str(tmp_path / "nope"),
    )
    assert missing.returncode != 0 and "nope" in missing.stderr
    bad = manage(site, site_env(server, tmp_path / "queue", TEST_BAD_SETTING="1"), "check")
    assert bad.returncode != 0
    assert (
        "ImproperlyConfigured: settings.PER_BUFFER:" in bad.stderr and "concurrency" in bad.stderr
    )
