"""The slice of the recorder's settings that delivery needs, frozen once."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import RecorderConfig

__all__ = ["DeliverySettings"]


@dataclass(frozen=True)
class DeliverySettings:
    """What a delivery worker needs to know (see the README's configuration table).

    Attributes:
        token: the activity token (hidden from the repr).
        base_url: Per's endpoint.
        timeout: seconds per request (connect, write and read together).
        concurrency: the most requests in flight.
        max_attempts: Per's own refusals (``ok: false``) before a dead letter.
        backoff_initial, backoff_max: the backoff's scale and cap (seconds); ``backoff_max``
            also caps an honoured ``Retry-After``.
        auth_probe_interval: seconds between probes while the token is refused.
        poll_interval: seconds between looks for work other processes put.
        coalesce_window, coalesce_margin: the coalescing window and its uncertain zones.
        lease_seconds: how long a claim is leased.
        proxy: an explicit proxy URL (else the environment's, as httpx reads it).
        on_error: called for every failed attempt (from the worker's thread).
        clock: unix time for coalescing windows and late deliveries (tests inject one);
            leases, backoff and pauses always run on real time.
    """

    token: str = field(repr=False)
    base_url: str
    timeout: float = 10.0
    concurrency: int = 8
    max_attempts: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 300.0
    auth_probe_interval: float = 60.0
    poll_interval: float = 1.0
    coalesce_window: float = 900.0
    coalesce_margin: float = 30.0
    lease_seconds: float = 300.0
    proxy: str | None = field(default=None, repr=False)
    on_error: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: RecorderConfig) -> DeliverySettings:
        """The delivery slice of a recorder's resolved settings."""
        if config.token is None:
            raise ValueError("delivery needs a token")
        return cls(
            token=config.token,
            base_url=config.base_url,
            timeout=config.timeout,
            concurrency=config.concurrency,
            max_attempts=config.max_attempts,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            auth_probe_interval=config.auth_probe_interval,
            poll_interval=config.poll_interval,
            coalesce_window=config.coalesce_window,
            coalesce_margin=config.coalesce_margin,
            lease_seconds=config.lease_seconds,
            proxy=config.proxy,
            on_error=config.on_error,
            clock=config.clock,
        )
