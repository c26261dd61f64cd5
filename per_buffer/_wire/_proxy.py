"""Proxies: which one applies (exactly as httpx decides), and a channel that goes through it.

:func:`proxy_for` reproduces httpx's default choice (``trust_env=True``):
``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (any case, the
lower-case spelling winning, read as :func:`urllib.request.getproxies` reads
them), turned into URL patterns and matched by the most specific pattern first,
as ``httpx.AsyncClient`` mounts them. An explicit proxy applies to every URL and
ignores the environment, as ``httpx.AsyncClient(proxy=...)`` does.

:class:`HttpxChannel` is the channel used when a proxy applies: the same
interface as the lean channel, backed by one ``httpx.AsyncClient`` (one
connection), which speaks to HTTP proxies (absolute-form requests, ``CONNECT``
tunnels for https) and, with ``socksio`` installed, SOCKS proxies. It creates
one Task per request: proxied delivery trades some CPU for httpx's coverage.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import urllib.request
from collections.abc import Mapping
from typing import Any

import httpx

from .. import _log_filter
from .._masking import mask, without_userinfo
from ._base import Answer, Channel, Done, RequestTarget, WireError, WireErrorKind

__all__ = ["HttpxChannel", "proxy_for", "redact"]

logger = logging.getLogger("per_buffer.wire")


def redact(url: str) -> str:
    """``url`` with its user information shown as ``***@`` (for messages and logs).

    The user information ends at the *last* ``@`` (a password may hold ``@``, as
    generated ones do, or an unencoded ``/``), see :func:`per_buffer._masking.without_userinfo`.
    """
    return without_userinfo(url)


def _userinfo_secrets(proxy: str) -> tuple[str, ...]:
    """The proxy's password, raw and percent-decoded, to mask in the texts of its errors."""
    try:
        url = httpx.URL(proxy)
    except (httpx.InvalidURL, ValueError):  # pragma: no cover (checked by proxy_for)
        return ()
    raw = url.userinfo.decode("ascii", "replace").partition(":")[2]
    return tuple(dict.fromkeys(s for s in (raw, url.password) if s))


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """``urllib.request.getproxies_environment()`` over ``environ`` instead of ``os.environ``."""
    proxies: dict[str, str] = {}
    for name, value in environ.items():
        lowered = name.lower()
        if value and lowered[-6:] == "_proxy":
            proxies[lowered[:-6]] = value
    if "REQUEST_METHOD" in environ:  # CGI: HTTP_PROXY may come from a request header
        proxies.pop("http", None)
    for name, value in environ.items():
        if name[-6:] == "_proxy":
            lowered = name.lower()
            if value:
                proxies[lowered[:-6]] = value
            else:
                proxies.pop(lowered[:-6], None)
    return proxies


