"""Flask (``PerBuffer`` from ``app.config``) and the generic WSGI middleware, in process.

Flask's own test client drives the real Flask/Werkzeug request cycle; the WSGI middleware
is served by a real ``wsgiref`` server on loopback. The gunicorn exit path is in
test_exit_paths.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
import pytest
from integration_helpers import delivered_soon, readme_example, require

import per_buffer
from per_buffer.integrations.wsgi import PerBufferMiddleware
from per_buffer.testing import PerServer

require("flask")
from flask import Flask  # noqa: E402

from per_buffer.integrations.flask import PerBuffer  # noqa: E402


@pytest.fixture(autouse=True)
def _no_default_recorder_left() -> Iterator[None]:
    yield
    per_buffer.shutdown(timeout=5)


def per_config(server: PerServer, directory: Path) -> dict[str, Any]:
    return {
        "PER_ACTIVITY_TOKEN": server.activity_token,
        "PER_BASE_URL": server.url,
        "PER_ACTIVITY_TYPE_ID": "api-call",
        "PER_BUFFER_DIR": directory,  # a Path: typed values are fine
        "PER_BUFFER_CONCURRENCY": "3",  # text, as from an environment file
        "PER_BUFFER_COMMIT_INTERVAL": 30,
    }


@pytest.mark.usefixtures("per_env")
def test_the_readme_app_records_through_who_and_in_views(
    server: PerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_ACTIVITY_TYPE_ID", "from-the-environment")  # app.config wins
    namespace: dict[str, Any] = {"__name__": "readme_flask_app"}
    exec(readme_example("integrations", "# app.py: gunicorn"), namespace)
    app: Flask = namespace["app"]
    client = app.test_client()
    headers = {"X-Account": "acme-corp", "X-User": "u1"}
    assert client.post("/exports", headers=headers).json == {"ok": True}
    assert client.get("/missing", headers=headers).status_code == 404  # recorded too
    assert client.post("/exports").status_code == 500  # the view failed; who: None
    ext = app.extensions["per_buffer"]
    assert ext.recorder is per_buffer.get_recorder()  # the default: per_buffer.record() uses it
    assert per_buffer.flush(timeout=10)
    assert delivered_soon(
        server, {("acme-corp", "u1", "export"), ("acme-corp", "u1", "api-call")}
    ) == {("acme-corp", "u1", "export"), ("acme-corp", "u1", "api-call")}


def test_settings_come_from_app_config_then_the_environment(
    server: PerServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_BUFFER_TIMEOUT", "7")
    monkeypatch.setenv("PER_BUFFER_CONCURRENCY", "9")  # app.config's 3 wins
    monkeypatch.setenv("ACTIVITY_TYPE_ID", "legacy-alias")  # app.config's name wins
    app = Flask(__name__)
    app.config.update(per_config(server, tmp_path / "q"))
    ext = PerBuffer(app, max_attempts=5)  # keyword options win over both
    assert ext.recorder is not None
    config = ext.recorder.config
    assert (config.concurrency, config.timeout, config.max_attempts) == (3, 7.0, 5)
    assert config.commit_interval == 30.0 and config.activity_type_id == "api-call"
    assert ext.recorder.directory == tmp_path / "q"


def test_init_app_later_and_a_failing_who_never_fails_a_request(
    server: PerServer, tmp_path: Path, per_logs: pytest.LogCaptureFixture
) -> None:
    ext = PerBuffer(who=lambda request: ("acme-corp", request.args["user"]))
    app = Flask(__name__)
    app.config.update(per_config(server, tmp_path / "q"))

    @app.get("/")
    def home() -> str:
        return "hi"

    ext.init_app(app)
    client = app.test_client()
    assert client.get("/?user=u7").text == "hi"
    assert client.get("/").text == "hi"  # who raises KeyError: logged, not raised
    assert any("who hook" in r.getMessage() for r in per_logs.records)
    assert per_buffer.flush(timeout=10)
    assert delivered_soon(server, {("acme-corp", "u7", "api-call")}) == {
        ("acme-corp", "u7", "api-call")
    }


def test_a_bad_setting_is_an_error_at_init_naming_it(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(
        PER_ACTIVITY_TOKEN="t" * 20,
        PER_ACTIVITY_TYPE_ID="x",
        PER_BUFFER_DIR=tmp_path,
        PER_BUFFER_CONCURRENCY="many",
    )
    with pytest.raises(ValueError, match="PER_BUFFER_CONCURRENCY"):
        PerBuffer(app)
    app = Flask(__name__)
    app.config.update(PER_ACTIVITY_TYPE_ID="x")
    with pytest.raises(ValueError, match="PER_ACTIVITY_TOKEN"):
        PerBuffer(app)
    with pytest.raises(TypeError, match="who must be callable"):
        PerBuffer(who=42)  # type: ignore[arg-type]


def test_disabled_in_tests_needs_no_token(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(PER_BUFFER_ENABLED=False, PER_BUFFER_DIR=tmp_path)
    ext = PerBuffer(app)
    per_buffer.record("acme-corp", "u1", "x")
    assert ext.recorder is not None and ext.recorder.stats().recorded == 1


def test_the_wsgi_middleware_under_a_real_server(server: PerServer, tmp_path: Path) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["myapp.account"] = "acme-corp"  # what an auth layer inside would set
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def who(environ: dict[str, Any]) -> tuple[str, str] | None:
        user = environ.get("HTTP_X_USER")
        return (environ["myapp.account"], user) if user else None

    rec = per_buffer.Recorder(
        server.activity_token, "api-call", directory=tmp_path / "q", base_url=server.url
    )

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = make_server(
        "127.0.0.1", 0, PerBufferMiddleware(app, who, recorder=rec), handler_class=Quiet
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/"
        with httpx.Client(trust_env=False) as http:
            assert http.get(url, headers={"X-User": "w1"}).text == "ok"
            assert http.get(url).text == "ok"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert rec.flush(timeout=10)
    rec.close()
    assert delivered_soon(server, {("acme-corp", "w1", "api-call")}) == {
        ("acme-corp", "w1", "api-call")
    }
