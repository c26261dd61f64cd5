"""Every setting, declared once: keyword arguments, else environment variables, else defaults.

:data:`KNOBS` declares each setting of :class:`RecorderConfig` (its name, environment
variables, unit, validation and meaning; its default is the dataclass field's);
:data:`CLIENT_KNOBS` the settings only the plain clients and the CLI read. The README's
configuration table is generated from :data:`KNOBS` and checked by a test. The URL and
token checks live here too, so this module imports nothing above the data models.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from ._masking import without_userinfo
from .models import validate_id

__all__ = [
    "CLIENT_KNOBS",
    "DEFAULT_BASE_URL",
    "KNOBS",
    "Knob",
    "RecorderConfig",
    "check_token",
    "default_directory",
    "env_names",
    "resolve_base_url",
]

Durability = Literal["batched", "sync"]
Delivery = Literal["process", "thread", "external"]
FullPolicy = Literal["drop_newest", "drop_oldest"]

#: Where Per lives unless ``base_url`` or ``PER_BASE_URL`` says otherwise.
DEFAULT_BASE_URL: Final = "https://api.useper.com"


@dataclass(frozen=True)
class Knob:
    """One setting: where it comes from, what it may be and what it means.

    Attributes:
        name: the keyword argument (and :class:`RecorderConfig` field).
        env: environment variables, the first one set wins.
        meaning: one sentence for the README's table.
        unit: ``"seconds"``, ``"bytes"``, ``"count"`` or ``""`` (text, choices, flags).
        kind: how a value is checked: ``"seconds"`` or ``"int"`` (a number within
            ``low``/``high``), ``"choice"`` (one of ``choices``), ``"bool"``, ``"text"``.
        low, high: bounds of a number; ``low`` may name another field (a lease outlives
            a request). ``strict``: ``low`` itself is refused.
        choices: the values a ``"choice"`` accepts.
        shown: the default as the README shows it, when the field's default says nothing
            useful (required, computed).
    """

    name: str
    env: tuple[str, ...]
    meaning: str
    unit: str = ""
    kind: str = "text"
    low: float | str | None = None
    high: float | None = None
    strict: bool = False
    choices: tuple[str, ...] = ()
    shown: str | None = None

    @property
    def default(self) -> str:
        """The default, as text (the README's table)."""
        if self.shown is not None:
            return self.shown
        spec = RecorderConfig.__dataclass_fields__[self.name]
        value = spec.default
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).lower() if isinstance(value, bool) else str(value)


def _seconds(name: str, env: str, meaning: str, **bounds: Any) -> Knob:
    return Knob(name, (env,), meaning, "seconds", "seconds", **bounds)


def _count(name: str, env: str, meaning: str, **bounds: Any) -> Knob:
    return Knob(name, (env,), meaning, "count", "int", **bounds)


_DAY = 86400.0

