"""gunicorn: close the recorder when a worker (or the master) exits, within ``graceful_timeout``.

In ``gunicorn.conf.py``::

    from per_buffer.integrations.gunicorn import hooks

    graceful_timeout = 30
    worker_exit, on_exit = hooks()

A worker stopped by SIGTERM (or recycled by ``max_requests``) flushes for up to
``graceful_timeout - margin`` seconds and leaves the rest on disk; gunicorn kills workers
still running at ``graceful_timeout``, and the margin keeps the flush inside it. gunicorn
itself is not imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..recorder import Recorder
from ._common import close_recorder

__all__ = ["Hooks", "hooks"]


class Hooks(NamedTuple):
    """gunicorn server hooks, to assign in a config module: ``worker_exit, on_exit = hooks()``."""

    worker_exit: Callable[[Any, Any], None]
    on_exit: Callable[[Any], None]


def hooks(
    *, margin: float = 2.0, timeout: float | None = None, recorder: Recorder | None = None
) -> Hooks:
    """Hooks closing ``recorder`` (None: the default one) in each worker and in the master.

    Args:
        margin: seconds kept free before gunicorn's ``graceful_timeout``.
        timeout: an upper bound on the flush, in seconds (None: ``graceful_timeout - margin``).
        recorder: the recorder to close; None closes the default (``per_buffer.shutdown``).

    Raises:
        ValueError: a negative ``margin`` or ``timeout``.
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0 seconds, not {margin!r}")
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {timeout!r}")

    def flush_timeout(server: Any) -> float | None:
        graceful = getattr(getattr(server, "cfg", None), "graceful_timeout", None)
        if not isinstance(graceful, int | float):  # not called by gunicorn: no bound to keep
            return timeout
        limit = max(0.0, float(graceful) - margin)
        return limit if timeout is None else min(limit, timeout)

    def worker_exit(server: Any, worker: Any) -> None:
        close_recorder(recorder, flush_timeout(server))

    def on_exit(server: Any) -> None:
        close_recorder(recorder, flush_timeout(server))

    return Hooks(worker_exit, on_exit)
