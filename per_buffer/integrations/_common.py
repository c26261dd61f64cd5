"""What the integrations share: the ``who`` hook, settings from a config mapping, closing."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, Generic, TypeVar

from ..config import KNOBS, RecorderConfig
from ..recorder import Recorder, get_recorder, shutdown

__all__ = ["Identity", "RequestRecorder", "close_recorder", "recorder_options"]

logger = logging.getLogger("per_buffer.integrations")

#: What a ``who`` hook returns: ``(billing_id, user_id)`` or
#: ``(billing_id, user_id, activity_type_id)``; ``None`` records nothing.
Identity = tuple[str, str] | tuple[str, str, str]

_T = TypeVar("_T")
_LOG_EVERY = 60.0


class RequestRecorder(Generic[_T]):
    """Calls ``who(request)`` and records the answer; never raises into the request.

    A failing hook (it raised, or returned IDs ``record()`` refuses) is logged with its
    traceback the first time, then once a minute with a count.

    Args:
        who: returns :data:`Identity` or None for a request (a scope, an environ, a
            request object: whatever the framework hands over).
        recorder: the recorder to use; None means the default one (``per_buffer.record``).

    Raises:
        TypeError: ``who`` is not callable.
    """

    def __init__(
        self, who: Callable[[_T], Identity | None], recorder: Recorder | None = None
    ) -> None:
        if not callable(who):
            raise TypeError(f"who must be callable, not {type(who).__name__}")
        self.who = who
        self.recorder = recorder
        self._lock = threading.Lock()
        self._failures = 0
        self._logged_at = -_LOG_EVERY

    def __call__(self, request: _T) -> None:
        """Record the activity ``who`` names for ``request``, if any."""
        try:
            identity = self.who(request)
            if identity is None:
                return
            recorder = self.recorder if self.recorder is not None else get_recorder()
            recorder.record(*identity)
        except Exception:
            self._failed()

    def _failed(self) -> None:
        with self._lock:
            self._failures += 1
            first = self._failures == 1
            now = time.monotonic()
            due = first or now - self._logged_at >= _LOG_EVERY
            if due:
                self._logged_at = now
            count = self._failures
        if first:
            logger.exception(
                "per_buffer: the who hook %r failed; the request went on unrecorded", self.who
            )
        elif due:
            logger.error(
                "per_buffer: the who hook %r has failed %d times so far (requests unrecorded)",
                self.who,
                count,
            )


def recorder_options(config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Recorder keyword arguments from a config mapping keyed like the environment.

    ``config`` uses the environment variables' names (``PER_ACTIVITY_TOKEN``,
    ``PER_BUFFER_DIR``, ...) with values as text or as typed values; a name it does not
    hold falls back to the environment, then to the default. ``overrides`` win over both.

    Raises:
        ValueError, TypeError: a bad or missing setting, naming it.
    """
    environ = dict(os.environ)
    for knob in KNOBS:
        given = [name for name in knob.env if config.get(name) is not None]
        if given:
            for name in knob.env:  # the config's value beats every alias in the environment
                environ.pop(name, None)
            for name in given:
                environ[name] = _text(config[name])
    resolved = RecorderConfig.resolve(environ=environ, **overrides)
    return {f.name: getattr(resolved, f.name) for f in fields(resolved)}


def _text(value: object) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[no-any-return]
    return str(value)


def close_recorder(recorder: Recorder | None, timeout: float | None) -> None:
    """Close ``recorder`` (None: the default recorder, if one exists); never raises.

    ``timeout`` None means the recorder's ``exit_timeout``.
    """
    try:
        if recorder is None:
            shutdown(timeout)
        else:
            recorder.close(timeout)
    except Exception:
        logger.exception("per_buffer: closing the recorder at shutdown failed")
