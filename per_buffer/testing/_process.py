"""The local Per server as a child process: ``PerServerProcess`` and its command line.

:class:`PerServerProcess` starts ``python -m per_buffer.testing`` as a child process and
drives it through the server's control port; :func:`main` is that command (argument
parsing, signals, the ``per-server listening on ...`` line the parent waits for).
Use both through :mod:`per_buffer.testing`, which re-exports them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Any, Literal
from urllib.parse import urlencode

from ._server import DEFAULT_ACTIVITY_TOKEN, DEFAULT_REPORTING_TOKEN, PerServer, StartStop

__all__ = ["PerServerProcess", "main"]

# --------------------------------------------------------------------------- other process


class PerServerProcess(StartStop):
    """A :class:`PerServer` in a child process (``python -m per_buffer.testing``).

    Use it as a context manager. It is driven through the server's control
    channel, which keeps answering during :meth:`outage`.

    Args:
        latency: seconds added to every API response.
        error_rate: the fraction of requests answered with an injected 503.
        port: the API port; ``0`` picks a free one.
        seed: seeds the fault generator.
        keep_activities: ``False`` for long benchmarks (counters and reports only).
        extra_args: more command-line options for the child (see :func:`main`).
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        error_rate: float = 0.0,
        port: int = 0,
        seed: int | None = None,
        keep_activities: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        args = ["--port", str(port), "--latency-ms", repr(latency * 1000.0)]
        if error_rate:
            args += ["--error-rate", repr(float(error_rate))]
        if seed is not None:
            args += ["--seed", str(seed)]
        if not keep_activities:
            args.append("--no-keep-activities")
        args.extend(extra_args)
        self._args = args
        self._proc: subprocess.Popen[bytes] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.url = ""
        self.control_url = ""
        self.activity_token = _option(extra_args, "--activity-token") or DEFAULT_ACTIVITY_TOKEN
        self.reporting_token = _option(extra_args, "--reporting-token") or DEFAULT_REPORTING_TOKEN

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> PerServerProcess:
        """Spawn the child and wait (up to 15 s) for its listening line; return ``self``.

        Raises:
            RuntimeError: the child exited or stayed silent.
        """
        if self._proc is not None:
            raise RuntimeError("PerServerProcess is already running")
        env = dict(os.environ)
        # the directory holding the per_buffer package, so the child imports this copy
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (package_root, env.get("PYTHONPATH")) if part
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "per_buffer.testing", *self._args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._proc = proc
        line = _read_line(proc.stdout, timeout=15.0)
        match = re.fullmatch(
            r"per-server listening on (\S+) control (\S+)", line.decode("utf-8", "replace").strip()
        )
        if match is None:
            self.stop()
            raise RuntimeError(f"per-server child did not start (said {line!r})")
        self.url, self.control_url = match.group(1), match.group(2)
        return self

    def stop(self) -> int | None:
        """SIGTERM the child, SIGKILL it after 5 s; return its exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    # control calls ------------------------------------------------------------------

    def _get(self, path: str, **params: object) -> Any:
        if not self.control_url:
            raise RuntimeError("PerServerProcess is not running")
        query = urlencode({k: str(v) for k, v in params.items() if v is not None})
        url = f"{self.control_url}{path}" + (f"?{query}" if query else "")
        try:
            with self._opener.open(url, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read().decode("utf-8", "replace")
            try:
                message = json.loads(body)["message"]
            except (ValueError, KeyError, TypeError):
                message = body
            raise ValueError(f"control {path} failed: {message}") from None

    def stats(self) -> dict[str, Any]:
        """``{"counters": {...}, "unique": n, "activities": n}`` from the child."""
        result: dict[str, Any] = self._get("/stats")
        return result

    def report(
        self, start: datetime | str | None = None, end: datetime | str | None = None
    ) -> dict[str, Any]:
        """The ``result`` object ``reports.get`` would answer (see :meth:`PerServer.report`)."""
        result: dict[str, Any] = self._get(
            "/report",
            start=start.isoformat() if isinstance(start, datetime) else start,
            end=end.isoformat() if isinstance(end, datetime) else end,
        )
        return result

    def inject(
        self,
        kind: str,
        count: int | None = None,
        rate: float | None = None,
        retry_after: str | None = None,
        *,
        seconds: float | None = None,
        message: str | None = None,
        status: int | None = None,
        body: Literal["html", "empty", "text", "per_ok_false", "per_auth"] | None = None,
    ) -> None:
        """Inject a fault in the child (see :meth:`PerServer.inject`).

        Raises:
            ValueError: the child refused the fault (the message says why).
        """
        self._get(
            "/inject",
            kind=kind,
            count=count,
            rate=None if rate is None else repr(float(rate)),
            seconds=None if seconds is None else repr(float(seconds)),
            retry_after=retry_after,
            message=message,
            status=status,
            body=body,
        )

    def clear_faults(self) -> None:
        """Remove every fault in the child (see :meth:`PerServer.clear_faults`)."""
        self._get("/clear")

    def outage(self) -> None:
        """Stop the child's API port (see :meth:`PerServer.outage`)."""
        self._get("/outage")

    def recover(self) -> None:
        """Reopen the child's API port (see :meth:`PerServer.recover`)."""
        self._get("/recover")

    def set_latency(self, seconds: float, duration: float | None = None) -> None:
        """Set the child's response latency; with ``duration``, a spike that ends by itself."""
        self._get(
            "/latency",
            seconds=repr(float(seconds)),
            duration=None if duration is None else repr(float(duration)),
        )

    def reset(self) -> None:
        """Forget the child's activities, counters and faults."""
        self._get("/reset")

    def set_rate_limit(
        self,
        rate: float | None,
        *,
        burst: int | None = None,
        retry_after: Literal["seconds", "date", "none"] = "seconds",
    ) -> None:
        """Limit the child's API port to ``rate`` requests a second (``None``: no limit)."""
        self._get(
            "/rate_limit",
            rate=None if rate is None else repr(float(rate)),
            burst=burst,
            retry_after=retry_after,
        )

    def set_framing(
        self, framing: Literal["content-length", "chunked", "close", "http/1.0"]
    ) -> None:
        """Choose how the child delimits API responses (see :meth:`PerServer.set_framing`)."""
        self._get("/framing", mode=framing)

    def set_clock_offset(self, seconds: float) -> None:
        """Set how far the child's clock is ahead of the host's (negative: behind)."""
        self._get("/clock", offset=repr(float(seconds)))