def _is_ip(hostname: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(hostname.split("/", maxsplit=1)[0])
    except ValueError:
        return False
    return True


def _mounts(proxies: Mapping[str, str]) -> dict[str, str | None]:
    """httpx's ``get_environment_proxies()``: URL pattern -> proxy URL, or ``None`` (no proxy)."""
    mounts: dict[str, str | None] = {}
    for scheme in ("http", "https", "all"):
        value = proxies.get(scheme)
        if value:
            mounts[f"{scheme}://"] = value if "://" in value else f"http://{value}"
    for entry in (part.strip() for part in proxies.get("no", "").split(",")):
        if entry == "*":
            return {}
        if not entry:
            continue
        if "://" in entry:
            mounts[entry] = None
        elif _is_ip(entry, ipaddress.IPv4Address):
            mounts[f"all://{entry}"] = None
        elif _is_ip(entry, ipaddress.IPv6Address):
            mounts[f"all://[{entry}]"] = None
        elif entry.lower() == "localhost":
            mounts[f"all://{entry}"] = None
        else:
            mounts[f"all://*{entry}"] = None
    return mounts


class _Pattern:
    """httpx's ``URLPattern``: scheme, host (with ``*`` wildcards) and port."""

    __slots__ = ("host", "port", "regex", "scheme")

    def __init__(self, pattern: str) -> None:
        url = httpx.URL(pattern)
        self.scheme = "" if url.scheme == "all" else url.scheme
        self.host = "" if url.host == "*" else url.host
        self.port = url.port
        self.regex: re.Pattern[str] | None
        if not url.host or url.host == "*":
            self.regex = None
        elif url.host.startswith("*."):
            self.regex = re.compile(f"^.+\\.{re.escape(url.host[2:])}$")
        elif url.host.startswith("*"):
            self.regex = re.compile(f"^(.+\\.)?{re.escape(url.host[1:])}$")
        else:
            self.regex = re.compile(f"^{re.escape(url.host)}$")

    def matches(self, url: httpx.URL) -> bool:
        if self.scheme and self.scheme != url.scheme:
            return False
        if self.host and self.regex is not None and not self.regex.match(url.host):
            return False
        return self.port is None or self.port == url.port

    @property
    def priority(self) -> tuple[int, int, int]:
        return (0 if self.port is not None else 1, -len(self.host), -len(self.scheme))


def _check_proxy(url: str, where: str) -> str:
    try:
        httpx.Proxy(url)
    except (ValueError, httpx.InvalidURL):
        raise ValueError(f"{where} is not a usable proxy URL: {redact(url)!r}") from None
    return url


def proxy_for(
    base_url: str, proxy: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The proxy URL that applies to ``base_url``, or ``None`` for a direct connection.

    ``proxy`` (when not ``None``) applies to every URL and the environment is
    not read. Otherwise the proxy variables of ``environ`` (default: the
    process environment, through :func:`urllib.request.getproxies` as httpx
    does) decide. Pass ``environ={}`` to ignore the environment.

    Raises:
        ValueError: the applicable proxy URL, or a ``NO_PROXY`` entry, is not valid.
    """
    if proxy is not None:
        return _check_proxy(proxy, "proxy")
    proxies = urllib.request.getproxies() if environ is None else _environment_proxies(environ)
    try:
        patterns = [(_Pattern(key), value) for key, value in _mounts(proxies).items()]
    except (ValueError, httpx.InvalidURL):
        raise ValueError("NO_PROXY holds an entry that is not a host name or URL") from None
    url = httpx.URL(base_url)
    patterns.sort(key=lambda item: item[0].priority)
    for pattern, value in patterns:
        if pattern.matches(url):
            return None if value is None else _check_proxy(value, "the environment's proxy")
    return None


def _classify(exc: Exception) -> WireErrorKind:
    """Map an httpx exception to a WireError kind."""
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, (httpx.ConnectError, httpx.ProxyError, httpx.UnsupportedProtocol)):
        return "connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        text = str(exc).lower()
        if "disconnect" in text or "peer closed" in text or "incomplete" in text:
            return "closed"
        return "protocol"
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.CloseError, OSError)):
        return "closed"
    return "protocol"


class HttpxChannel(Channel):
    """A channel through a proxy, backed by one ``httpx.AsyncClient`` (one connection)."""

    __slots__ = (
        "_client",
        "_closing",
        "_done",
        "_headers",
        "_is_closed",
        "_loop",
        "_max_body",
        "_proxy_text",
        "_secrets",
        "_secrets_held",
        "_target",
        "_task",
        "_timed_out",
        "_timeout",
        "_timer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: RequestTarget,
        *,
        timeout: float,
        proxy: str,
        max_body: int,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._target = target
        self._timeout = timeout
        self._max_body = max_body
        self._proxy_text = redact(proxy)
        # masked in the texts of errors (httpx may quote an echo of the Authorization header)
        self._secrets = (target.token, *_userinfo_secrets(proxy))
        # and in httpx's and httpcore's log records while this channel is open
        self._secrets_held = _log_filter.hold(target.token)
        self._client = httpx.AsyncClient(
            proxy=proxy,
            trust_env=False,
            follow_redirects=False,
            verify=target.ssl_context(),
            timeout=timeout,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        self._headers = {
            "Authorization": f"Bearer {target.token}",
            "User-Agent": target.user_agent,
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        self._done: Done | None = None
        self._task: asyncio.Task[Answer | WireError] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._is_closed = False

    def __repr__(self) -> str:
        state = "closed" if self._is_closed else "busy" if self.busy else "idle"
        return f"<HttpxChannel {self._target.origin} via {self._proxy_text} {state}>"

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._is_closed

    def send(self, target: bytes, done: Done) -> None:
        """Send ``GET target`` through the proxy (see :class:`Channel`)."""
        if self.busy:
            raise RuntimeError("channel is busy: one request at a time")
        if self._is_closed:
            raise RuntimeError("channel is closed")
        self.busy = True
        self._done = done
        self._timed_out = False
        task = self._loop.create_task(self._run(target))
        task.add_done_callback(self._finished)
        self._task = task
        self._timer = self._loop.call_later(self._timeout, self._on_timeout, task)

    def close(self) -> None:
        """Abort the in-flight request (its ``done`` gets "closed") and close the client."""
        if self._is_closed:
            return
        self._is_closed = True
        self._secrets_held.release()
        if self._task is not None:
            self._task.cancel()  # its done gets "closed"
        self._closing = self._loop.create_task(self._client.aclose())

    async def aclose(self) -> None:
        """Close, then wait until the client's connection is closed."""
        if not self._is_closed:
            self.close()
        tasks: set[asyncio.Future[Any]] = {t for t in (self._task, self._closing) if t is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        await asyncio.sleep(0)  # let the request's done callback run

    def _on_timeout(self, task: asyncio.Task[Answer | WireError]) -> None:
        if task is self._task and not task.done():
            self._timed_out = True
            task.cancel()

    async def _run(self, target: bytes) -> Answer | WireError:
        """The outcome of one request; cancellation is handled by :meth:`_finished`."""
        try:
            return await self._fetch(self._target.origin + target.decode("ascii"))
        except _TooLarge:
            return WireError("too_large", f"response body over {self._max_body} bytes")
        except Exception as exc:
            text = " ".join(mask(str(exc), self._secrets).split()) or type(exc).__name__
            return WireError(
                _classify(exc),
                f"request to {self._target.origin} via {self._proxy_text} failed "
                f"({type(exc).__name__}: {text})",
            )

    def _finished(self, task: asyncio.Task[Answer | WireError]) -> None:
        """The request's task ended (from the loop): hand its outcome to ``done``."""
        result: Answer | WireError
        if not task.cancelled():
            result = task.result()
        elif self._timed_out:
            result = WireError(
                "timeout",
                f"no complete response from {self._target.origin} via "
                f"{self._proxy_text} within {self._timeout:g} s",
            )
        else:
            result = WireError("closed", "the channel was closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is task:
            self._task = None
        done = self._done
        self._done = None
        self.busy = False
        if done is not None:
            try:
                done(result)
            except Exception:
                logger.exception("per_buffer wire: a done callback raised")

    async def _fetch(self, url: str) -> Answer:
        async with self._client.stream("GET", url, headers=self._headers) as response:
            parts: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self._max_body:
                    raise _TooLarge
                parts.append(chunk)
            head = b"HTTP/1.1 %d \r\n" % response.status_code + b"".join(
                key + b": " + value + b"\r\n" for key, value in response.headers.raw
            )
            return Answer(response.status_code, b"".join(parts), head)


class _TooLarge(Exception):
    """Internal: the body passed the cap."""
