"""The ``per-buffer`` command: a demo, queue inspection and repair, and the plain API calls.

Commands (one module each, declaring its own options next to its handler)::

    per-buffer demo          record many activities against a local Per, check the report
    per-buffer status        what a queue directory holds (--all: every default directory)
    per-buffer drain         deliver a left-behind backlog
    per-buffer dead-letters  list, requeue or purge activities Per refused
    per-buffer salvage       re-queue the readable entries of a quarantined database
    per-buffer record        one activity, through the queue or straight to Per
    per-buffer report        Per's unique-user report (default: this month up to now)
    per-buffer serve-local   run the local Per server in the foreground

Results go to stdout (``--json`` output is a single JSON document), progress and
errors to stderr. Every failure is one line ``per-buffer: error: ...``. Exit status:
0 success, 1 a runtime failure or a refusal, 2 bad usage, 3 an activity lost
(``record``) or nothing readable (``salvage``), 130 Ctrl-C, 143 SIGTERM; each
command's ``--help`` lists the ones it uses. Shared helpers live in
:mod:`._common` and :mod:`._progress`; nothing here imports the test server
(:mod:`per_buffer.testing`) until ``demo`` or ``serve-local`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence

from .._version import __version__
from ..errors import PerError, QueueError
from . import dead_letters, demo, drain, record, report, salvage, serve_local, status
from ._common import (
    ACTIVITY_TOKEN_ENV,
    BASE_URL_ENV,
    BUFFER_DIR_ENV,
    EXIT_FAILURE,
    EXIT_LOST,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    REPORTING_TOKEN_ENV,
    CLIError,
    Handler,
    Parser,
    UsageError,
    error_line,
    interrupt_code,
    interruptible,
    without_secrets,
)

__all__ = ["EXIT_LOST", "CLIError", "UsageError", "build_parser", "main"]

_COMMANDS = (demo, status, drain, dead_letters, salvage, record, report, serve_local)

_EPILOG_MAIN = f"""\
examples:
  {PROG} demo                              # the whole story against a local Per, ~15 s
  {PROG} serve-local                       # a local Per on port {serve_local.DEFAULT_PORT}
  {PROG} record --billing-id acme --user-id u-42 --activity-type-id login
  {PROG} report                            # this month up to now
  {PROG} status --all                      # every queue directory and its backlog
  {PROG} drain --timeout 60                # deliver a left-behind backlog

environment:
  {ACTIVITY_TOKEN_ENV}    activity token (record, drain, default queue directory)
  {REPORTING_TOKEN_ENV}   reporting token (report)
  PER_ACTIVITY_TYPE_ID  default activity type (record); ACTIVITY_TYPE_ID also works
  {BASE_URL_ENV}          Per endpoint (default https://api.useper.com)
  {BUFFER_DIR_ENV}        queue directory (default: per token, under ~/.cache/per-buffer)

exit status (each command's --help lists its own):
  0  success            1  runtime failure or refusal    2  bad usage
  3  activity lost (record), nothing readable (salvage)
  130  interrupted (Ctrl-C)    143  terminated (SIGTERM)
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``per-buffer`` command."""
    parser = Parser(
        prog=PROG,
        description="Durable usage reporting to Per: demo, inspect and repair queues, "
        "record activities and read reports.",
        epilog=_EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's log messages on stderr"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True
    for module in _COMMANDS:
        module.add_parser(commands, common)
    return parser


@contextlib.contextmanager
def _library_logging(verbose: bool) -> Iterator[None]:
    """Keep the library's warnings off stderr (they would break the progress line) unless -v."""
    logger = logging.getLogger("per_buffer")
    handler: logging.Handler
    previous_level = logger.level
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        logger.setLevel(logging.INFO)
    else:
        handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``per-buffer`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(report.join_relative_times(arguments))
    except UsageError as exc:
        error_line(str(exc))
        return exc.code
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    verbose = bool(getattr(args, "verbose", False))
    handler: Handler = args.handler
    try:
        with interruptible(), _library_logging(verbose):  # SIGTERM: cleanup runs, exit 143
            return handler(args)
    except KeyboardInterrupt as exc:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write("\n" if sys.stderr.isatty() else "")
            sys.stderr.flush()
        return interrupt_code(exc)
    except CLIError as exc:
        error_line(str(exc))
        return exc.code
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except PerError as exc:
        error_line(str(exc))
        return EXIT_FAILURE
    except QueueError as exc:
        error_line(f"queue: {exc}")
        return EXIT_FAILURE
    except (ValueError, TypeError) as exc:  # a malformed setting, named by the library
        error_line(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        error_line(str(exc))
        return EXIT_FAILURE
    except Exception as exc:
        if verbose:
            sys.stderr.write(without_secrets(traceback.format_exc()))
        error_line(f"unexpected {type(exc).__name__}: {exc} (run with -v for details)")
        return EXIT_FAILURE
