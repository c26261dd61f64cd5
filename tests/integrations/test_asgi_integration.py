"""ASGI: lifespan shutdown closes the recorder (apps without lifespan too); ``who`` per request.

In process with Starlette's TestClient (the real Starlette/FastAPI stack, lifespan included);
the uvicorn SIGTERM exit path, with real processes, is in test_exit_paths.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import delivered_soon, holding_recorder, on_disk, require

import per_buffer
from per_buffer import Recorder
from per_buffer.integrations.asgi import PerBufferMiddleware
from per_buffer.testing import PerServer

require("fastapi")
from fastapi import FastAPI  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402


def make_recorder(server: PerServer, directory: Path, **options: Any) -> Recorder:
    return holding_recorder(server, directory, "api-call", **options)


def header_who(scope: Any) -> tuple[str, str] | None:
    headers = dict(scope["headers"])
    user = headers.get(b"x-user")
    return ("acme-corp", user.decode()) if user else None


def test_fastapi_with_its_own_lifespan_closes_after_the_apps_shutdown_code(
    server: PerServer, tmp_path: Path
) -> None:
    rec = make_recorder(server, tmp_path / "q")
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        rec.record("acme-corp", "shutdown-handler")  # the app's own code, before ours
        events.append("shutdown")

    api = FastAPI(lifespan=lifespan)

    @api.get("/hello")
    def hello() -> dict[str, bool]:
        rec.record("acme-corp", "in-view", "export")
        return {"ok": True}

    app = PerBufferMiddleware(api, who=header_who, recorder=rec)
    with TestClient(app) as client:
        assert client.get("/hello", headers={"X-User": "u1"}).status_code == 200
        assert client.get("/hello").status_code == 200  # who: None, nothing recorded
        assert server.activities == []  # still in memory (commit_interval 30 s)
    assert events == ["startup", "shutdown"]
    expected = {
        ("acme-corp", "in-view", "export"),
        ("acme-corp", "u1", "api-call"),
        ("acme-corp", "shutdown-handler", "api-call"),
    }
    assert delivered_soon(server, expected) == expected
    rec.record("acme-corp", "late")
    assert rec.stats().dropped == {"closed": 1}  # closed by the lifespan shutdown


@pytest.mark.usefixtures("per_env")
def test_starlette_add_middleware_and_the_default_recorder(
    server: PerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "api-call")
    monkeypatch.setenv("PER_BUFFER_COMMIT_INTERVAL", "30")

    async def home(_request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(PerBufferMiddleware, who=header_who)
    with TestClient(app) as client:
        for user in ("a", "b", "a"):
            assert client.get("/", headers={"X-User": user}).text == "hi"
        default = per_buffer.get_recorder()  # built from the environment by the first request
    # per_buffer.shutdown() ran at lifespan shutdown: delivered, and the default is gone
    assert delivered_soon(
        server, {("acme-corp", "a", "api-call"), ("acme-corp", "b", "api-call")}
    ) == {("acme-corp", "a", "api-call"), ("acme-corp", "b", "api-call")}
    default.record("acme-corp", "c")
    assert default.stats().dropped == {"closed": 1}


async def bare_app(scope: Any, receive: Any, send: Any) -> None:
    """A plain ASGI app that only speaks HTTP (Django's handler behaves the same)."""
    if scope["type"] != "http":
        raise ValueError(f"no {scope['type']} here")
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"bare"})


def test_an_app_without_lifespan_gets_one(server: PerServer, tmp_path: Path) -> None:
    rec = make_recorder(server, tmp_path / "q")
    app = PerBufferMiddleware(bare_app, who=header_who, recorder=rec)
    with TestClient(app) as client:  # the lifespan handshake succeeds
        assert client.get("/", headers={"X-User": "u2"}).text == "bare"
    assert delivered_soon(server, {("acme-corp", "u2", "api-call")}) == {
        ("acme-corp", "u2", "api-call")
    }


def test_a_failing_who_never_fails_a_request(
    server: PerServer, tmp_path: Path, per_logs: pytest.LogCaptureFixture
) -> None:
    rec = make_recorder(server, tmp_path / "q")
    calls: list[str] = []

    def who(scope: Any) -> tuple[str, str]:
        calls.append(scope["path"])
        if scope["path"] == "/boom":
            raise RuntimeError("who is broken")
        return ("acme-corp", "\x00bad")  # record() refuses it: a ValueError

    app = PerBufferMiddleware(bare_app, who=who, recorder=rec)
    with TestClient(app) as client:
        for path in ("/boom", "/bad", "/boom"):
            assert client.get(path).status_code == 200
    assert calls == ["/boom", "/bad", "/boom"]
    assert server.activities == []
    failures = [r for r in per_logs.records if "who hook" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR  # once, then per minute
    assert failures[0].exc_info is not None and "who is broken" in str(failures[0].exc_info[1])


def test_shutdown_timeout_bounds_the_flush_and_the_rest_stays_on_disk(
    server: PerServer, tmp_path: Path
) -> None:
    # this process delivers (with a drainer process, shutdown only writes to disk)
    rec = make_recorder(server, tmp_path / "q", delivery="thread")
    app = PerBufferMiddleware(bare_app, who=header_who, recorder=rec, shutdown_timeout=0.5)
    with TestClient(app) as client:
        for n in range(5):
            client.get("/", headers={"X-User": f"u{n}"})
        server.outage()  # Per refuses connections: nothing can be delivered
        started = time.monotonic()
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, elapsed  # 0.5 s flush, then the worker stops (load: generous bound)
    assert server.activities == []
    assert on_disk(tmp_path / "q") == {("acme-corp", f"u{n}", "api-call") for n in range(5)}


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(TypeError, match="who must be callable"):
        PerBufferMiddleware(bare_app, who="nobody")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shutdown_timeout"):
        PerBufferMiddleware(bare_app, shutdown_timeout=-1)


def test_importing_an_integration_imports_no_framework() -> None:
    code = (
        "import sys, per_buffer; before = set(sys.modules)\n"
        "import per_buffer.integrations.asgi, per_buffer.integrations.wsgi, "
        "per_buffer.integrations.flask, per_buffer.integrations.django, "
        "per_buffer.integrations.gunicorn, per_buffer.integrations.celery, "
        "per_buffer.integrations.prometheus, per_buffer.integrations.opentelemetry, "
        "per_buffer.health, per_buffer.metrics\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - {'per_buffer'}))\n"
        "import per_buffer as p; print(any('integrations' in m for m in before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]"  # no framework, no prometheus_client, no opentelemetry
    assert out[1] == "False"  # import per_buffer imports no integration
