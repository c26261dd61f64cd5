"""The delivery worker's HTTP client: callback-driven HTTP/1.1 channels to Per.

One :class:`Channel` is one connection carrying one request at a time::

    target = RequestTarget(base_url, token, USER_AGENT)       # once per channel set
    channel = open_channel(loop, target, timeout=10.0)         # lean, or via a proxy
    channel.send(target.activity("acme", "u1", "login"), done) # done(Answer | WireError)

``done`` is called exactly once, from the loop, never inside ``send()``. An
:class:`Answer` is any complete HTTP response (the caller judges its status and
body); a :class:`WireError` says why there is none (``kind``: "connect",
"timeout", "closed", "protocol", "too_large"). Channels are single-loop objects:
use them only from the thread running their loop.

Without a proxy the channel is :class:`~per_buffer._wire._lean.LeanChannel`
(asyncio ``Protocol``, preformatted request heads, no Task or Future per
request); when :func:`proxy_for` finds one it is
:class:`~per_buffer._wire._proxy.HttpxChannel` (one ``httpx.AsyncClient``).
:func:`new_event_loop` picks uvloop when the ``speedups`` extra is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ._base import MAX_BODY, Answer, Channel, Done, RequestTarget, WireError, WireErrorKind
from ._lean import LeanChannel
from ._loop import accelerator, new_event_loop
from ._proxy import HttpxChannel, proxy_for, redact

__all__ = [
    "MAX_BODY",
    "Answer",
    "Channel",
    "Done",
    "HttpxChannel",
    "LeanChannel",
    "RequestTarget",
    "WireError",
    "WireErrorKind",
    "accelerator",
    "new_event_loop",
    "open_channel",
    "proxy_for",
    "redact",
]


def open_channel(
    loop: asyncio.AbstractEventLoop,
    target: RequestTarget,
    *,
    timeout: float,
    proxy: str | None = None,
    environ: Mapping[str, str] | None = None,
    max_body: int = MAX_BODY,
) -> Channel:
    """A new channel to ``target`` on ``loop`` (no connection is made until the first send).

    ``timeout`` is the total deadline of each request (connect + write + read).
    The proxy is chosen by :func:`proxy_for` (``proxy`` wins over ``environ``,
    which defaults to the process environment); with none, the lean channel.

    Raises:
        ValueError: ``timeout`` or ``max_body`` is not positive, or the proxy
            URL (argument or environment) is not valid.
        ImportError: a SOCKS proxy applies and ``socksio`` is not installed.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    if max_body <= 0:
        raise ValueError(f"max_body must be positive, not {max_body!r}")
    via = proxy_for(target.base_url, proxy, environ)
    if via is None:
        return LeanChannel(loop, target, timeout=timeout, max_body=max_body)
    return HttpxChannel(loop, target, timeout=timeout, proxy=via, max_body=max_body)
