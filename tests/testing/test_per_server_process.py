"""PerServerProcess: the local Per server in a child process, driven through its control port."""

from __future__ import annotations

import time

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
