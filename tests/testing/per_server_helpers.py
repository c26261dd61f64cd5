"""Shared helpers of the PerServer tests: tokens, one-line requests, raw-socket reading."""

from __future__ import annotations

import re
import socket
from datetime import datetime, timezone

import httpx

from per_buffer.testing import DEFAULT_ACTIVITY_TOKEN, DEFAULT_REPORTING_TOKEN, PerServer

ACT = {"Authorization": f"Bearer {DEFAULT_ACTIVITY_TOKEN}"}
REP = {"Authorization": f"Bearer {DEFAULT_REPORTING_TOKEN}"}


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Unix seconds of a UTC date and time."""
    return datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()


def add(
    http: httpx.Client,
    server: PerServer,
    billing: str = "acme",
    user: str = "u1",
    kind: str = "login",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return http.get(
        f"{server.url}/activities.add",
        params={"billingId": billing, "userId": user, "activityTypeId": kind},
        headers=ACT if headers is None else headers,
    )


def get_report(http: httpx.Client, server: PerServer, **params: str) -> httpx.Response:
    return http.get(f"{server.url}/reports.get", params=params, headers=REP)


def raw_request(path: str, token: str = DEFAULT_ACTIVITY_TOKEN, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    ).encode()


def read_response(sock: socket.socket, pending: bytearray) -> bytes:
    """Read exactly one Content-Length framed response from ``sock``."""
    while True:
        end = pending.find(b"\r\n\r\n")
        if end >= 0:
            match = re.search(rb"(?i)content-length: *(\d+)", bytes(pending[:end]))
            assert match is not None
            total = end + 4 + int(match.group(1))
            if len(pending) >= total:
                response = bytes(pending[:total])
                del pending[:total]
                return response
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a full response")
        pending += chunk


def connect(server: PerServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    return sock