#: Every setting of :class:`RecorderConfig`, in the order the README lists them.
KNOBS: tuple[Knob, ...] = (
    Knob("token", ("PER_ACTIVITY_TOKEN",), "Per activity token (a secret).", shown="required"),
    Knob(
        "activity_type_id",
        ("PER_ACTIVITY_TYPE_ID", "ACTIVITY_TYPE_ID"),
        "Default activity type of `record()`.",
        shown="required",
    ),
    Knob(
        "directory",
        ("PER_BUFFER_DIR",),
        "Queue directory; default `$XDG_CACHE_HOME` (or `~/.cache`) `/per-buffer/q-<hash of "
        "token and URL>` (`~/Library/Caches` on macOS).",
        shown="per-user cache dir",
    ),
    Knob(
        "base_url",
        ("PER_BASE_URL",),
        "Per endpoint: https, or http on a loopback host for tests.",
        shown=DEFAULT_BASE_URL,
    ),
    Knob(
        "enabled", ("PER_BUFFER_ENABLED",), "false: validate and count, send nothing.", kind="bool"
    ),
    Knob(
        "durability",
        ("PER_BUFFER_DURABILITY",),
        "`batched`: on disk within `commit_interval`; `sync`: before `record()` returns.",
        kind="choice",
        choices=("batched", "sync"),
    ),
    Knob(
        "delivery",
        ("PER_BUFFER_DELIVERY",),
        "Who delivers: `process` (a drainer process per queue directory, started on "
        "demand, so serving processes only record), `thread` (a thread of each recording "
        "process) or `external` (`per-buffer drain --follow`, run by you).",
        kind="choice",
        choices=("process", "thread", "external"),
    ),
    Knob(
        "drainer_nice",
        ("PER_BUFFER_DRAINER_NICE",),
        "Niceness added to a started drainer process, so delivery uses idle CPU first.",
        kind="int",
        low=0,
        high=19,
    ),
    _seconds(
        "commit_interval",
        "PER_BUFFER_COMMIT_INTERVAL",
        "How long an activity may wait in memory in batched mode (or until the committer "
        "gets the CPU); a crash within it loses it. Each commit costs a SQLite transaction.",
        low=0.0,
        high=60.0,
        strict=True,
    ),
    _seconds(
        "coalesce_window",
        "PER_BUFFER_COALESCE_WINDOW",
        "Repeats of a key in one UTC-aligned window are not sent (0: off).",
        low=0.0,
        high=_DAY * 366,
    ),
    _seconds(
        "coalesce_margin",
        "PER_BUFFER_COALESCE_MARGIN",
        "At each end of a window only unsent copies suppress repeats: the largest "
        "difference expected between the host's clock and Per's.",
        low=0.0,
        high=3600.0,
    ),
    _count(
        "coalesce_max_keys",
        "PER_BUFFER_COALESCE_MAX_KEYS",
        "Keys remembered for coalescing (bounded memory).",
        low=1,
    ),
    _count(
        "concurrency",
        "PER_BUFFER_CONCURRENCY",
        "Most requests in flight at once.",
        low=1,
        high=1024,
    ),
    _seconds(
        "timeout",
        "PER_BUFFER_TIMEOUT",
        "Per request: connect, write and read together.",
        low=0.0,
        high=3600.0,
        strict=True,
    ),
    Knob(
        "proxy",
        ("PER_BUFFER_PROXY",),
        "Proxy URL for Per; without it `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and "
        "`NO_PROXY` apply as httpx reads them.",
        shown="from the environment",
    ),
    _count(
        "max_attempts",
        "PER_BUFFER_MAX_ATTEMPTS",
        "Refusals by Per itself (`ok: false`) before an activity is dead-lettered; "
        "faults on the way never count.",
        low=1,
    ),
    _seconds(
        "backoff_initial",
        "PER_BUFFER_BACKOFF_INITIAL",
        "Scale of the exponential backoff (full jitter).",
        low=0.0,
        high=3600.0,
        strict=True,
    ),
    _seconds(
        "backoff_max",
        "PER_BUFFER_BACKOFF_MAX",
        "Longest backoff, and the longest `Retry-After` honoured.",
        low="backoff_initial",
        high=_DAY,
    ),
    _seconds(
        "auth_probe_interval",
        "PER_BUFFER_AUTH_PROBE_INTERVAL",
        "Between probes while paused on a refused token.",
        low=0.0,
        high=_DAY,
        strict=True,
    ),
    _count("max_queue_items", "PER_BUFFER_MAX_QUEUE_ITEMS", "Most activities on disk.", low=1),
    Knob(
        "max_queue_bytes",
        ("PER_BUFFER_MAX_QUEUE_BYTES",),
        "Most payload bytes on disk.",
        "bytes",
        "int",
        low=1024,
    ),
    Knob(
        "full_policy",
        ("PER_BUFFER_FULL_POLICY",),
        "When the queue is full: `drop_newest` or `drop_oldest`.",
        kind="choice",
        choices=("drop_newest", "drop_oldest"),
    ),
    _count(
        "memory_buffer",
        "PER_BUFFER_MEMORY_BUFFER",
        "Activities held in memory while the disk is slow or fails.",
        low=0,
    ),
    _seconds(
        "exit_timeout",
        "PER_BUFFER_EXIT_TIMEOUT",
        "What `close()` and the exit handler spend delivering when no drainer goes on.",
        low=0.0,
        high=3600.0,
    ),
    _seconds(
        "lease_seconds",
        "PER_BUFFER_LEASE_SECONDS",
        "How long a claimed activity stays leased to a live process (at least `timeout`).",
        low="timeout",
        high=_DAY,
    ),
    _seconds(
        "poll_interval",
        "PER_BUFFER_POLL_INTERVAL",
        "Between looks for work other processes put.",
        low=0.0,
        high=3600.0,
        strict=True,
    ),
)

#: Settings of the plain clients and the CLI that a recorder does not have.
CLIENT_KNOBS: tuple[Knob, ...] = (
    Knob(
        "reporting_token",
        ("PER_REPORTING_TOKEN",),
        "Per reporting token for `get_report()` and `per-buffer report` (a secret).",
        shown="the activity token",
    ),
)

