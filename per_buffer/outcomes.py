"""What an answer means: the error classes of a delivery attempt.

Per documents one success shape (``{"ok": true, ...}``), one failure shape
(``{"ok": false, "message": ...}``, HTTP 200) and one exception (HTTP 401 with
``invalid_auth_token``). Between the client and Per sit load balancers, proxies,
CDNs and WAFs that answer with anything: HTML error pages, empty bodies, 403s,
404s, 429s, truncated bodies. Only an answer in Per's own JSON can say that Per
itself refused an activity; everything else is a fault on the way and must never
cost an activity its place in the queue.

=================== ================================================ ==========================
class               what was received                                effect
=================== ================================================ ==========================
``ok``              Per's JSON with ``ok: true`` (2xx)               acknowledged, deleted
``refused_by_per``  Per's JSON with ``ok: false`` (2xx or 4xx)       retried; dead-lettered
                                                                     after ``max_attempts``
``auth``            Per's ``invalid_auth_token`` (200, 401 or 403)   delivery paused, probed;
                                                                     nothing dead-lettered
``rate_limited``    HTTP 429, any body                               pause for ``Retry-After``
                                                                     (capped), learned rate
``too_large``       HTTP 413 or 414                                  dead-lettered at once
``server_error``    HTTP 5xx, 408 or 425, any body                   retried with backoff
``network_error``   no complete answer: refused, reset, timeout      retried with backoff
``not_per_response`` anything else: HTML, text or empty bodies with   retried with backoff
                    any status, redirects, malformed or truncated
=================== ================================================ ==========================

The last three are *transport faults*: never counted toward ``max_attempts``,
fed to the flow controller, retried until they succeed.

This module is pure: it turns (status, body, headers) or a connection fault into
a :class:`Verdict`. The plain clients raise typed errors from verdicts; the
delivery worker acts on them.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

from ._masking import mask

__all__ = [
    "AUTH",
    "FAILURE_CLASSES",
    "NETWORK_ERROR",
    "NOT_PER_RESPONSE",
    "OK",
    "RATE_LIMITED",
    "REFUSED_BY_PER",
    "SERVER_ERROR",
    "TOO_LARGE",
    "TRANSPORT_FAULTS",
    "Verdict",
    "judge",
    "judge_fault",
    "parse_retry_after",
    "redact",
]

OK: Final = "ok"
REFUSED_BY_PER: Final = "refused_by_per"
AUTH: Final = "auth"
RATE_LIMITED: Final = "rate_limited"
TOO_LARGE: Final = "too_large"
SERVER_ERROR: Final = "server_error"
NETWORK_ERROR: Final = "network_error"
NOT_PER_RESPONSE: Final = "not_per_response"

#: Failed-attempt classes, in the order stats and logs show them.
FAILURE_CLASSES: Final = (
    RATE_LIMITED,
    SERVER_ERROR,
    NETWORK_ERROR,
    NOT_PER_RESPONSE,
    REFUSED_BY_PER,
    AUTH,
    TOO_LARGE,
)
#: Faults on the way to Per: retried with backoff, never dead-lettered by count.
TRANSPORT_FAULTS: Final = frozenset({SERVER_ERROR, NETWORK_ERROR, NOT_PER_RESPONSE})

_FAST_OK: Final = b'{"ok":true'
_SERVER_ERROR_4XX: Final = frozenset({408, 425})
_TOO_LARGE: Final = frozenset({413, 414})
_AUTH_CODE: Final = "invalid_auth_token"
# RFC 9110 media type: token "/" token
_MEDIA_TYPE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The meaning of one answer (or of its absence).

    Attributes:
        kind: one of the classes in the module documentation.
        detail: one line saying what was received (never a token or a body).
        status: the HTTP status, None without an answer.
        message: Per's machine-readable code for ``refused_by_per`` and ``auth``.
        retry_after: seconds from ``Retry-After`` on a 429, None when absent or unreadable.
        payload: Per's JSON object when it was parsed (None on the fast success path).
    """

    kind: str
    detail: str
    status: int | None = None
    message: str | None = None
    retry_after: float | None = None
    payload: dict[str, Any] | None = None


_OK_VERDICT: Final = Verdict(OK, "HTTP 200 ok", 200)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date), or None.

    A date in the past means 0. Unreadable, negative or non-finite values give None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if (
            when.tzinfo is None
        ):  # RFC 9110 dates are GMT; parsedate_to_datetime says naive for -0000
            return None
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp() if when.tzinfo is not None else None


