"""``per-buffer serve-local``: the local Per-compatible server in the foreground.

The port and the tokens have fixed defaults, so the ``export`` lines it prints (and
the default queue directory, derived from the token and the URL) stay the same
across restarts. The server (:mod:`per_buffer.testing`) is imported only when the
command runs.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from typing import Any

from ._common import (
    ACTIVITY_TOKEN_ENV,
    BASE_URL_ENV,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE_LINE,
    PROG,
    REPORTING_TOKEN_ENV,
    TYPE_ENVS,
    CLIError,
    add_command,
    interruptible,
    number,
    out,
)

DEFAULT_PORT = 8787

EPILOG = f"""\
examples:
  {PROG} serve-local                           # http://127.0.0.1:{DEFAULT_PORT}
  {PROG} serve-local --port 9000 --latency 20 --error-rate 0.05
  {PROG} serve-local --activity-token dev-act --reporting-token dev-rep

Then, in another shell, export the printed variables and use per_buffer as usual.
The port ({DEFAULT_PORT}) and the tokens are fixed unless given, so the printed
lines stay valid across restarts. Activities live in memory: a restart forgets them.
"""

EXIT_CODES = f"""\
  0  stopped with Ctrl-C or SIGTERM (its normal end)
  1  the port is in use or cannot be opened
{EXIT_USAGE_LINE}
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer serve-local``."""
    parser = add_command(
        commands,
        "serve-local",
        "run the local Per server in the foreground until Ctrl-C",
        cmd_serve_local,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"TCP port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any free one)",
    )
    parser.add_argument(
        "--latency",
        type=number(0.0, 60_000.0, "milliseconds"),
        default=0.0,
        metavar="MS",
        help="added latency per request, in milliseconds",
    )
    parser.add_argument(
        "--error-rate",
        type=number(0.0, 1.0),
        default=0.0,
        metavar="F",
        help="share of requests answered with HTTP 503 (0..1)",
    )
    parser.add_argument(
        "--activity-token",
        type=_token,
        default=None,
        metavar="T",
        help="accepted activity token (default: a fixed test token, printed at start)",
    )
    parser.add_argument(
        "--reporting-token",
        type=_token,
        default=None,
        metavar="T",
        help="accepted reporting token (default: a fixed test token, printed at start)",
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port between 0 and 65535, not {text!r}")
    return value


def _token(text: str) -> str:
    if not text or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise argparse.ArgumentTypeError("expected a token without spaces or control characters")
    return text


def cmd_serve_local(args: argparse.Namespace) -> int:
    """``per-buffer serve-local``: the local Per server in the foreground until Ctrl-C."""
    from ..testing import DEFAULT_ACTIVITY_TOKEN, DEFAULT_REPORTING_TOKEN, PerServer  # noqa: PLC0415

    server = PerServer(
        port=args.port,
        latency=args.latency / 1000.0,
        activity_tokens=(args.activity_token or DEFAULT_ACTIVITY_TOKEN,),
        reporting_tokens=(args.reporting_token or DEFAULT_REPORTING_TOKEN,),
    )
    try:
        server.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            hint = (
                f"port {args.port} is in use (another '{PROG} serve-local'?): stop it, "
                "or pick another with --port (0: any free one)"
            )
        else:
            hint = f"cannot listen on 127.0.0.1:{args.port} ({exc.strerror or exc})"
        raise CLIError(hint, EXIT_FAILURE) from None
    try:
        with interruptible():
            if args.error_rate:
                server.inject("503", rate=args.error_rate)
            _print_exports(server.url, server.activity_token, server.reporting_token)
            extra = f", {args.latency:g} ms latency" if args.latency else ""
            extra += f", {args.error_rate:.0%} HTTP 503" if args.error_rate else ""
            print(f"Serving{extra} until Ctrl-C ...", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to stop it
        counters = server.counters
        print(
            f"\nstopped after {counters['requests']:,} requests "
            f"({counters['ok']:,} activities accepted)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_OK
    finally:
        server.stop()


def _print_exports(url: str, activity_token: str, reporting_token: str) -> None:
    out(f"Local Per server listening on {url}")
    out(f"  activity token:  {activity_token}")
    out(f"  reporting token: {reporting_token}")
    out()
    out("Point per_buffer at it (in another shell):")
    out(f"  export {BASE_URL_ENV}={url}")
    out(f"  export {ACTIVITY_TOKEN_ENV}={activity_token}")
    out(f"  export {REPORTING_TOKEN_ENV}={reporting_token}")
    out(f"  export {TYPE_ENVS[0]}=login  # any activity type is accepted here")
    sys.stdout.flush()
