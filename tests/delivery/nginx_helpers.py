"""Stock nginx as a real, independent server in front of a Per-shaped answer.

The test writes the ``http`` block's directives; this module adds the rest of the
configuration (``daemon off``, a loopback port, pid, logs and temp paths under the
test's directory) and an access log of ``$msec $arg_userId $status`` lines.
nginx comes from apt (``.ci/run`` installs it); without it the test fails in CI
(``CI`` or ``PER_BUFFER_REQUIRE_INTEGRATIONS`` set) and skips elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from subprocess_helpers import terminate

#: Per's success answer as an nginx ``return`` argument.
PER_OK = """'{"ok":true,"result":{"transactionId":"x"}}'"""


@dataclass(frozen=True)
class LogLine:
    """One access-log line: when (unix seconds), which user, which status."""

    at: float
    user: str
    status: int


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nginx_binary() -> str:
    """The nginx executable, or a failure (CI) / skip (elsewhere) that says how to get it."""
    binary = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).exists()),
        None,
    )
    if binary is None:
        message = "nginx is not installed (.ci/run installs it with apt-get install nginx)"
        if os.environ.get("CI") or os.environ.get("PER_BUFFER_REQUIRE_INTEGRATIONS"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


class Nginx:
    """An nginx master process on a loopback port.

    ``http_directives`` go into the ``http`` block, ``location`` into ``location
    /activities.add``; ``try_files /nothing @per;`` there hands a request on to
    ``location @per``, which answers Per's success with ``return 200``. (A ``return`` in
    the limited location itself would answer in the rewrite phase, before ``limit_req``
    runs in the pre-access phase.)
    """

    def __init__(self, directory: Path, http_directives: str, location: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = directory / "access.log"
        temp = directory / "temp"
        temp.mkdir(exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        config = f"""
{user}daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    log_format per '$msec $arg_userId $status';
    default_type application/json;
    {http_directives}
    server {{
        listen 127.0.0.1:{self.port};
        access_log {self.access_log} per;
        location /activities.add {{
            {location}
        }}
        location @per {{
            return 200 {PER_OK};
        }}
    }}
}}
"""
        self.config = directory / "nginx.conf"
        self.config.write_text(config)
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", str(directory), "-e", str(directory / "error.log"),
             "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                output = (
                    self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                )
                raise AssertionError(f"nginx exited with {self.proc.returncode}: {output}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx did not listen within 10 s") from None
                time.sleep(0.02)

    def log(self) -> list[LogLine]:
        """The access log's lines so far (nginx writes each line as the request ends)."""
        if not self.access_log.exists():
            return []
        lines = []
        for text in self.access_log.read_text().splitlines():
            at, user, status = text.split(" ")
            lines.append(LogLine(float(at), user, int(status)))
        return lines

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then wait."""
        if self.proc.poll() is None:
            terminate(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