def redact(verdict: Verdict, *secrets: str) -> Verdict:
    """The verdict with the ``secrets`` (the tokens a server may echo) masked in its texts.

    Masked are the secrets in any letter case and every piece of 8 or more characters of
    them (an echo cut short or lower-cased on the way, see :func:`per_buffer._masking.mask`).
    Per's code (``message``) is kept whole by :func:`judge` (or replaced), so only whole
    echoes are masked there: a token that happens to hold a word of a code
    (``activity``) leaves the code readable, in ``message`` and at the end of ``detail``.
    A verdict that changes loses its ``payload``, which could hold the echo too.
    """
    message = verdict.message
    detail = verdict.detail
    if message is None:
        detail = mask(detail, secrets)
    else:
        message = mask(message, secrets, fragments=False)
        if message and message == verdict.message and detail.endswith(message):
            detail = mask(detail[: -len(message)], secrets) + message
        else:
            detail = mask(detail, secrets)
    if detail == verdict.detail and message == verdict.message:
        return verdict
    return replace(verdict, detail=detail, message=message, payload=None)


def _per_json(body: bytes) -> dict[str, Any] | None:
    """Per's JSON object (a dict with a boolean ``ok``), or None for anything else."""
    if not body or len(body) > 1 << 20:
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get("ok"), bool):
        return value
    return None


def _code(payload: dict[str, Any]) -> str:
    message = payload.get("message")
    if isinstance(message, str) and message.isprintable() and 0 < len(message) <= 200:
        return message
    return "unknown_error"


def _media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` as ``type/subtype``, or a word saying why not.

    Only a well-formed media type is quoted: a server may have put anything in the header
    (a WAF echoing the request's ``Authorization`` header, say).
    """
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if not kind:
        return "unlabelled data"
    if len(kind) > 60 or _MEDIA_TYPE.fullmatch(kind) is None:
        return "data with a malformed Content-Type"
    return kind


def _describe(status: int, content_type: str | None, body: bytes) -> str:
    shape = "an empty body" if not body else f"{len(body)} bytes of {_media_type(content_type)}"
    return f"HTTP {status} with {shape}, not Per's JSON"


def judge(
    status: int, body: bytes, header: Callable[[str], str | None], now: float | None = None
) -> Verdict:
    """Classify one complete HTTP answer.

    Args:
        status: the HTTP status code.
        body: the whole response body.
        header: looks up a response header by (case-insensitive) name.
        now: unix time for an HTTP-date ``Retry-After`` (default: the clock).
    """
    if status == 200 and body.startswith(_FAST_OK) and body.endswith(b"}"):
        return _OK_VERDICT
    if status == 429:
        # an HTTP date means the server's clock: measure it against the response's Date
        server_now = _http_date(header("date")) if now is None else None
        retry_after = parse_retry_after(header("retry-after"), server_now or now)
        wait = "" if retry_after is None else f", Retry-After {retry_after:g} s"
        return Verdict(RATE_LIMITED, f"HTTP 429{wait}", status, retry_after=retry_after)
    if status in _TOO_LARGE:
        return Verdict(TOO_LARGE, f"HTTP {status}: the request is too large", status)
    if status >= 500 or status in _SERVER_ERROR_4XX:
        return Verdict(SERVER_ERROR, f"HTTP {status}", status)
    payload = _per_json(body) if 200 <= status < 500 and not 300 <= status < 400 else None
    if payload is None:
        return Verdict(NOT_PER_RESPONSE, _describe(status, header("content-type"), body), status)
    if payload["ok"]:
        if 200 <= status < 300:
            return Verdict(OK, f"HTTP {status} ok", status, payload=payload)
        return Verdict(NOT_PER_RESPONSE, f"HTTP {status} with ok: true", status)
    code = _code(payload)
    if code == _AUTH_CODE:
        return Verdict(AUTH, f"HTTP {status}: {code}", status, code, payload=payload)
    return Verdict(REFUSED_BY_PER, f"HTTP {status}: {code}", status, code, payload=payload)


def judge_fault(kind: str, description: str) -> Verdict:
    """Classify the absence of a complete answer.

    ``kind`` is the connection layer's fault kind: ``connect``, ``timeout`` and
    ``closed`` (no complete answer) are network errors; ``protocol`` and
    ``too_large`` (an answer that is not HTTP as expected) are not Per's answer.
    """
    if kind in ("protocol", "too_large"):
        return Verdict(NOT_PER_RESPONSE, description)
    return Verdict(NETWORK_ERROR, description)