def _option(args: Sequence[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _read_line(stream: IO[bytes] | None, timeout: float) -> bytes:
    """Read one line from ``stream`` or give up after ``timeout`` seconds (returns b"")."""
    if stream is None:
        return b""
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else b""


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Serve Per on loopback until SIGINT/SIGTERM (``python -m per_buffer.testing --help``)."""
    options = _parser().parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = _server(options)
    try:
        server.start()
        _configure(server, options)
        control = server.serve_control(options.control_port)
        print(f"per-server listening on {server.url} control {control}", flush=True)
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    parser = argparse.ArgumentParser(
        prog="python -m per_buffer.testing",
        description="A local Per-compatible server for tests, benchmarks and demos.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--control-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of 503 answers")
    parser.add_argument("--activity-token", action="append", default=None)
    parser.add_argument("--reporting-token", action="append", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--rate-limit", type=float, default=None, help="requests a second (a token bucket)"
    )
    parser.add_argument(
        "--rate-limit-burst", type=int, default=None, help="the bucket size (default: the rate)"
    )
    parser.add_argument(
        "--retry-after",
        choices=("seconds", "date", "none"),
        default="seconds",
        help="how a rate-limited 429 says when to come back",
    )
    parser.add_argument(
        "--framing",
        choices=("content-length", "chunked", "close", "http/1.0"),
        default="content-length",
        help="how API responses are delimited",
    )
    parser.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds the server's clock is ahead of the host's (negative: behind)",
    )
    parser.add_argument("--no-keep-activities", action="store_true")
    return parser


def _server(options: argparse.Namespace) -> PerServer:
    """The (not yet started) server the command-line ``options`` describe."""
    return PerServer(
        host=options.host,
        port=options.port,
        activity_tokens=options.activity_token or (DEFAULT_ACTIVITY_TOKEN,),
        reporting_tokens=options.reporting_token or (DEFAULT_REPORTING_TOKEN,),
        latency=options.latency_ms / 1000.0,
        clock_offset=options.clock_offset,
        seed=options.seed,
        keep_activities=not options.no_keep_activities,
        framing=options.framing,
    )


def _configure(server: PerServer, options: argparse.Namespace) -> None:
    """Apply the rate limit and the error rate of ``options`` to the running ``server``."""
    if options.rate_limit is not None:
        server.set_rate_limit(
            options.rate_limit,
            burst=options.rate_limit_burst,
            retry_after=options.retry_after,
        )
    if options.error_rate > 0:
        server.inject("503", rate=options.error_rate)
