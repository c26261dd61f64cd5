"""The wire client's values: answers, errors, the preformatted request and the channel API."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import quote_plus

import httpx

from .._masking import without_userinfo

__all__ = [
    "MAX_BODY",
    "Answer",
    "Channel",
    "Done",
    "RequestTarget",
    "WireError",
    "WireErrorKind",
]

#: The largest response body a channel accepts (bytes); a larger one is a "too_large" fault.
MAX_BODY: Final = 1024 * 1024

WireErrorKind = Literal["connect", "timeout", "closed", "protocol", "too_large"]
_KINDS: Final = frozenset(("connect", "timeout", "closed", "protocol", "too_large"))


@dataclass(frozen=True, slots=True)
class Answer:
    """One complete HTTP response: its status code and its whole (de-framed) body.

    Header lines are kept raw and parsed only when :meth:`header` is called:
    only error paths need them (``Retry-After``, ``Content-Type``, ``Date``).
    """

    status: int
    body: bytes
    head: bytes = field(default=b"", repr=False, compare=False)

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or ``None`` when absent.

        Repeated headers are joined with ``", "`` as HTTP allows. Values are
        decoded as Latin-1 (HTTP's historical charset) and stripped.
        """
        wanted = name.strip().lower().encode("latin-1", "replace")
        values: list[str] = []
        for line in self.head.split(b"\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.lower() == wanted:
                values.append(value.strip().decode("latin-1"))
        return ", ".join(values) if values else None


class WireError(Exception):
    """A request that got no complete HTTP response.

    ``kind`` is one of:

    - ``"connect"``: the connection (TCP, TLS or a proxy's tunnel) could not be made;
    - ``"timeout"``: the request's total deadline passed (connect + write + read);
    - ``"closed"``: the peer closed or reset the connection before a complete response;
    - ``"protocol"``: the peer's bytes are not a well-formed HTTP/1.x response;
    - ``"too_large"``: the response head or body exceeds the channel's cap.

    ``str(err)`` is one line without any token or proxy credentials.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: WireErrorKind, message: str) -> None:
        if kind not in _KINDS:
            raise ValueError(f"unknown WireError kind {kind!r}")
        super().__init__(message)
        self.kind: WireErrorKind = kind

    def __repr__(self) -> str:
        return f"WireError({self.kind!r}, {str(self)!r})"


#: What :meth:`Channel.send` calls with the outcome of one request.
Done = Callable[[Answer | WireError], None]

# What urllib.parse.quote_plus (which httpx's query encoding uses) leaves alone.
_UNRESERVED: Final = re.compile(r"[A-Za-z0-9_.~-]*")
_TYPE_CACHE_MAX: Final = 1024


def _encode(value: str) -> bytes:
    """Percent-encode one query value exactly as httpx does (``urlencode``: space is ``+``)."""
    if _UNRESERVED.fullmatch(value) is not None:
        return value.encode("ascii")
    return quote_plus(value).encode("ascii")


def _check_header_value(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if not value.isascii() or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        # The value itself is never echoed: it may be a secret.
        raise ValueError(f"{what} must be printable ASCII (no control characters)")
    return value


class RequestTarget:
    """Where and as whom a set of channels sends: built once per base URL and token.

    It holds the base URL's path prefix, the ``Host`` header, the token and the
    user agent, and turns the three IDs of an activity into a request target
    (``/prefix/activities.add?billingId=..&userId=..&activityTypeId=..``)
    percent-encoded exactly as httpx encodes query parameters. The encoded
    activity types are cached. The token never appears in ``repr()``.

    Raises:
        ValueError: the base URL is not ``http(s)://host[:port][/path]``, or the
            token or user agent is empty or holds control or non-ASCII characters.
        TypeError: an argument is not a str.
    """

    __slots__ = (
        "_add_prefix",
        "_ssl_context",
        "_token",
        "_types",
        "base_url",
        "connect_host",
        "head_suffix",
        "host_header",
        "origin",
        "port",
        "scheme",
        "user_agent",
    )

    def __init__(self, base_url: str, token: str, user_agent: str) -> None:
        if not isinstance(base_url, str):
            raise TypeError(f"base_url must be a str, not {type(base_url).__name__}")
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, ValueError):
            shown = without_userinfo(base_url)
            raise ValueError(f"base_url is not a valid URL: {shown!r}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"base_url must look like https://host[:port], not {without_userinfo(base_url)!r}"
            )
        if url.query or url.fragment or url.userinfo:
            raise ValueError("base_url must not carry credentials, a query or a fragment")
        token = _check_header_value(token, "token")
        user_agent = _check_header_value(user_agent, "user_agent")
        self.base_url: str = str(url).rstrip("/")
        #: ``"http"`` or ``"https"``.
        self.scheme: str = url.scheme
        #: The host to connect to (IDNA-encoded, IPv6 without brackets).
        self.connect_host: str = url.raw_host.decode("ascii")
        #: The TCP port (the scheme's default when the URL has none).
        self.port: int = url.port or (443 if url.scheme == "https" else 80)
        #: The ``Host`` header, as httpx sends it (port only when not the default).
        self.host_header: bytes = url.netloc
        #: ``scheme://host[:port]`` (for clients that want an absolute URL).
        self.origin: str = f"{url.scheme}://{url.netloc.decode('ascii')}"
        self.user_agent = user_agent
        self._token = token
        path = url.raw_path
        if not path.endswith(b"/"):
            path += b"/"
        self._add_prefix = path + b"activities.add?billingId="
        self._types: dict[str, bytes] = {}
        self._ssl_context: ssl.SSLContext | None = None
        #: The request head after the target: preformatted once, the token included.
        self.head_suffix: bytes = (
            b" HTTP/1.1\r\nHost: "
            + self.host_header
            + b"\r\nAuthorization: Bearer "
            + token.encode("ascii")
            + b"\r\nUser-Agent: "
            + user_agent.encode("ascii")
            + b"\r\nAccept: application/json\r\n\r\n"
        )

    def __repr__(self) -> str:
        return f"RequestTarget(base_url={self.base_url!r}, token=<hidden>)"

    @property
    def token(self) -> str:
        """The bearer token (never shown by ``repr``)."""
        return self._token

    def activity(self, billing_id: str, user_id: str, activity_type_id: str) -> bytes:
        """The request target of ``activities.add`` for one activity (ASCII bytes).

        Raises:
            UnicodeEncodeError: an ID holds a lone surrogate (callers validate IDs first).
        """
        suffix = self._types.get(activity_type_id)
        if suffix is None:
            suffix = b"&activityTypeId=" + _encode(activity_type_id)
            if len(self._types) >= _TYPE_CACHE_MAX:
                self._types.clear()
            self._types[activity_type_id] = suffix
        return self._add_prefix + _encode(billing_id) + b"&userId=" + _encode(user_id) + suffix

    def ssl_context(self) -> ssl.SSLContext:
        """The verifying TLS context, built once (``httpx.create_ssl_context()``).

        ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured as by httpx.
        """
        context = self._ssl_context
        if context is None:
            context = self._ssl_context = httpx.create_ssl_context()
        return context


class Channel:
    """One HTTP/1.1 connection to Per, one request at a time; it reconnects lazily.

    A channel belongs to the event loop it was opened on: call every method
    from that loop's thread. :meth:`send` is the hot-path API; :meth:`request`
    is an awaitable convenience for tests and simple callers.

    ``busy`` is true from :meth:`send` until just before its ``done`` callback
    runs (so ``done`` may send the next request at once). Read it, never set it.
    """

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy: bool = False

    def send(self, target: bytes, done: Done) -> None:
        """Send ``GET target`` and call ``done`` exactly once with the outcome.

        ``done`` receives an :class:`Answer` or a :class:`WireError`; it runs
        from the event loop, never inside this call. Exceptions it raises are
        logged and swallowed.

        Raises:
            RuntimeError: a request is already in flight, or the channel is closed.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection; an in-flight request's ``done`` gets ``WireError("closed")``.

        Idempotent. A closed channel refuses further requests (``RuntimeError``).
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the connection's resources are released."""
        self.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        raise NotImplementedError

    async def request(self, target: bytes) -> Answer:
        """Send ``GET target`` and return the :class:`Answer`.

        Raises:
            WireError: no complete response (see its ``kind``).
            RuntimeError: the channel is busy or closed.
        """
        future: asyncio.Future[Answer | WireError] = asyncio.get_running_loop().create_future()

        def done(result: Answer | WireError) -> None:
            if not future.done():
                future.set_result(result)

        self.send(target, done)
        result = await future
        if isinstance(result, WireError):
            raise result
        return result
