"""What the ``per-buffer`` commands share: exit codes, errors, settings, output and argument types.

Results go to stdout (``--json`` output is one JSON document), progress and errors to
stderr. Every failure is one line ``per-buffer: error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar

from .._log_filter import held
from .._masking import FRAGMENT, mask
from ..config import check_token, default_directory, env_names, resolve_base_url
from ..errors import PerAuthError, PerError, PerRateLimitError
from ..queue import is_queue_directory

PROG = "per-buffer"
ACTIVITY_TOKEN_ENV = env_names("token")[0]
REPORTING_TOKEN_ENV = env_names("reporting_token")[0]
BASE_URL_ENV = env_names("base_url")[0]
BUFFER_DIR_ENV = env_names("directory")[0]
TYPE_ENVS = env_names("activity_type_id")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOST = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

EXIT_USAGE_LINE = "  2  bad usage: a malformed argument, a missing or malformed setting"
EXIT_SIGNAL_LINES = "  130  interrupted (Ctrl-C)\n  143  terminated (SIGTERM)"


# --------------------------------------------------------------------------- errors


class CLIError(Exception):
    """A failure shown as one line ``per-buffer: error: <message>``; ``code`` is the exit status."""

    code = EXIT_FAILURE

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(CLIError):
    """Bad input: a malformed argument, a missing setting; exit status 2."""

    code = EXIT_USAGE


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup runs; the exit status is 143."""


def one_line(text: object) -> str:
    """Collapse a message to one line (no secrets are ever in library messages)."""
    return " ".join(str(text).split()) or "unknown error"


def without_secrets(text: str) -> str:
    """``text`` with the tokens of the environment and those in use masked.

    Library messages hold no token (pieces of an echo included, masked where the echo
    was read); this is the last guard before a message (or a ``-v`` traceback) reaches
    the terminal, e.g. for an unexpected exception. It masks whole tokens, in any letter
    case, and leaves tokens shorter than :data:`~per_buffer._masking.FRAGMENT`
    characters (test values like ``t``) alone: masked they would blot out the message.
    """
    names = (ACTIVITY_TOKEN_ENV, REPORTING_TOKEN_ENV)
    tokens = (*(os.environ.get(name, "").strip() for name in names), *held())
    return mask(text, [token for token in tokens if len(token) >= FRAGMENT], fragments=False)


