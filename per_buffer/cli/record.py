"""``per-buffer record``: one activity, through the durable queue or ``--direct`` to Per.

It says exactly one of: delivered, safely queued on disk (and where), refused by Per,
or lost (neither delivered nor stored, with the reason), on one stream.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from ..client import PerClient
from ..config import RecorderConfig
from ..errors import ConfigurationError, QueueError
from ..models import validate_id
from ..recorder import Recorder, RecorderStats
from ._common import (
    ACTIVITY_TOKEN_ENV,
    BUFFER_DIR_ENV,
    EXIT_FAILURE,
    EXIT_LOST,
    EXIT_OK,
    EXIT_USAGE_LINE,
    PROG,
    TYPE_ENVS,
    CLIError,
    UsageError,
    activity_token,
    add_command,
    base_url,
    call_per,
    directory_source,
    env,
    one_line,
    out,
    positive_seconds,
    print_json,
)
from ._progress import short_error

EPILOG = f"""\
examples:
  {PROG} record --billing-id acme --user-id u-42 --activity-type-id login
  {PROG} record --billing-id acme --user-id u-42 --direct   # prints the transaction ID

Through the queue (default), the activity is written to the queue directory
(--dir, else $PER_BUFFER_DIR, else the default directory for the token) before
delivery starts; it is then sent within --timeout, or left on disk for the next
recorder there (or '{PROG} drain'). The result is one line: on stdout when the
activity was delivered or is safely on disk, on stderr otherwise.
"""

EXIT_CODES = f"""\
  0  delivered, or safely on disk in the queue directory (the line says which)
  1  refused: Per rejected the token, or rejected the activity (dead-lettered)
{EXIT_USAGE_LINE}
  3  lost: neither delivered nor stored (e.g. the queue directory is unusable,
     or Per is unreachable with --direct)