_KNOB_BY_NAME = {knob.name: knob for knob in (*KNOBS, *CLIENT_KNOBS)}


def env_names(name: str) -> tuple[str, ...]:
    """The environment variables of setting ``name`` (e.g. ``"directory"``)."""
    return _KNOB_BY_NAME[name].env


# --------------------------------------------------------------------------- URL and token


def resolve_base_url(base_url: str | None) -> str:
    """Return the validated base URL: the argument, else ``PER_BASE_URL``, else Per's own.

    Only ``https`` is accepted, except ``http`` on a loopback host (127.0.0.0/8,
    ``::1``, ``localhost``) for tests against a local server.

    Raises:
        ValueError: the URL is malformed, not https, or carries credentials, a query or a fragment.
            The message never shows credentials (``user:password@``), not even of a URL that
            cannot be parsed.
    """
    if base_url is None:
        base_url = os.environ.get(env_names("base_url")[0]) or DEFAULT_BASE_URL
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, not {type(base_url).__name__}")
    url = base_url.strip().rstrip("/")
    shown = repr(without_userinfo(base_url))
    if "@" in url:  # before any parsing: an unparsable URL must not show a password either
        raise ValueError(
            f"base_url must not carry credentials (user:password@), not {shown}; "
            "pass the token separately"
        )
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ValueError(f"base_url is not a valid URL: {shown}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"base_url must look like https://host[:port], not {shown}")
    if parts.username is not None or parts.password is not None:  # pragma: no cover ("@")
        raise ValueError("base_url must not carry credentials; pass the token separately")
    if parts.query or parts.fragment:
        raise ValueError(f"base_url must not have a query or fragment: {shown}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ValueError(
            f"base_url must use https (plain http is allowed only for loopback hosts): {shown}"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: object, name: str = "token") -> str:
    """Validate a token's form: a non-empty str of printable ASCII without whitespace.

    That is what an HTTP header carries as is (the wire layer refuses anything else).
    The messages never quote the token, only where the first bad character is.

    Raises:
        TypeError: ``token`` is not a str.
        ValueError: it is empty, or holds whitespace, a control or a non-ASCII character.
    """
    if not isinstance(token, str):
        raise TypeError(f"{name} must be a str, not {type(token).__name__}")
    if not token:
        raise ValueError(f"{name} must not be empty")
    for index, ch in enumerate(token):
        if not "!" <= ch <= "~":  # printable ASCII without space: 0x21-0x7e
            what = "a non-ASCII" if ord(ch) > 127 else "a whitespace or control"
            raise ValueError(
                f"{name} must be printable ASCII without whitespace; character {index + 1} "
                f"of {len(token)} is {what} character (the token is not shown)"
            )
    return token


def default_directory(token: str, base_url: str) -> Path:
    """The per-user cache directory for one token and base URL.

    The last component is a keyed hash: it tells tokens apart without revealing them.
    """
    if sys.platform == "win32":
        root = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        base = root / "per-buffer" / "Cache"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches" / "per-buffer"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "per-buffer"
    digest = hashlib.blake2b(
        f"{base_url}\n{token}".encode(), digest_size=8, person=b"per-buffer-dir"
    ).hexdigest()
    return base / f"q-{digest}"


# --------------------------------------------------------------------------- the recorder's


@dataclass(frozen=True)
class RecorderConfig:
    """The validated settings of a :class:`~per_buffer.Recorder` (see :data:`KNOBS`)."""

    token: str | None = field(repr=False)
    activity_type_id: str | None
    directory: Path
    base_url: str
    enabled: bool = True
    durability: Durability = "batched"
    delivery: Delivery = "process"
    drainer_nice: int = 10
    commit_interval: float = 0.1
    coalesce_window: float = 900.0
    coalesce_margin: float = 30.0
    coalesce_max_keys: int = 1_000_000
    concurrency: int = 8
    timeout: float = 10.0
    proxy: str | None = field(default=None, repr=False)
    max_attempts: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 300.0
    auth_probe_interval: float = 60.0
    max_queue_items: int = 10_000_000
    max_queue_bytes: int = 2 * 1024**3
    full_policy: FullPolicy = "drop_newest"
    memory_buffer: int = 100_000
    exit_timeout: float = 5.0
    lease_seconds: float = 300.0
    poll_interval: float = 1.0
    on_error: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    @classmethod
    def resolve(cls, *, environ: Mapping[str, str] | None = None, **kwargs: Any) -> RecorderConfig:
        """Build a config from keyword arguments, then the environment, then defaults.

        Raises:
            TypeError: an unknown keyword argument.
            ValueError: a missing token or activity type, or a bad value (naming it and,
                for an environment variable, its unit).
        """
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown Recorder argument(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in known:
            value = kwargs.get(name)
            knob = _KNOB_BY_NAME.get(name)
            if value is None and knob is not None:
                value = _from_environment(knob, env)
            if value is not None:
                values[name] = value
        enabled = _bool(values.get("enabled", True), "enabled")
        base_url = resolve_base_url(values.get("base_url") or None)
        values.update(
            token=_required_token(values.get("token"), enabled),
            activity_type_id=_required_type(values.get("activity_type_id"), enabled),
            base_url=base_url,
            enabled=enabled,
        )
        values["directory"] = _directory(values.get("directory"), values["token"], base_url)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every value against its knob; raise ValueError naming the first bad one."""
        for knob in KNOBS:
            _check(knob, getattr(self, knob.name), self)
        if self.on_error is not None and not callable(self.on_error):
            raise ValueError("on_error must be callable")
        if not callable(self.clock):
            raise ValueError("clock must be callable")

    def with_changes(self, **changes: Any) -> RecorderConfig:
        """A copy with some values replaced and validated again."""
        config = replace(self, **changes)
        config.validate()
        return config


def _from_environment(knob: Knob, env: Mapping[str, str]) -> Any:
    for var in knob.env:
        text = env.get(var)
        if text not in (None, ""):
            return _parse(knob, var, text)
    return None


def _required_token(token: object, enabled: bool) -> str | None:
    if token is None:
        if enabled:
            raise ValueError(f"No Per activity token: pass token= or set {env_names('token')[0]}.")
        return None
    return check_token(token)


def _required_type(type_id: object, enabled: bool) -> str | None:
    if type_id is None:
        if enabled:
            first, *rest = env_names("activity_type_id")
            raise ValueError(
                f"No activity type: pass activity_type_id= or set {first} (or {', '.join(rest)})."
            )
        return None
    return validate_id(type_id, "activity_type_id")


def _directory(directory: object, token: str | None, base_url: str) -> Path:
    if directory is None:
        return default_directory(token or "", base_url)
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory must be a path, not {type(directory).__name__}")
    return Path(directory).expanduser()


_UNIT_TEXT = {"seconds": "a number of seconds", "count": "a whole number", "bytes": "bytes"}


def _parse(knob: Knob, var: str, text: str) -> Any:
    """The value of one environment variable, as the knob's kind wants it."""
    try:
        if knob.kind == "bool":
            return _bool(text, var)
        if knob.kind == "int":
            return int(text.replace("_", ""))
        if knob.kind == "seconds":
            return float(text)
    except ValueError:
        unit = "true or false" if knob.kind == "bool" else _UNIT_TEXT.get(knob.unit, knob.unit)
        raise ValueError(f"{var}={text!r} is not a valid {knob.name} ({unit})") from None
    return text


def _check(knob: Knob, value: Any, config: RecorderConfig) -> None:
    """Raise ValueError naming ``knob`` when ``value`` is not allowed."""
    name = knob.name
    if knob.kind == "choice":
        if value not in knob.choices:
            allowed = " or ".join(repr(c) for c in knob.choices)
            raise ValueError(f"{name} must be {allowed}, not {value!r}")
    elif knob.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
    elif knob.kind in ("seconds", "int"):
        low = getattr(config, knob.low) if isinstance(knob.low, str) else knob.low
        if knob.kind == "int":
            _integer(value, name, int(low or 0), None if knob.high is None else int(knob.high))
        else:
            high = math.inf if knob.high is None else knob.high
            _number(value, name, low=float(low or 0.0), high=high, strict_low=knob.strict)
    elif name == "proxy" and value is not None and not isinstance(value, str):
        raise ValueError(f"proxy must be a URL string, not {type(value).__name__}")


def _bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"{name} must be true or false (1/0, yes/no, on/off), not {value!r}")


def _number(value: object, name: str, *, low: float, high: float, strict_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    if value < low or (strict_low and value == low) or value > high:
        bound = ">" if strict_low else ">="
        raise ValueError(f"{name} must be {bound} {low} and <= {high}, not {value!r}")


def _integer(value: object, name: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, not {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {rng}, not {value!r}")