def error_line(message: str) -> None:
    """Print ``per-buffer: error: <message>`` on stderr (see :func:`without_secrets`)."""
    print(f"{PROG}: error: {without_secrets(one_line(message))}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM (like Ctrl-C) while a long command runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


# --------------------------------------------------------------------------- Per calls

CALL_ATTEMPTS = 3
_T = TypeVar("_T")


def explain(exc: PerError, *, base_url: str, token_env: str, lost: str = "") -> CLIError:
    """Turn a Per failure into one actionable line naming the setting to fix.

    ``lost``: when the call would have been retried (Per unreachable, 5xx, 429), prefix
    the message with it and exit 3: nothing reached Per and nothing was kept.
    """
    text = one_line(exc).rstrip(".")
    if isinstance(exc, PerAuthError):
        scope = "reporting" if token_env == REPORTING_TOKEN_ENV else "activity"
        return CLIError(
            f"Per refused the token in {token_env} ({exc.message}): set it to a valid Per "
            f"token with the {scope} scope"
        )
    if isinstance(exc, PerRateLimitError) or (exc.retryable and exc.status_code is not None):
        error = CLIError(f"{text} (tried {CALL_ATTEMPTS} times): try again later")
    elif exc.retryable:
        error = CLIError(f"{text}: is Per reachable at {base_url}? (check {BASE_URL_ENV})")
    else:
        return CLIError(text)
    if lost:
        return CLIError(f"{lost}: {error}", EXIT_LOST)
    return error


def call_per(fn: Callable[[], _T], *, base_url: str, token_env: str, lost: str = "") -> _T:
    """One Per call; a 5xx or 429 answer is retried twice (never a refused connection).

    Failures raise :class:`CLIError` from :func:`explain` (``lost``: see there).
    """
    for attempt in range(1, CALL_ATTEMPTS + 1):
        try:
            return fn()
        except PerError as exc:
            answered = exc.status_code is not None or isinstance(exc, PerRateLimitError)
            if not (exc.retryable and answered) or attempt == CALL_ATTEMPTS:
                raise explain(exc, base_url=base_url, token_env=token_env, lost=lost) from None
            wait = 0.5 * 2 ** (attempt - 1)
            if isinstance(exc, PerRateLimitError) and exc.retry_after is not None:
                wait = min(max(wait, exc.retry_after), 10.0)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- settings


def env(name: str) -> str | None:
    """An environment variable, stripped; None when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def base_url() -> str:
    """``PER_BASE_URL`` validated, or Per's own endpoint."""
    try:
        return resolve_base_url(env(BASE_URL_ENV))
    except ValueError as exc:
        raise UsageError(f"{BASE_URL_ENV}: {exc}") from None


def activity_token() -> str:
    """``PER_ACTIVITY_TOKEN``, or a usage error saying how to get one."""
    token = env(ACTIVITY_TOKEN_ENV)
    if token is None:
        raise UsageError(
            f"no Per activity token: set {ACTIVITY_TOKEN_ENV} "
            f"(e.g. export {ACTIVITY_TOKEN_ENV}=...; try '{PROG} serve-local' for a local one)"
        )
    return _checked_token(token, ACTIVITY_TOKEN_ENV)


def reporting_token() -> str:
    """``PER_REPORTING_TOKEN``, or a usage error."""
    token = env(REPORTING_TOKEN_ENV)
    if token is None:
        raise UsageError(
            f"no Per reporting token: set {REPORTING_TOKEN_ENV} to a token with the reporting scope"
        )
    return _checked_token(token, REPORTING_TOKEN_ENV)


def _checked_token(token: str, name: str) -> str:
    """``token`` when its form is valid, else a usage error naming ``name`` (not the token)."""
    try:
        return check_token(token, name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cache_root() -> Path:
    """The folder holding every default queue directory (``~/.cache/per-buffer`` on Linux)."""
    return default_directory("", "https://api.useper.com").parent


def directory_source(arg: str | None) -> tuple[Path | None, str]:
    """The queue directory from ``--dir``, ``PER_BUFFER_DIR`` or the token's default.

    Returns the path (None when nothing names one) and where it came from, for messages.
    """
    if arg:
        return Path(arg).expanduser(), "--dir"
    named = env(BUFFER_DIR_ENV)
    if named:
        return Path(named).expanduser(), BUFFER_DIR_ENV
    token = env(ACTIVITY_TOKEN_ENV)
    if token:
        return (
            default_directory(token, base_url()),
            f"the default directory for {ACTIVITY_TOKEN_ENV} and {BASE_URL_ENV}",
        )
    return None, ""


def queue_directory(arg: str | None) -> Path:
    """The existing queue directory named by ``--dir``, ``PER_BUFFER_DIR`` or the default."""
    path, source = directory_source(arg)
    if path is None:
        raise UsageError(
            f"no queue directory: pass --dir DIR or set {BUFFER_DIR_ENV} "
            f"(or {ACTIVITY_TOKEN_ENV} to use its default directory; "
            f"'{PROG} status --all' lists the default ones)"
        )
    if not path.exists():
        raise UsageError(
            f"queue directory {path} does not exist (from {source}); "
            f"pass --dir or set {BUFFER_DIR_ENV} to the directory your recorder uses"
        )
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory (from {source}); pass --dir DIR")
    if not is_queue_directory(path):
        raise UsageError(
            f"{path} holds no per_buffer queue (from {source}); pass --dir or set "
            f"{BUFFER_DIR_ENV} to the directory your recorder uses"
        )
    return path


# --------------------------------------------------------------------------- output


def out(line: str = "") -> None:
    """One line of results on stdout."""
    print(line, file=sys.stdout)


def print_json(value: object) -> None:
    """``value`` as one indented JSON document on stdout."""
    sys.stdout.write(json.dumps(plain(value), indent=2, ensure_ascii=False) + "\n")


def plain(value: object) -> Any:
    """Something ``json.dumps`` accepts: mappings, sequences, numbers, strings, None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return str(value)


def iso(value: object) -> str | None:
    """An ISO 8601 UTC time (``...Z``) from a datetime or a unix time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(float(value), timezone.utc)
    else:
        return str(value)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def count(value: int) -> str:
    """A whole number with thousands separators."""
    return f"{value:,}"


def age(seconds: float | None) -> str:
    """A duration for people: ``4.2 s``, ``3m 07s``, ``5h 02m``, ``3d 04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def size(num: int, *, exact: bool = True) -> str:
    """Bytes for people: ``512 B``, ``1.5 MiB (1,572,864 bytes)`` (``exact=False``: no bytes)."""
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            if unit == "B":
                return f"{num} B"
            return f"{value:.1f} {unit}" + (f" ({num:,} bytes)" if exact else "")
        value /= 1024
    return f"{num} B"  # pragma: no cover


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> list[str]:
    """Aligned text columns; ``align`` has one ``l`` or ``r`` per column."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if how == "r" else cell.ljust(width)
            for cell, width, how in zip(row, widths, align, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


def key_values(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``key  value`` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs)
    return [f"{key.ljust(width)}  {value}" for key, value in pairs]


# --------------------------------------------------------------------------- arguments


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, so ``main`` can return a code)."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` instead of printing usage and exiting."""
        raise UsageError(f"{message} (see '{self.prog} --help')")


Handler = Callable[[argparse.Namespace], int]


def add_command(
    commands: Any,
    name: str,
    help_text: str,
    handler: Handler,
    *,
    epilog: str,
    exit_codes: str,
    common: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its examples and every exit status it uses."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=epilog.rstrip("\n") + "\n\nexit status:\n" + exit_codes.rstrip("\n") + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.set_defaults(handler=handler)
    return parser


def positive_int(text: str) -> int:
    """An argument type: a whole number >= 1 (``1_000`` allowed)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def number(low: float, high: float, unit: str = "") -> Callable[[str], float]:
    """An argument type: a finite number in ``[low, high]`` (``unit`` names it in errors)."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number{suffix and ' of' + suffix}, not {text!r}"
            ) from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected a number between {low:g} and {high:g}{suffix}, not {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


def positive_seconds(high: float) -> Callable[[str], float]:
    """An argument type: seconds, more than 0 and at most ``high``."""
    inner = number(0.0, high, "seconds")

    def parse(text: str) -> float:
        value = inner(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, not {text!r}")
        return value

    parse.__name__ = "seconds"
    return parse
