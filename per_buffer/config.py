"""Recorder configuration: keyword arguments, else environment variables, else defaults.

Every knob is described once in :data:`KNOBS`; the README's configuration table
is checked against it by a test.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from .client import ACTIVITY_TOKEN_ENV, BASE_URL_ENV, check_token, resolve_base_url
from .models import validate_id

__all__ = ["KNOBS", "Knob", "RecorderConfig", "default_directory"]

Durability = Literal["batched", "sync"]
Delivery = Literal["process", "thread", "external"]
FullPolicy = Literal["drop_newest", "drop_oldest"]


@dataclass(frozen=True)
class Knob:
    """One configuration setting: its environment variable, default and meaning."""

    name: str
    env: tuple[str, ...]
    default: str
    meaning: str


#: Every setting of :class:`RecorderConfig`, in the order the README lists them.
KNOBS: tuple[Knob, ...] = (
    Knob("token", (ACTIVITY_TOKEN_ENV,), "required", "Per activity token (a secret)."),
    Knob(
        "activity_type_id",
        ("PER_ACTIVITY_TYPE_ID", "ACTIVITY_TYPE_ID"),
        "required",
        "Default activity type of `record()`.",
    ),
    Knob(
        "directory",
        ("PER_BUFFER_DIR",),
        "per-user cache dir",
        "Queue directory; default `$XDG_CACHE_HOME` (or `~/.cache`) `/per-buffer/q-<hash of "
        "token and URL>` (`~/Library/Caches` on macOS).",
    ),
    Knob(
        "base_url",
        (BASE_URL_ENV,),
        "https://api.useper.com",
        "Per endpoint: https, or http on a loopback host for tests.",
    ),
    Knob("enabled", ("PER_BUFFER_ENABLED",), "true", "false: validate and count, send nothing."),
    Knob(
        "durability",
        ("PER_BUFFER_DURABILITY",),
        "batched",
        "`batched`: on disk within `commit_interval`; `sync`: before `record()` returns.",
    ),
    Knob(
        "delivery",
        ("PER_BUFFER_DELIVERY",),
        "process",
        "Who delivers: `process` (a drainer process per queue directory, started on "
        "demand, so serving processes only record), `thread` (a thread of each recording "
        "process) or `external` (`per-buffer drain --follow`, run by you).",
    ),
    Knob(
        "drainer_nice",
        ("PER_BUFFER_DRAINER_NICE",),
        "10",
        "Niceness added to a started drainer process, so delivery uses idle CPU first.",
    ),
    Knob(
        "commit_interval",
        ("PER_BUFFER_COMMIT_INTERVAL",),
        "0.01",
        "Seconds an activity may wait in memory in batched mode.",
    ),
    Knob(
        "coalesce_window",
        ("PER_BUFFER_COALESCE_WINDOW",),
        "900",
        "Seconds; repeats of a key in one UTC-aligned window are not sent. 0: off.",
    ),
    Knob(
        "coalesce_margin",
        ("PER_BUFFER_COALESCE_MARGIN",),
        "30",
        "Seconds at each end of a window where only unsent copies suppress repeats: "
        "the largest difference expected between the host's clock and Per's.",
    ),
    Knob(
        "coalesce_max_keys",
        ("PER_BUFFER_COALESCE_MAX_KEYS",),
        "1000000",
        "Keys remembered for coalescing (bounded memory).",
    ),
    Knob("concurrency", ("PER_BUFFER_CONCURRENCY",), "8", "Most requests in flight at once."),
    Knob("timeout", ("PER_BUFFER_TIMEOUT",), "10", "Seconds per HTTP request."),
    Knob(
        "proxy",
        ("PER_BUFFER_PROXY",),
        "from the environment",
        "Proxy URL for Per; without it `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and "
        "`NO_PROXY` apply as httpx reads them.",
    ),
    Knob(
        "max_attempts",
        ("PER_BUFFER_MAX_ATTEMPTS",),
        "3",
        "Refusals by Per itself (`ok: false`) before an activity is dead-lettered; "
        "faults on the way never count.",
    ),
    Knob(
        "backoff_initial",
        ("PER_BUFFER_BACKOFF_INITIAL",),
        "0.5",
        "Seconds; scale of the exponential backoff (full jitter).",
    ),
    Knob("backoff_max", ("PER_BUFFER_BACKOFF_MAX",), "300", "Seconds; longest backoff."),
    Knob(
        "auth_probe_interval",
        ("PER_BUFFER_AUTH_PROBE_INTERVAL",),
        "60",
        "Seconds between probes while paused on a refused token.",
    ),
    Knob(
        "max_queue_items",
        ("PER_BUFFER_MAX_QUEUE_ITEMS",),
        "10000000",
        "Most activities on disk.",
    ),
    Knob(
        "max_queue_bytes",
        ("PER_BUFFER_MAX_QUEUE_BYTES",),
        "2147483648",
        "Most payload bytes on disk.",
    ),
    Knob(
        "full_policy",
        ("PER_BUFFER_FULL_POLICY",),
        "drop_newest",
        "When the queue is full: `drop_newest` or `drop_oldest`.",
    ),
    Knob(
        "memory_buffer",
        ("PER_BUFFER_MEMORY_BUFFER",),
        "100000",
        "Activities held in memory while the disk queue fails.",
    ),
    Knob(
        "exit_timeout",
        ("PER_BUFFER_EXIT_TIMEOUT",),
        "5",
        "Seconds `close()` and the exit handler spend flushing.",
    ),
    Knob(
        "lease_seconds",
        ("PER_BUFFER_LEASE_SECONDS",),
        "300",
        "Seconds a claimed activity stays leased to a live process (at least `timeout`).",
    ),
    Knob(
        "poll_interval",
        ("PER_BUFFER_POLL_INTERVAL",),
        "1",
        "Seconds between looks for work put by other processes.",
    ),
)

_KNOB_BY_NAME = {knob.name: knob for knob in KNOBS}


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


def _secret_repr(_: object) -> str:
    return "<hidden>"


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
    commit_interval: float = 0.01
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
            ValueError: a missing token or activity type, or a bad value (naming it).
        """
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown Recorder argument(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in known:
            value = kwargs.get(name)
            if value is None and name in _KNOB_BY_NAME:
                for var in _KNOB_BY_NAME[name].env:
                    text = env.get(var)
                    if text not in (None, ""):
                        value = _parse_env(name, var, text)
                        break
            if value is not None:
                values[name] = value

        enabled = _bool(values.get("enabled", True), "enabled")
        base_url = resolve_base_url(values.get("base_url") or env.get(BASE_URL_ENV) or None)
        token = values.get("token")
        if token is None:
            if enabled:
                raise ValueError(f"No Per activity token: pass token= or set {ACTIVITY_TOKEN_ENV}.")
        else:
            token = check_token(token)
        type_id = values.get("activity_type_id")
        if type_id is None:
            if enabled:
                raise ValueError(
                    "No activity type: pass activity_type_id= or set PER_ACTIVITY_TYPE_ID "
                    "(or ACTIVITY_TYPE_ID)."
                )
        else:
            type_id = validate_id(type_id, "activity_type_id")
        directory = values.get("directory")
        if directory is None:
            directory = default_directory(token or "", base_url)
        if not isinstance(directory, str | os.PathLike):
            raise TypeError(f"directory must be a path, not {type(directory).__name__}")
        values.update(
            token=token,
            activity_type_id=type_id,
            directory=Path(directory).expanduser(),
            base_url=base_url,
            enabled=enabled,
        )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every value's range; raise ValueError naming the first bad one."""
        if self.durability not in ("batched", "sync"):
            raise ValueError(f"durability must be 'batched' or 'sync', not {self.durability!r}")
        if self.delivery not in ("process", "thread", "external"):
            raise ValueError(
                f"delivery must be 'process', 'thread' or 'external', not {self.delivery!r}"
            )
        _integer(self.drainer_nice, "drainer_nice", 0, 19)
        if self.full_policy not in ("drop_newest", "drop_oldest"):
            raise ValueError(
                f"full_policy must be 'drop_newest' or 'drop_oldest', not {self.full_policy!r}"
            )
        _number(self.commit_interval, "commit_interval", low=0.0, high=60.0, strict_low=True)
        _number(self.coalesce_window, "coalesce_window", low=0.0, high=86400.0 * 366)
        _number(self.coalesce_margin, "coalesce_margin", low=0.0, high=3600.0)
        if self.proxy is not None and not isinstance(self.proxy, str):
            raise ValueError(f"proxy must be a URL string, not {type(self.proxy).__name__}")
        _number(self.timeout, "timeout", low=0.0, high=3600.0, strict_low=True)
        _number(self.backoff_initial, "backoff_initial", low=0.0, high=3600.0, strict_low=True)
        _number(self.backoff_max, "backoff_max", low=self.backoff_initial, high=86400.0)
        _number(
            self.auth_probe_interval, "auth_probe_interval", low=0.0, high=86400.0, strict_low=True
        )
        _number(self.exit_timeout, "exit_timeout", low=0.0, high=3600.0)
        _number(self.lease_seconds, "lease_seconds", low=self.timeout, high=86400.0)
        _number(self.poll_interval, "poll_interval", low=0.0, high=3600.0, strict_low=True)
        _integer(self.coalesce_max_keys, "coalesce_max_keys", 1)
        _integer(self.concurrency, "concurrency", 1, 1024)
        _integer(self.max_attempts, "max_attempts", 1)
        _integer(self.max_queue_items, "max_queue_items", 1)
        _integer(self.max_queue_bytes, "max_queue_bytes", 1024)
        _integer(self.memory_buffer, "memory_buffer", 0)
        if self.on_error is not None and not callable(self.on_error):
            raise ValueError("on_error must be callable")
        if not callable(self.clock):
            raise ValueError("clock must be callable")

    def with_changes(self, **changes: Any) -> RecorderConfig:
        """A copy with some values replaced and validated again."""
        config = replace(self, **changes)
        config.validate()
        return config


def _parse_env(name: str, var: str, text: str) -> Any:
    default = getattr(RecorderConfig, name, None)
    try:
        if name == "enabled":
            return _bool(text, var)
        if isinstance(default, bool):
            return _bool(text, var)
        if isinstance(default, int):
            return int(text.replace("_", ""))
        if isinstance(default, float):
            return float(text)
    except ValueError:
        unit = "a number of seconds" if isinstance(default, float) else "a whole number"
        if isinstance(default, bool) or name == "enabled":
            unit = "true or false"
        raise ValueError(f"{var}={text!r} is not a valid {name} ({unit})") from None
    return text


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
