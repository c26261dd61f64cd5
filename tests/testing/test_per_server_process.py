"""PerServerProcess: the local Per server in a child process, driven through its control port."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx
import pytest

from per_buffer.testing import PerServerProcess


def test_server_process_end_to_end() -> None:
    with (
        PerServerProcess(seed=7) as proc,
        httpx.Client(trust_env=False, timeout=10) as client,
    ):
        assert proc.url.startswith("http://127.0.0.1:") and proc.control_url != proc.url
        headers = {"Authorization": f"Bearer {proc.activity_token}"}
        for user in ("u1", "u2", "u1"):
            response = client.get(
                f"{proc.url}/activities.add",
                params={"billingId": "acme", "userId": user, "activityTypeId": "login"},
                headers=headers,
            )
            assert response.json()["ok"] is True
        stats = proc.stats()
        assert stats["activities"] == 3 and stats["unique"] == 2
        assert stats["counters"]["ok"] == 3
        report = proc.report(start="2000-01-01T00:00:00Z")
        assert report["activityTypes"] == {"login": {"billingIds": {"acme": {"unique": 2}}}}
        assert report["end"] is None
        with pytest.raises(ValueError, match="end_without_start"):
            proc.report(end="2000-01-01T00:00:00Z")

        proc.outage()
        with pytest.raises(httpx.ConnectError):
            client.get(f"{proc.url}/activities.add", headers=headers)
        proc.recover()
        proc.inject("429", count=1, retry_after="3")
        response = client.get(f"{proc.url}/activities.add", headers=headers)
        assert response.status_code == 429 and response.headers["retry-after"] == "3"
        proc.inject("503", rate=1.0)
        assert client.get(f"{proc.url}/activities.add", headers=headers).status_code == 503
        proc.clear_faults()
        proc.set_latency(0.05)
        started = time.perf_counter()
        assert client.get(f"{proc.url}/activities.add", headers=headers).status_code == 200
        assert time.perf_counter() - started >= 0.05
        proc.reset()
        assert proc.stats()["activities"] == 0
        assert proc.stop() == 0
        assert proc.stop() is None


def test_server_process_degraded_controls() -> None:
    with (
        PerServerProcess(
            extra_args=[
                "--rate-limit",
                "0.4",
                "--retry-after",
                "date",
                "--framing",
                "chunked",
                "--clock-offset",
                "-86400",
            ]
        ) as proc,
        httpx.Client(trust_env=False, timeout=10) as client,
    ):
        headers = {"Authorization": f"Bearer {proc.activity_token}"}
        params = {"billingId": "acme", "userId": "u1", "activityTypeId": "login"}

        def get() -> httpx.Response:
            return client.get(f"{proc.url}/activities.add", params=params, headers=headers)

        response = get()  # the flags took effect
        assert response.status_code == 200 and response.headers["transfer-encoding"] == "chunked"
        server_date = parsedate_to_datetime(response.headers["date"]).timestamp()
        assert abs(server_date - (time.time() - 86_400)) < 5
        response = get()
        assert response.status_code == 429
        wait = parsedate_to_datetime(response.headers["retry-after"]).timestamp() - server_date
        assert 2 <= wait <= 4  # 2.5 s to the next token, in whole seconds of the server clock

        proc.set_rate_limit(0.4, burst=1, retry_after="seconds")
        assert get().status_code == 200
        assert get().headers["retry-after"] == "3"
        proc.set_rate_limit(None)
        proc.set_clock_offset(0)
        proc.set_framing("close")
        response = get()
        assert response.headers["connection"] == "close" and response.json()["ok"] is True
        date = parsedate_to_datetime(response.headers["date"]).timestamp()
        assert abs(date - time.time()) < 5

        proc.inject("http", status=403, body="html", seconds=30)
        response = get()
        assert response.status_code == 403 and "403 Forbidden" in response.text
        assert get().status_code == 403  # every request inside the window
        proc.inject("http", count=1, status=401, body="per_auth")
        assert get().json() == {"ok": False, "message": "invalid_auth_token"}
        with pytest.raises(ValueError, match="body must be one of"):
            proc.inject("http", status=403, body="xml")  # type: ignore[arg-type]
        proc.clear_faults()
        with pytest.raises(ValueError, match="positive"):
            proc.set_rate_limit(0)
        with pytest.raises(ValueError, match="framing"):
            proc.set_framing("gzip")  # type: ignore[arg-type]

        proc.set_latency(0.2, duration=0.4)
        started = time.monotonic()
        while True:  # the spike paces the loop and ends by itself
            sent = time.monotonic()
            assert get().status_code == 200
            if time.monotonic() - sent < 0.15:
                break
        assert 0.4 <= time.monotonic() - started < 3.0
        counters = proc.stats()["counters"]
        assert counters["rate_limited"] == 2 and counters["fault_http"] == 3
