"""Celery: close the recorder when a worker process exits.

Celery's prefork children leave through ``os._exit``, so ``atexit`` handlers (per_buffer's
included) never run there: activities still in memory would be lost. ``connect()`` hooks
``worker_process_shutdown`` (each pool child) and ``worker_shutdown`` (the main process,
which runs the tasks with the solo and threads pools).
"""

from __future__ import annotations

from typing import Any

from ..recorder import Recorder
from ._common import close_recorder

__all__ = ["connect"]

DISPATCH_UID = "per_buffer.integrations.celery"


def connect(*, recorder: Recorder | None = None, timeout: float | None = None) -> None:
    """Close ``recorder`` (None: the default one) when a Celery worker process shuts down.

    Call it once where the Celery app is defined (a second call changes nothing).

    Args:
        recorder: the recorder to close; None closes the default (``per_buffer.shutdown``).
        timeout: seconds to spend flushing; None means the recorder's ``exit_timeout``.
            What is not delivered by then stays on disk for the next process.

    Raises:
        ValueError: a negative ``timeout``.
    """
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {timeout!r}")
    from celery import signals  # noqa: PLC0415

    def close(**_: Any) -> None:
        close_recorder(recorder, timeout)

    for signal in (signals.worker_process_shutdown, signals.worker_shutdown):
        signal.connect(close, weak=False, dispatch_uid=DISPATCH_UID)
