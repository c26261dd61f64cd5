"""The module-level API (a default recorder built from the environment), and the
process hooks every recorder needs: fork handlers and the exit handler."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from ._recorder import Recorder, registry, renew_fork_reset_lock
from ._reentry import reentrant

__all__ = ["configure", "flush", "get_recorder", "record", "shutdown"]

logger = logging.getLogger("per_buffer.recorder")


# ---------------------------------------------------------------------- process hooks


def _before_fork() -> None:
    for recorder in list(registry):
        recorder._before_fork()


def _after_fork_in_parent() -> None:
    for recorder in list(registry):
        recorder._after_fork_in_parent()


def _after_fork_in_child() -> None:
    # a thread of the parent may have held these at the fork: it does not exist here
    global _default_lock
    _default_lock = threading.RLock()
    renew_fork_reset_lock()
    for recorder in list(registry):
        recorder._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _close_all_at_exit() -> None:
    # Only close(): it writes the memory batch, and delivers up to exit_timeout only where
    # no drainer goes on; it reads nothing from the disk that could keep the exit waiting.
    for recorder in list(registry):
        try:
            recorder.close(recorder.config.exit_timeout)
        except Exception:
            logger.exception("per_buffer: closing a recorder at exit failed")


atexit.register(_close_all_at_exit)


# ---------------------------------------------------------------------- module-level API

_default: Recorder | None = None
# Reentrant: a signal handler that interrupted the first record() (building the default
# recorder under this lock) may call get_recorder() or configure() on the same thread.
_default_lock = threading.RLock()


def configure(**options: Any) -> Recorder:
    """Create the default recorder used by :func:`record` (closing any previous one).

    Takes the same keyword arguments as :class:`Recorder`.
    """
    global _default
    recorder = Recorder(**options)
    with _default_lock:
        previous, _default = _default, recorder
    if previous is not None:
        previous.close()
    return recorder


def get_recorder() -> Recorder:
    """The default recorder, built from the environment on first use."""
    global _default
    recorder = _default
    if recorder is not None:
        return recorder
    with _default_lock:
        if _default is None:
            recorder = Recorder()  # never waits for the disk: its committer opens the queue
            current = _current()  # a signal handler on this thread may have built one
            if current is None:
                _default = current = recorder
            else:
                recorder.close(0.0)
            return current
        return _default


def _current() -> Recorder | None:
    return _default


def record(billing_id: str, user_id: str, activity_type_id: str | None = None) -> None:
    """Record an activity with the default recorder (see :meth:`Recorder.record`)."""
    recorder = _default
    if recorder is None:
        recorder = get_recorder()
    recorder.record(billing_id, user_id, activity_type_id)


def flush(timeout: float | None = None) -> bool:
    """Flush the default recorder; True when everything was delivered (or nothing to do)."""
    recorder = _default
    return True if recorder is None else recorder.flush(timeout)


def shutdown(timeout: float | None = None) -> None:
    """Close the default recorder (flushing up to ``timeout``) and forget it.

    Safe from a signal handler (the usual SIGTERM pattern): when the handler
    interrupted this library, the close runs in a background thread and the exit
    handler waits for it (the recorder stays the default one until then, counting
    later calls as dropped).
    """
    global _default
    if reentrant():
        recorder = _default
        if recorder is not None:
            recorder.close(timeout)
        return
    with _default_lock:
        recorder, _default = _default, None
    if recorder is not None:
        recorder.close(timeout)
