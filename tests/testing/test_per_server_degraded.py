"""PerServer as a degraded Per: server clock and Date, rate limiter, faults, framing, spikes."""

from __future__ import annotations

import time
from email.utils import formatdate, parsedate_to_datetime

import httpx
import pytest
from per_server_helpers import add, ts

from per_buffer.testing import PerServer

# --------------------------------------------------------------------------- clock and Date


def test_date_header_follows_the_server_clock(http: httpx.Client) -> None:
    now = [1_700_000_000.75]
    with PerServer(clock=lambda: now[0]) as server:
        response = add(http, server)
        assert response.headers["date"] == formatdate(1_700_000_000, usegmt=True)
        assert response.headers["date"] == "Tue, 14 Nov 2023 22:13:20 GMT"
        now[0] += 1.0  # the per-second cache moves on
        assert add(http, server).headers["date"] == formatdate(1_700_000_001, usegmt=True)
        # error answers carry it too
        response = http.get(f"{server.url}/nowhere")
        assert response.status_code == 404
        assert response.headers["date"] == formatdate(1_700_000_001, usegmt=True)
        server.inject("503")
        assert add(http, server).headers["date"] == formatdate(1_700_000_001, usegmt=True)

        server.set_clock_offset(-3600.5)
        assert server.now() == now[0] - 3600.5
        response = add(http, server, user="late")
        assert response.headers["date"] == formatdate(1_700_000_001 - 3600, usegmt=True)
        assert server.activities[-1].timestamp == now[0] - 3600.5  # stamps use the same time
        with pytest.raises(ValueError, match="finite"):
            server.set_clock_offset(float("nan"))


def test_clock_offset_shifts_stamps_and_the_default_report(http: httpx.Client) -> None:
    with PerServer(clock_offset=-86_400.0) as server:
        response = add(http, server)
        host = time.time()
        date = parsedate_to_datetime(response.headers["date"]).timestamp()
        assert host - 86_400 - 5 < date <= host - 86_400 + 1
        [activity] = server.activities
        assert host - 86_400 - 5 < activity.timestamp <= host - 86_400
    now = [ts(2024, 3, 1, 12)]  # the server is a day behind: still February for it
    with PerServer(clock=lambda: now[0], clock_offset=-86_400.0) as server:
        report = server.report()
        assert (report["start"], report["end"]) == (
            "2024-01-01T00:00:00.000Z",
            "2024-01-31T23:59:59.999Z",
        )
    with pytest.raises(ValueError, match="finite"):
        PerServer(clock_offset=float("inf"))
