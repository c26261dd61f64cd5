"""Keeping the tokens in use out of httpx's and httpcore's log records.

httpcore logs every response's status line and headers at DEBUG, and httpx the status
line at INFO. A server or proxy that echoes the request's ``Authorization`` header (a
redirect's ``Location``, an ``add_header``, a reason phrase) would put the token in
those records. Every part of per_buffer that sends a token through httpx (the plain
clients, the CLI through them, and delivery through a proxy) calls :func:`hold` with it;
while it is held, a :class:`logging.Filter` on the httpx and httpcore loggers masks it
(in any letter case, and its pieces of 8+ characters, see :func:`per_buffer._masking.mask`)
in each record's message, exception text and stack text.

A logger's filters do not apply to records of its child loggers, so the filter is added
to each logger httpx and httpcore log through (``httpcore.http11``,
``httpcore.connection``, ...), once, when the first secret is held.

The registry keeps each secret once, with a count of its holders, in memory only, and
forgets it when the last holder releases it (or, for a holder given as ``owner``, when
that object is garbage-collected).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Final

from ._masking import mask

__all__ = ["LOGGERS", "SecretFilter", "SecretHold", "held", "hold", "install", "masked"]

#: Every logger httpx 0.2x and httpcore 1.x log through (filters are not inherited).
LOGGERS: Final = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)
_PREFIXES: Final = ("httpx.", "httpcore.")

_lock = threading.Lock()
_counts: dict[str, int] = {}
_held: tuple[str, ...] = ()  # replaced (never mutated) under _lock; read without it
_installed = False


def _reset_lock_in_child() -> None:
    """A fork while another thread held the lock must not leave the child's copy locked."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def held() -> tuple[str, ...]:
    """The secrets held now (each once)."""
    return _held


def masked(text: str) -> str:
    """``text`` with every held secret masked."""
    secrets = _held
    return mask(text, secrets) if secrets else text


class SecretFilter(logging.Filter):
    """Masks the held secrets in a record; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place when it holds a secret; always keep it."""
        secrets = _held
        if not secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format: logging would print msg and args raw
            message = f"{record.msg!s} {record.args!r}"
        clean = mask(message, secrets)
        if clean != message:
            record.msg = clean
            record.args = None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            clean = mask(text, secrets)
            if clean != text:  # else the handler's formatter formats it as usual
                record.exc_text = clean
        elif record.exc_text:
            record.exc_text = mask(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = mask(record.stack_info, secrets)
        return True


_FILTER: Final = SecretFilter()


def install() -> None:
    """Add the filter to every httpx and httpcore logger (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        names = set(LOGGERS)
        names.update(
            name for name in list(logging.root.manager.loggerDict) if name.startswith(_PREFIXES)
        )
        for name in sorted(names):
            logging.getLogger(name).addFilter(_FILTER)  # addFilter ignores a repeat
        _installed = True


class SecretHold:
    """One holder's claim on some secrets; :meth:`release` gives it up (idempotent)."""

    __slots__ = ("__weakref__", "_secrets")

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self._secrets = secrets

    def __repr__(self) -> str:
        return f"<SecretHold of {len(self._secrets)} secret(s)>"

    def release(self) -> None:
        """Stop masking these secrets, unless another holder still holds them."""
        global _held
        with _lock:
            secrets, self._secrets = self._secrets, ()
            for secret in secrets:
                count = _counts.get(secret, 0) - 1
                if count > 0:
                    _counts[secret] = count
                else:
                    _counts.pop(secret, None)
            if secrets:
                _held = tuple(_counts)


def hold(*secrets: str | None, owner: object = None) -> SecretHold:
    """Mask ``secrets`` (empty and None ones are skipped) in httpx and httpcore logs.

    The filter is installed on first use. With ``owner`` the hold is also released
    when that object is garbage-collected (a client nobody closed).
    """
    global _held
    install()
    kept = tuple(dict.fromkeys(s for s in secrets if s))
    claim = SecretHold(kept)
    if kept:
        with _lock:
            for secret in kept:
                _counts[secret] = _counts.get(secret, 0) + 1
            _held = tuple(_counts)
    if owner is not None:
        weakref.finalize(owner, claim.release)
    return claim