"""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """Declare ``per-buffer record``."""
    parser = add_command(
        commands,
        "record",
        "record one activity, through the queue or --direct",
        cmd_record,
        epilog=EPILOG,
        exit_codes=EXIT_CODES,
        common=common,
    )
    parser.add_argument(
        "--billing-id", required=True, type=_identifier, metavar="B", help="customer billed"
    )
    parser.add_argument(
        "--user-id", required=True, type=_identifier, metavar="U", help="the active user"
    )
    parser.add_argument(
        "--activity-type-id",
        type=_identifier,
        default=None,
        metavar="T",
        help="default $PER_ACTIVITY_TYPE_ID or $ACTIVITY_TYPE_ID",
    )
    parser.add_argument(
        "--direct", action="store_true", help="call Per now and print the transaction ID"
    )
    parser.add_argument("--dir", metavar="DIR", help="queue directory (not with --direct)")
    parser.add_argument(
        "--timeout",
        type=positive_seconds(3600.0),
        default=5.0,
        metavar="S",
        help="seconds to wait for delivery (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout (results only)")


def _identifier(text: str) -> str:
    try:
        return validate_id(text, "ID")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _activity_type(arg: str | None) -> str:
    if arg is not None:
        return arg
    for name in TYPE_ENVS:
        value = env(name)
        if value is not None:
            return value
    raise UsageError(
        "no activity type: pass --activity-type-id or set PER_ACTIVITY_TYPE_ID "
        "(or ACTIVITY_TYPE_ID)"
    )


def cmd_record(args: argparse.Namespace) -> int:
    """``per-buffer record``: one activity through the durable queue, or ``--direct`` to Per."""
    if args.direct and args.dir:
        raise UsageError("--dir is for the queue; leave it out with --direct")
    token = activity_token()
    type_id = _activity_type(args.activity_type_id)
    url = base_url()
    if args.direct:
        return _record_direct(args, token, type_id, url)
    return _record_queued(args, token, type_id, url)


def _record_direct(args: argparse.Namespace, token: str, type_id: str, url: str) -> int:
    with PerClient(token, base_url=url, timeout=args.timeout) as client:
        # a duplicate after a retried 5xx is harmless: Per counts unique users
        transaction = call_per(
            lambda: client.add_activity(args.billing_id, args.user_id, type_id),
            base_url=url,
            token_env=ACTIVITY_TOKEN_ENV,
            lost="lost: not delivered, and --direct keeps no copy",
        )
    if args.json:
        print_json({"state": "delivered", "delivered": True, "transaction_id": transaction})
    else:
        out(transaction)
    return EXIT_OK


def _record_queued(args: argparse.Namespace, token: str, type_id: str, url: str) -> int:
    path, source = directory_source(args.dir)
    assert path is not None  # the token is set, so its default directory applies
    options: dict[str, Any] = {
        "directory": path,
        "base_url": url,
        "durability": "sync",  # on disk before record() returns
        "coalesce_window": 0,
        "enabled": True,  # an explicit command: PER_BUFFER_ENABLED=false does not apply
        "exit_timeout": args.timeout,
    }
    # A malformed setting is a usage error (2); only then does a failure mean "lost".
    RecorderConfig.resolve(token=token, activity_type_id=type_id, **options)
    where = f"{path} (from {source})"
    try:
        recorder = Recorder(token, type_id, **options)
    except ConfigurationError as exc:  # the directory cannot be created, locked or written
        cause = exc.__context__ if isinstance(exc.__context__, OSError | QueueError) else exc
        raise _lost(f"the queue directory {where} cannot be used ({one_line(cause)})") from None
    try:
        recorder.record(args.billing_id, args.user_id)
        stats = recorder.stats()
        stored = stats.enqueued > 0
        if stored:
            stats = _wait_for_delivery(recorder, args.timeout)
    finally:
        recorder.close(0.0)  # what was not delivered stays on disk
    if not stored:
        if stats.dropped:
            reason = "dropped: " + ", ".join(f"{k}={v}" for k, v in stats.dropped.items())
        else:
            reason = one_line(stats.last_error or "the write failed")
        raise _lost(f"the queue in {where} did not store it ({reason.rstrip('.')})")
    return _report_outcome(args, stats, path)


def _lost(what: str) -> CLIError:
    return CLIError(
        f"lost: the activity was neither delivered nor stored: {what}; point --dir or "
        f"{BUFFER_DIR_ENV} at a writable local directory",
        EXIT_LOST,
    )


def _wait_for_delivery(recorder: Recorder, timeout: float) -> RecorderStats:
    """Flush until delivered or ``timeout`` passes; stop early when Per refuses the token."""
    flusher = threading.Thread(
        target=recorder.flush, args=(timeout,), name="per-buffer-record", daemon=True
    )
    flusher.start()
    while flusher.is_alive():
        flusher.join(0.1)
        if recorder.stats().pause_reason == "auth":
            break
    return recorder.stats()


def _report_outcome(args: argparse.Namespace, stats: RecorderStats, path: Path) -> int:
    """The single line (or JSON document) saying where the stored activity is now."""
    if stats.dead_lettered:
        raise CLIError(
            f"refused: Per rejected the activity ({one_line(stats.last_error or 'no reason')}) "
            f"and it was set aside as a dead letter in {path}; see "
            f"'{PROG} dead-letters list --dir {path}'",
            EXIT_FAILURE,
        )
    if stats.pause_reason == "auth" and not stats.delivered:
        raise CLIError(
            f"refused: Per refused the token in {ACTIVITY_TOKEN_ENV}; the activity stays on "
            f"disk in {path} and is sent once a recorder there has a valid token",
            EXIT_FAILURE,
        )
    if stats.delivered:
        state, text = "delivered", "delivered"
    else:
        state = "queued"
        reason = f" (last error: {short_error(stats.last_error)})" if stats.last_error else ""
        text = (
            f"queued, not delivered yet: Per did not accept it within {args.timeout:g} s"
            f"{reason}; it is on disk in {path} and the next recorder there "
            f"(or '{PROG} drain --dir {path}') sends it"
        )
    if args.json:
        print_json(
            {
                "state": state,
                "delivered": state == "delivered",
                "directory": path,
                "last_error": stats.last_error,
            }
        )
    else:
        out(text)
    return EXIT_OK
